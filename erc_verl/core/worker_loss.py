"""How both entropies reach an ERC loss inside verl's actor update.

verl 0.9.1 calls registered policy losses from `verl/workers/utils/losses.py::ppo_loss` with log-probs,
advantages and masks only: no entropy, no batch. Rather than copying `ppo_loss`, the route is:

1. the old policy's entropy: verl's V1 trainer computes it with `old_log_probs` and stores it in the batch as
   `data["entropy"]`;
2. the current policy's: the update forward computes it (`actor.calculate_entropy`, switched on by
   `enable_erc`) into `model_output["entropy"]`;
3. the ERC trainer modes install `entropy_aware_ppo_loss` on the actor workers with verl's `set_loss_fn`. Per
   micro-batch it lays both out exactly as `ppo_loss` lays out `log_prob` (`(bs, response_length)`), sets them
   in a ContextVar (`delivering`) and calls verl's own `ppo_loss` unchanged;
4. inside, the registered ERC loss reads them back with `delivered_entropies`. The ContextVar is set only for
   that one call, so a loss called elsewhere without entropies raises `MissingEntropyError` instead of
   silently running as its base loss.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

import torch
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding


class MissingEntropyError(RuntimeError):
    """An ERC loss was called without the entropies it needs."""


_DELIVERED: ContextVar[Optional[tuple[torch.Tensor, torch.Tensor]]] = ContextVar("erc_entropies", default=None)

# ERC metrics that are extremes, not means, across micro-batches and data-parallel ranks
_EXTREME_METRICS = {
    "actor/entropy_ratio_min": AggregationType.MIN,
    "actor/entropy_ratio_max": AggregationType.MAX,
}


@contextmanager
def delivering(entropy: torch.Tensor, old_entropy: torch.Tensor):
    """Make (current, old) entropies visible to ERC losses called inside this block."""
    token = _DELIVERED.set((entropy, old_entropy))
    try:
        yield
    finally:
        _DELIVERED.reset(token)


def delivered_entropies(
    entropy: Optional[torch.Tensor], old_entropy: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill in whichever entropy the caller did not pass from the ones delivered to this call."""
    delivered = _DELIVERED.get()
    if delivered is None:
        raise MissingEntropyError(
            "an ERC loss was called without `entropy`/`old_entropy` and none were delivered: run it through "
            "`erc-verl train` (or trainer.v1.trainer_mode=erc_sync / erc_colocate_async / erc_separate_async), "
            "or pass both keyword arguments when calling the loss directly"
        )
    return (entropy if entropy is not None else delivered[0], old_entropy if old_entropy is not None else delivered[1])


def entropy_aware_ppo_loss(config, model_output, data, dp_group=None):
    """verl's `ppo_loss` with both entropies delivered to the (ERC) policy loss it calls."""
    if model_output.get("entropy", None) is None:
        raise MissingEntropyError(
            "the actor update produced no current-policy entropy: ERC needs actor_rollout_ref.actor."
            "calculate_entropy=True (set by erc-verl train and the ERC trainer modes)"
        )
    if "entropy" not in data.keys():
        raise MissingEntropyError(
            "the batch has no old-policy `entropy` next to old_log_probs: ERC needs verl's V1 trainer with "
            "old-log-prob recomputation (trainer.use_v1=True, rollout_correction.bypass_mode=False)"
        )
    entropy = no_padding_2_padding(model_output["entropy"], data).detach()
    old_entropy = data.select("entropy").to_padded_tensor()["entropy"]
    if config.entropy_coeff == 0:
        # ERC only needs the entropy as a mask: keep it out of ppo_loss so no zero-weighted bonus is backpropagated
        model_output = {key: value for key, value in model_output.items() if key != "entropy"}
    with delivering(entropy, old_entropy):
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
    for key, aggregation in _EXTREME_METRICS.items():
        if key in metrics:
            extreme = Metric(aggregation=aggregation)
            extreme.extend(metrics[key].values)
            metrics[key] = extreme
    return loss, metrics
