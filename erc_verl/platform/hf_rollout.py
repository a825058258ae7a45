"""Rollout backend ``hf``: a Hugging Face model in a Ray actor, for machines without vLLM/SGLang (CPU).

Plugs into verl's two rollout registries the way vLLM does:
- ``RolloutReplicaRegistry["hf"]`` -> :class:`HFReplica`, which starts one :class:`HFRolloutServer` actor per replica
  (verl's LLM server manager, load balancer and agent loops talk to it through ``generate``);
- ``_ROLLOUT_REGISTRY[("hf", "async")]`` -> :class:`HFServerAdapter`, built inside each actor worker; verl's
  ``update_weights`` hands it the actor's full weights after every update and it pushes them to the server.

The server samples with :func:`erc_verl.platform.sampler.sample` (token by token with a KV cache, each sampled
token's log-probability under ``log_softmax(logits / temperature)``, which is what verl's actor recomputes as
``old_log_prob``). Concurrent requests are batched (left padding) so one forward pass serves every request in
flight. verl's agent loop sends requests one sample at a time, a few milliseconds apart on a small machine, so the
server collects them while they keep coming (until none arrived for ``batch_gap_ms``, at most ``batch_wait_ms``)
before it samples: one large batch costs a fraction of the CPU of many small ones (`bench/bench_rollout.py`).
Both are set under ``actor_rollout_ref.rollout.engine_kwargs.<backend>``.
"""

import asyncio
import logging
import os
from typing import Any, Generator, Optional

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput

from erc_verl.platform.sampler import sample

logger = logging.getLogger(__name__)

NAME = "hf"
# engine_kwargs.<backend> keys of the request batching, and their defaults
BATCHING_DEFAULTS = {"batch_gap_ms": 10.0, "batch_wait_ms": 100.0}


def server_name(backend: str, replica_rank: int) -> str:
    """The Ray actor name of a replica's server (how the actor workers' adapters find it)."""
    return f"{backend}_server_{replica_rank}_0"


def batching_settings(config: RolloutConfig, backend: str) -> dict[str, float]:
    """`BATCHING_DEFAULTS` updated from ``engine_kwargs.<backend>``; a bad value stops the server, naming the key."""
    given = dict((config.engine_kwargs or {}).get(backend) or {})
    settings = {key: float(given.get(key, default)) for key, default in BATCHING_DEFAULTS.items()}
    for key, value in settings.items():
        if not value >= 0:
            raise ValueError(f"actor_rollout_ref.rollout.engine_kwargs.{backend}.{key} must be >= 0 (got {value})")
    return settings


def _torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(
        str(name), torch.float32
    )


