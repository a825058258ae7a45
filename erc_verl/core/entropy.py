"""The current policy's entropy for the ERC mask, computed without autograd.

ERC only compares H(pi_theta) / H(pi_old) with a band: no gradient flows through the entropy. verl's engine
computes it with autograd whenever the update asks for entropies (full-vocabulary softmax kept for a backward
that never comes, or recomputed under checkpointing). When `entropy_coeff == 0` the ERC trainer modes give the
actor workers an engine whose entropy function runs under `torch.no_grad()`, chunked over tokens (verl's
`entropy_from_logits_chunk_size`), with one or two [chunk, V] float32 temporaries per chunk; with
`entropy_coeff != 0` the entropy bonus needs the gradient and verl's own path stays.

The swap goes through verl's extension points (`erc_verl.core.workers`): the trainer picks the worker class, the
worker its training worker, whose engine's `compute_entropy_from_logits` (set by verl's FSDP, automodel, veomni
and torchtitan engines) `install_entropy_without_grad` replaces.
"""

from functools import lru_cache, partial
from typing import Optional

import torch
from torch.distributed.tensor import DTensor
from verl.utils import tensordict_utils as tu


def _chunk_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum(p * log p) over the last dim of a [C, V] chunk, in float32.

    Every term is <= 0, so nothing cancels: `logsumexp(x) - sum(p * x)`, the other usual form, subtracts two
    numbers close to max(x) on a peaked row (low entropy, where ERC drops most).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)  # one [C, V] temporary (two while casting non-fp32 logits)
    p = log_p.exp()
    log_p.clamp_(min=torch.finfo(torch.float32).min)  # a -inf logit (masked token): 0 * log 0 counts as 0
    return -torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)  # row-wise dot: no [C, V] product


ENGINE_MESSAGE = "erc_verl: the actor engine computes the current entropy without autograd"


@lru_cache(maxsize=1)
def _compiled_chunk_entropy():
    return torch.compile(_chunk_entropy, dynamic=True)


def entropy_without_grad(
    logits: torch.Tensor, chunk_size: int = 2048, compile: bool = False, temperature: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim, float32, without an autograd graph.

    Args:
        logits: `(..., vocab_size)`, any float dtype (verl passes `(total_nnz, vocab_size)` on the remove-padding
            path, temperature already applied).
        chunk_size: tokens per chunk; each chunk costs one or two `(chunk_size, vocab_size)` float32 temporaries.
        compile: run each chunk through `torch.compile` (the engine's `use_torch_compile`).
        temperature: optional `logits.shape[:-1]`, applied chunk by chunk (no scaled copy of all the logits).

    Returns:
        `logits.shape[:-1]`, float32. Computed in float32 with autocast off: verl calls it inside its bf16
        autocast region, where the row-wise reduction would otherwise run in bf16 (0.1 nats of error, enough to
        flip ERC's keep/drop decision at a 0.05 band). Drop-in for verl's `entropy_from_logits[_with_chunking]`
        (also when verl passes its own `chunk_size`).
    """
    if chunk_size < 1:
        raise ValueError(f"entropy chunk_size must be >= 1, got {chunk_size}")
    chunk_entropy = _compiled_chunk_entropy() if compile else _chunk_entropy
    with torch.no_grad(), torch.autocast(device_type=logits.device.type, enabled=False):
        flat = logits.reshape(-1, logits.shape[-1])
        per_token = None if temperature is None else temperature.reshape(-1, 1).float()
        entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, flat.shape[0], chunk_size):
            chunk = flat[start : start + chunk_size]
            if per_token is not None:
                chunk = chunk.float() / per_token[start : start + chunk_size].clamp(min=1e-8)
            entropy[start : start + chunk_size] = chunk_entropy(chunk)
    return entropy.view(logits.shape[:-1])


class _EntropyBesideLogProbs:
    """Mixed in front of verl's FSDP LM engine: on the remove-padding path, the entropy comes from the same logits
    as the log-probs but outside verl's `calculate_entropy` branch.

    verl 0.9.1 (workers/engine/fsdp/transformer_impl.py, `prepare_model_outputs`) turns off flash-attn's in-place
    cross-entropy backward whenever `calculate_entropy` is set, because its own entropy keeps an autograd graph on
    the logits. This one keeps none, so verl is asked for log-probs alone (its in-place backward stays on, saving a
    `(tokens, vocab)` gradient buffer on GPU) and the entropy is added to its outputs, laid out as verl lays it out.
    """

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        def flag(key):
            return tu.get_non_tensor_data(data=micro_batch, key=key, default=False)

        packed_logits = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True) and not (
            flag("use_fused_kernels") or flag("distillation_use_topk") or isinstance(output.logits, DTensor)
        )
        if not (flag("calculate_entropy") and packed_logits):  # verl's own branches
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        temperature = None if output_args.get("temperature_is_one") else output_args["temperature_rmpad"]
        entropy = self.compute_entropy_from_logits(output.logits.squeeze(0), temperature=temperature)
        tu.assign_non_tensor(micro_batch, calculate_entropy=False)
        try:
            model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        finally:
            tu.assign_non_tensor(micro_batch, calculate_entropy=True)
        entropy = self._gather_and_unpad_packed(entropy, output_args["pad_size"])
        model_output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, micro_batch["input_ids"].offsets())
        return model_output


@lru_cache(maxsize=None)
def _engine_with_entropy_beside_log_probs(base: type) -> type:
    return type(f"Erc{base.__name__}", (_EntropyBesideLogProbs, base), {"__module__": __name__})


def install_entropy_without_grad(engine) -> bool:
    """Make `engine` compute entropies with `entropy_without_grad`; False if it has no entropy function to swap.

    verl's chunked branch passes its `chunk_size`, its checkpointed branch none: the engine's holds on both. verl's
    FSDP LM engine also gets `_EntropyBesideLogProbs` (its class is swapped for a subclass: the engine is built
    inside verl's TrainingWorker, which offers no hook to choose the class).
    """
    if not hasattr(engine, "compute_entropy_from_logits"):
        return False
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # in the worker, where it is loaded

    if isinstance(engine, FSDPEngineWithLMHead):
        engine.__class__ = _engine_with_entropy_beside_log_probs(type(engine))
    config = engine.engine_config
    engine.compute_entropy_from_logits = partial(
        entropy_without_grad,
        chunk_size=getattr(config, "entropy_from_logits_chunk_size", 2048),
        compile=bool(getattr(config, "use_torch_compile", False)),
    )
    return True
