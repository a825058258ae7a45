"""The `vllm_cpu` rollout backend's server, driven directly: vLLM's log-probs are `sample`'s (what verl's actor
recomputes), before and after a weight update with tied embeddings.

Needs the `vllm-cpu` extra (README), which the test venv does not install: CI runs the `hf` backend, and this module
runs where the extra is installed (`python -m pytest tests/test_vllm_cpu_rollout.py` with that python).
"""

import asyncio
import copy

import pytest
import torch

pytest.importorskip("vllm")

from erc_verl.platform.hf_rollout import sample  # noqa: E402
from erc_verl.demo.task import TaskSpec, corpus  # noqa: E402
from erc_verl.demo.tiny_model import ModelSpec, build_model, build_tokenizer  # noqa: E402
from erc_verl.demo.warm_start import encode_pair  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from verl.workers.config import HFModelConfig, RolloutConfig

    from erc_verl.platform.vllm_cpu_rollout import VLLMCPURolloutServer

    task = TaskSpec(n_val=8)
    tokenizer = build_tokenizer(corpus(task), ModelSpec().vocab_size)
    # the CPU recipe's model: head_dim 32 (vLLM's CPU attention has no 16), tied embeddings
    spec = ModelSpec(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)
    model = build_model(spec, tokenizer).eval()
    assert model.config.tie_word_embeddings
    path = tmp_path_factory.mktemp("vllm_cpu") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = RolloutConfig(name="vllm_cpu", prompt_length=24, response_length=10, dtype="float32",
                           enforce_eager=True, max_num_seqs=64, tensor_model_parallel_size=1, load_format="auto",
                           seed=0, max_num_batched_tokens=2048)
    prompts = [encode_pair(tokenizer, f"{a}+{b}", a + b)[0] for a, b in [(12, 3), (45, 7), (99, 1), (20, 9)]]
    return VLLMCPURolloutServer(config, HFModelConfig(path=str(path)), 0), model, tokenizer, prompts


def generate_all(server, prompts, params):
    async def run():
        return await asyncio.gather(*[server.generate(p, dict(params), f"r{i}") for i, p in enumerate(prompts)])

    return asyncio.run(run())


def assert_greedy_matches_sample(server, model, tokenizer, prompts):
    outs = generate_all(server, prompts, {"temperature": 0.0, "logprobs": True})
    ids, lps = sample(model, prompts, 10, 0.0, -1, 1.0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    for out, ref_ids, ref_lps in zip(outs, ids, lps, strict=True):
        assert out.token_ids == ref_ids
        torch.testing.assert_close(torch.tensor(out.log_probs), torch.tensor(ref_lps), atol=1e-5, rtol=0)


def test_greedy_tokens_and_log_probs_are_samples(served):
    assert_greedy_matches_sample(*served)


def test_sampled_log_probs_are_the_actors_recompute(served):
    server, model, _, prompts = served
    for out, prompt in zip(generate_all(server, prompts, {"temperature": 1.5, "logprobs": True}), prompts):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits / 1.5, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.log_probs), ref, atol=1e-5, rtol=0)


def test_weight_update_reaches_the_tied_output_layer(served):
    server, model, tokenizer, prompts = served
    updated = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(0.2 * p.std().clamp(min=0.02) * torch.randn(p.shape, generator=g))
    # as verl's actor sends a tied model's weights: without lm_head.weight (HFRolloutServer.update_weights too)
    weights = {k: v.clone() for k, v in updated.state_dict().items() if k != "lm_head.weight"}
    asyncio.run(server.update_weights(weights, global_steps=3))
    assert server.global_steps == 3
    assert_greedy_matches_sample(server, updated, tokenizer, prompts)
