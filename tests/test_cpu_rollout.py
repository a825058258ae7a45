"""The `hf` rollout backend: its sampler's log-probs are the actor's, and it sits in verl's rollout registries."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from erc_verl.platform.hf_rollout import HFReplica, HFServerAdapter, sample

EOS, PAD = 3, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return Qwen2ForCausalLM(cfg).eval()


def recompute(model, prompt, response, temperature):
    """What verl's actor computes: log_softmax(logits / T) at each response token, on the unpadded sequence."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_match_teacher_forced_recompute(model, temperature):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # different lengths: left padding must not leak
    ids, lps = sample(model, prompts, 10, temperature, -1, 1.0, [EOS], PAD, torch.Generator().manual_seed(1))
    for prompt, response, lp in zip(prompts, ids, lps, strict=True):
        assert len(response) == len(lp) > 0
        ref = recompute(model, prompt, response, temperature)
        assert torch.allclose(torch.tensor(lp), ref, atol=1e-5), (torch.tensor(lp) - ref).abs().max()


def test_greedy_and_top_k_1_agree_and_stop_at_eos(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    greedy, _ = sample(model, prompts, 12, 0.0, -1, 1.0, [EOS], PAD)
    top1, _ = sample(model, prompts, 12, 1.0, 1, 1.0, [EOS], PAD, torch.Generator().manual_seed(0))
    assert greedy == top1
    for prompt, response in zip(prompts, greedy, strict=True):
        seq = list(prompt)
        for tok in response:  # each greedy token is the argmax of the unpadded recompute
            assert tok == int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(tok)
        assert EOS not in response[:-1] and (response[-1] == EOS or len(response) == 12)


def test_nucleus_keeps_only_the_head(model):
    # top_p tiny keeps the single most likely token: equals greedy
    prompts = [[5, 6, 7]]
    greedy, _ = sample(model, prompts, 8, 0.0, -1, 1.0, [EOS], PAD)
    nucleus, _ = sample(model, prompts, 8, 1.0, -1, 1e-6, [EOS], PAD, torch.Generator().manual_seed(0))
    assert greedy == nucleus


def test_sampling_is_seeded(model):
    prompts = [[5, 6, 7]] * 4
    a = sample(model, prompts, 8, 1.0, -1, 1.0, [EOS], PAD, torch.Generator().manual_seed(3))
    b = sample(model, prompts, 8, 1.0, -1, 1.0, [EOS], PAD, torch.Generator().manual_seed(3))
    assert a == b


def test_registered_in_verl_rollout_registries():
    import verl  # noqa: F401  (loads the plugin)
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    assert get_rollout_replica_class("hf") is HFReplica
    assert get_rollout_class("hf", "async") is HFServerAdapter


def test_vllm_cpu_backend_registered_next_to_hf():
    import verl  # noqa: F401  (loads the plugin)
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    from erc_verl.platform.hf_rollout import server_name
    from erc_verl.platform.vllm_cpu_rollout import VLLMCPUReplica, VLLMCPURolloutServer, VLLMCPUServerAdapter

    assert get_rollout_replica_class("vllm_cpu") is VLLMCPUReplica
    assert get_rollout_class("vllm_cpu", "async") is VLLMCPUServerAdapter
    # each backend's replica starts its own server class under its own name, where its adapter looks for it
    assert VLLMCPUReplica.server_cls is VLLMCPURolloutServer and HFReplica.server_cls is not VLLMCPURolloutServer
    assert server_name(VLLMCPUReplica.backend, 0) != server_name(HFReplica.backend, 0)
    assert VLLMCPUServerAdapter.backend == VLLMCPUReplica.backend == "vllm_cpu"


def in_memory_server(model, **batching):
    """HFRolloutServer on the in-memory model (batching settings as engine_kwargs.hf), recording the size of every
    batch it samples in `batch_sizes`."""
    from types import SimpleNamespace

    from erc_verl.platform.hf_rollout import HFRolloutServer

    class Server(HFRolloutServer):
        def _load_model(self, model_config):  # the model object itself, instead of a path
            self.model, self.eos_token_ids, self.pad_token_id = model_config, [EOS], PAD
            self.generator = torch.Generator().manual_seed(0)
            self.batch_sizes = []

        async def _generate(self, requests):
            self.batch_sizes.append(len(requests))
            return await super()._generate(requests)

    config = SimpleNamespace(max_model_len=None, prompt_length=8, response_length=6, seed=0,
                             engine_kwargs={"hf": batching})
    return Server(config, model, 0)


def test_server_batches_requests_and_survives_a_cancelled_caller(model):
    import asyncio

    server = in_memory_server(model)

    async def scenario():
        same = [asyncio.create_task(server.generate([5, 6, 7], {"temperature": 1.0, "logprobs": True}, f"r{i}"))
                for i in range(4)]
        other = asyncio.create_task(server.generate([5, 6], {"temperature": 0.7}, "t"))
        await asyncio.sleep(0)  # every request is queued
        same[0].cancel()  # its caller gives up: the others in its batch must still get results
        return await asyncio.wait_for(asyncio.gather(*same[1:], other), timeout=60)

    results = asyncio.run(scenario())
    assert sorted(server.batch_sizes) == [1, 4]  # concurrent requests batched, one sample call per sampling setting
    for out in results[:3]:
        assert 0 < len(out.token_ids) == len(out.log_probs) <= 6
    assert results[3].log_probs is None  # not requested


def _trickle(server, count: int, every_s: float):
    """`count` requests, one every `every_s` seconds (as verl's agent loop sends them); returns their outputs."""
    import asyncio

    async def scenario():
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(server.generate([5, 6, 7], {"temperature": 1.0}, f"r{i}")))
            await asyncio.sleep(every_s)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

    return asyncio.run(scenario())


def test_server_waits_for_requests_that_keep_coming(model):
    # requests 1 ms apart, a 1 s gap allowance: one batch (event-loop timers fire in order, whatever the load)
    server = in_memory_server(model, batch_gap_ms=1000, batch_wait_ms=10000)
    assert len(_trickle(server, 12, 0.001)) == 12
    assert server.batch_sizes == [12]


def test_server_stops_waiting_after_batch_wait_ms(model):
    # requests keep coming for 0.4 s: the first batch starts after at most 50 ms, the rest follow
    server = in_memory_server(model, batch_gap_ms=1000, batch_wait_ms=50)
    assert len(_trickle(server, 100, 0.004)) == 100
    assert sum(server.batch_sizes) == 100 and len(server.batch_sizes) > 1 and server.batch_sizes[0] < 100


def test_bad_batching_setting_names_the_key(model):
    with pytest.raises(ValueError, match=r"engine_kwargs\.hf\.batch_gap_ms must be >= 0"):
        in_memory_server(model, batch_gap_ms=-1)
