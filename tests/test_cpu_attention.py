"""`cpu_varlen`: flash-attn's kernels on CPU behind transformers' flash-attention path (what verl's remove-padding
and Ulysses code reaches), against float64 attention and against the padded forward."""

import math

import pytest
import torch

from erc_verl.platform import cpu_attention


def _reference(q, k, v, causal: bool) -> torch.Tensor:
    """Softmax attention of one sequence in float64: q (Lq, Hq, D), k/v (Lk, Hk, D), query heads grouped over kv
    heads, a causal mask aligned bottom-right."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_varlen_kernel_against_float64(causal, kv_heads):
    g = torch.Generator().manual_seed(0)
    lengths_q, lengths_k = [5, 1, 9, 3], [5, 1, 9, 3] if causal else [7, 2, 4, 3]
    q = torch.randn(sum(lengths_q) + 2, 4, 8, generator=g)  # 2 trailing rows of padding stay 0
    k = torch.randn(sum(lengths_k), kv_heads, 8, generator=g)
    v = torch.randn(sum(lengths_k), kv_heads, 8, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()])
    out = cpu_attention.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=causal)
    for b in range(len(lengths_q)):
        expected = _reference(q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]], causal)
        torch.testing.assert_close(out[cu_q[b] : cu_q[b + 1]].double(), expected, atol=1e-5, rtol=1e-5)
    assert out[-2:].abs().max() == 0


def test_dense_kernel_and_unsupported_options():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 6, 4, 8, generator=g) for _ in range(3))
    out = cpu_attention.flash_attn_func(q, k, v, causal=True)
    for b in range(2):
        torch.testing.assert_close(out[b].double(), _reference(q[b], k[b], v[b], True), atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        cpu_attention.flash_attn_func(q, k, v, causal=True, window_size=(4, 0))
    with pytest.raises(NotImplementedError, match="soft-capping"):
        cpu_attention.flash_attn_func(q, k, v, causal=True, softcap=30.0)


def _tiny_qwen2(attention: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attention).eval()


def test_packed_rows_attend_within_their_sequence_like_the_padded_forward(monkeypatch):
    """verl's remove-padding forward: one row of packed sequences, position ids restarting at 0, no cache."""
    import transformers.modeling_flash_attention_utils as flash_utils

    cpu_attention.register()
    calls, varlen = [], cpu_attention.flash_attn_varlen_func

    def spy(*args, **kwargs):
        calls.append(kwargs["cu_seqlens_q"].tolist())
        return varlen(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, "flash_attn_varlen_func", spy)
    for cached in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn"):  # looked up again, restored after
        monkeypatch.setattr(flash_utils, cached, None)
    g = torch.Generator().manual_seed(2)
    sequences = [torch.randint(50, (n,), generator=g) for n in (7, 3, 11)]
    packed = _tiny_qwen2(cpu_attention.NAME)
    padded = _tiny_qwen2("eager")
    padded.load_state_dict(packed.state_dict())
    with torch.no_grad():
        logits = packed(input_ids=torch.cat(sequences)[None],
                        position_ids=torch.cat([torch.arange(len(s)) for s in sequences])[None], use_cache=False).logits[0]
        for sequence, part in zip(sequences, logits.split([len(s) for s in sequences]), strict=True):
            alone = padded(input_ids=sequence[None], use_cache=False).logits[0]
            torch.testing.assert_close(part, alone, atol=1e-5, rtol=1e-5)
    assert calls == [[0, 7, 10, 21]] * 2  # both layers ran the varlen kernel on the sequences' boundaries
    assert cpu_attention.goes_through_flash_integration(cpu_attention.NAME)
    assert not cpu_attention.goes_through_flash_integration("sdpa")
    assert cpu_attention.goes_through_flash_integration("flash_attention_2")