class HFRolloutServer:
    """Ray actor serving token-in/token-out generation from an HF causal LM (the methods verl's replica,
    load balancer and checkpoint manager call on a rollout server).

    Other backends subclass it and override `_load_model`, `_generate` and `update_weights`: the request queue,
    batching and the rest of the server API stay.
    """

    backend = NAME

    def __init__(self, config: RolloutConfig, model_config, replica_rank: int):
        self.config = config
        self.replica_rank = replica_rank
        self.global_steps = None
        self._pending: list[tuple[list[int], tuple, asyncio.Future]] = []  # (prompt, sampling key, future)
        self._batch_task: Optional[asyncio.Task] = None
        self._lock = asyncio.Lock()  # weight updates never interleave with generation
        self.batching = batching_settings(config, self.backend)
        self._load_model(omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig))

    def _load_model(self, model_config: HFModelConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_config.local_path, dtype=_torch_dtype(self.config.dtype), attn_implementation="eager"
        ).eval()
        gen_cfg = self.model.generation_config
        eos = model_config.tokenizer.eos_token_id if model_config.tokenizer is not None else gen_cfg.eos_token_id
        self.eos_token_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
        pad = model_config.tokenizer.pad_token_id if model_config.tokenizer is not None else None
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self.generator = torch.Generator().manual_seed(self.config.seed + self.replica_rank)

    def _max_tokens(self, prompt_len: int, sampling_params: dict) -> int:
        limit = self.config.max_model_len or (self.config.prompt_length + self.config.response_length)
        wanted = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens", self.config.response_length))
        if limit - prompt_len < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room to generate within {limit}")
        return max(1, min(wanted, self.config.response_length, limit - prompt_len))

    async def generate(
        self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str, **kwargs
    ) -> TokenOutput:
        for unsupported in ("image_data", "video_data", "audio_data"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"rollout '{self.backend}' is text-only ({unsupported} given)")
        key = (
            float(sampling_params.get("temperature", 1.0)),
            int(sampling_params.get("top_k", -1)),
            float(sampling_params.get("top_p", 1.0)),
            self._max_tokens(len(prompt_ids), sampling_params),
        )
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(prompt_ids), key, future))
        if self._batch_task is None or self._batch_task.done():
            self._batch_task = asyncio.create_task(self._run_batches())
        token_ids, log_probs = await future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def _collect(self):
        """Return once requests stopped arriving: none new for `batch_gap_ms`, or `batch_wait_ms` after the call."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batching["batch_wait_ms"] / 1000
        seen = -1
        while len(self._pending) != seen and loop.time() < deadline:
            seen = len(self._pending)
            await asyncio.sleep(min(self.batching["batch_gap_ms"] / 1000, max(0.0, deadline - loop.time())))

    async def _run_batches(self):
        while True:
            await self._collect()
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            for batch in self._batches(pending):
                try:
                    async with self._lock:
                        results = await self._generate([(prompt, key) for prompt, key, _ in batch])
                except Exception as e:  # fail the requests, not the server
                    results = [e] * len(batch)
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller gave up (cancelled): the others still get their results
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    def _batches(self, pending: list) -> list[list]:
        """One `sample` call per distinct sampling setting."""
        groups: dict[tuple, list] = {}
        for request in pending:
            groups.setdefault(request[1], []).append(request)
        return list(groups.values())

    async def _generate(self, requests: list[tuple[list[int], tuple]]) -> list[tuple[list[int], list[float]]]:
        """(token ids, log-probs) per (prompt, (temperature, top_k, top_p, max_tokens)); one setting per batch."""
        temperature, top_k, top_p, max_tokens = requests[0][1]
        ids, lps = await asyncio.to_thread(
            sample, self.model, [prompt for prompt, _ in requests], max_tokens, temperature, top_k, top_p,
            self.eos_token_ids, self.pad_token_id, self.generator,
        )
        return list(zip(ids, lps, strict=True))

    async def update_weights(self, weights: dict[str, torch.Tensor], global_steps: Optional[int] = None):
        async with self._lock:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            # Tied embeddings come without lm_head.weight; anything else missing means a naming mismatch.
            missing = [k for k in missing if not (k == "lm_head.weight" and self.model.config.tie_word_embeddings)]
            if missing or unexpected:
                raise RuntimeError(f"weight update mismatch: missing={missing} unexpected={unexpected}")
        if global_steps is not None:
            self.global_steps = global_steps

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    # The model always stays in host memory: sleep/wake and KV-cache management have nothing to free.
    async def wake_up(self, tags: Optional[list[str]] = None):
        pass

    async def sleep(self):
        pass

    async def clear_kv_cache(self):
        pass

    async def release_kv_cache(self):
        pass

    async def resume_kv_cache(self):
        pass

    async def wait_for_requests_to_drain(self):
        while self._pending or (self._batch_task is not None and not self._batch_task.done()):
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        # Batches are short and run to completion; in-flight requests finish instead of being aborted.
        await self.wait_for_requests_to_drain()
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True):
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self):
        pass

    async def start_profile(self, **kwargs):
        pass

    async def stop_profile(self):
        pass


class HFReplica(RolloutReplica):
    """One HF rollout server per replica, on the node of the replica's first actor worker.

    The server runs as its own Ray actor (not inside the FSDP worker) so that verl's load balancer and agent loops
    reach it exactly as they reach a vLLM server.
    """

    backend = NAME
    server_cls = HFRolloutServer

    async def launch_servers(self):
        if self.nnodes != 1:
            raise NotImplementedError(
                f"rollout '{self.backend}' runs one process per replica (got {self.nnodes} nodes)"
            )
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda w: ray.get_runtime_context().get_node_id())
        else:
            node_id = ray.get_runtime_context().get_node_id()
        name = server_name(self.backend, self.replica_rank)
        server = (
            ray.remote(self.server_cls)
            .options(
                name=name,
                num_cpus=0,  # shares the cores with the (idle while generating) actor worker
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                max_concurrency=self.max_concurrency,
            )
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        await server.__ray_ready__.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name  # no HTTP endpoint: verl's load balancer only needs a unique key


class HFServerAdapter(BaseRollout):
    """Lives in each actor worker; the replica's first rank pushes the actor's weights to the server."""

    backend = NAME

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self._has_server = rank % rollout_world_size == 0
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_name(self.backend, self.replica_rank))
        return self._server

    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        global_steps: Optional[int] = None,
        peft_config=None,
        **kwargs,
    ):
        if wire_format != "named_tensors" or peft_config is not None:
            raise NotImplementedError(
                f"rollout '{self.backend}' takes full named tensors only (no LoRA adapters, no deltas)"
            )
        # Every rank drains the generator: producing full tensors from FSDP shards is a collective.
        state = {name: t.detach().to("cpu", copy=True) for name, t in weights}
        if self._has_server:
            await self._server_handle().update_weights.remote(state, global_steps=global_steps)

    async def resume(self, tags: list[str]):
        pass

    async def release(self):
        pass


def register() -> None:
    """Add backend ``hf`` to verl's rollout registries (idempotent)."""
    _ROLLOUT_REGISTRY[(NAME, "async")] = f"{__name__}.HFServerAdapter"
    RolloutReplicaRegistry.register(NAME, lambda: HFReplica)
