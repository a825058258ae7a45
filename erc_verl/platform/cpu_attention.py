"""`cpu_varlen`: the flash-attention code path of transformers and verl, on CPU kernels.

The paper recipes run packed sequences (`use_remove_padding`) and Ulysses sequence parallelism. verl's Ulysses
patch (verl 0.9.1 `models/transformers/monkey_patch.py`, `apply_monkey_patch`) replaces
`transformers.integrations.flash_attention._flash_attention_forward`: only attention implementations that go
through transformers' flash integration reach it, so with `eager` / `sdpa` every rank would attend within its own
shard of the sequence. `cpu_varlen` is registered with transformers' `AttentionInterface` (and the flash mask with
its mask registry) as transformers' stock `flash_attention_forward`, so the whole flash path runs (verl's all-to-all
of q/k/v and all-gather of position ids, transformers' packed-sequence and padding handling), down to the kernels,
which are flash-attn's `flash_attn_varlen_func` / `flash_attn_func` written with torch's SDPA, one sequence at a
time.

Select it with `+actor_rollout_ref.model.override_config.attn_implementation=cpu_varlen`; the plugin registers it
when the CPU platform is active.
"""

import math

import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as flash_utils
from transformers.integrations import flash_attention
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

NAME = "cpu_varlen"


def _check_supported(window_size, softcap) -> None:
    if window_size is not None and tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"{NAME}: sliding-window attention is not implemented (window {window_size})")
    if softcap:
        raise NotImplementedError(f"{NAME}: attention logit soft-capping is not implemented")


def _attend(q, k, v, causal: bool, scale: float, dropout_p: float) -> torch.Tensor:
    """q (H_q, L_q, D), k/v (H_k, L_k, D) -> (H_q, L_q, D); a causal mask is aligned bottom-right, as flash-attn's."""
    lq, lk = q.shape[-2], k.shape[-2]
    mask = None
    if causal and lq != lk:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and lq == lk, scale=scale,
        enable_gqa=q.shape[-3] != k.shape[-3],
    )


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           deterministic=False):
    """Packed sequences: q (total_q, H_q, D) and k/v (total_k, H_k, D); sequence b is rows cu_seqlens[b]:[b+1]."""
    _check_supported(window_size, softcap)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)  # rows past the last sequence (padding) stay 0, as in flash-attn
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:]), strict=True):
        if q1 > q0 and k1 > k0:
            o = _attend(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1), causal, scale,
                        dropout_p)
            out[q0:q1] = o.transpose(0, 1)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    """Unpadded batches: q (B, L_q, H_q, D), k/v (B, L_k, H_k, D)."""
    _check_supported(window_size, softcap)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale, dropout_p).transpose(1, 2)


def _use_cpu_kernels() -> None:
    """Point transformers' flash-kernel cache at these kernels.

    transformers (5.10, `modeling_flash_attention_utils.lazy_import_flash_attention`) resolves the kernels of an
    implementation name once and caches them in module globals; for a name it does not know it would try the
    `kernels` hub. Filling the cache is the one step here that is not a registry call; it happens inside the
    attention call, so a process that never selects `cpu_varlen` is unaffected.
    """
    if flash_utils._loaded_implementation != NAME:
        flash_utils._loaded_implementation = NAME
        flash_utils._flash_fn, flash_utils._flash_varlen_fn = flash_attn_func, flash_attn_varlen_func
        flash_utils._flash_with_kvcache_fn = None
        flash_utils._pad_fn, flash_utils._unpad_fn = flash_utils._pad_input, flash_utils._unpad_input
        flash_utils._process_flash_kwargs_fn = flash_utils._lazy_define_process_function(flash_attn_varlen_func)


def cpu_varlen_attention_forward(module, query, key, value, attention_mask, **kwargs):
    _use_cpu_kernels()
    # looks `_flash_attention_forward` up in its module at call time: verl's Ulysses wrapper when it is patched in
    return flash_attention.flash_attention_forward(module, query, key, value, attention_mask, **kwargs)


def goes_through_flash_integration(attn_implementation: str) -> bool:
    """Whether an attention implementation reaches transformers' flash integration (and so verl's Ulysses patch)."""
    function = ALL_ATTENTION_FUNCTIONS.get(attn_implementation)
    return function in (flash_attention.flash_attention_forward, cpu_varlen_attention_forward)


def register() -> None:
    AttentionInterface.register(NAME, cpu_varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
