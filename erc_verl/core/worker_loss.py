"""The actor's loss function in erc-verl's trainer modes: verl's `ppo_loss`, plus what erc-verl's options add.

verl 0.9.1 calls registered policy losses from `verl/workers/utils/losses.py::ppo_loss` with log-probs,
advantages and masks only: no entropy, no batch. Rather than copying `ppo_loss`, erc-verl's trainer modes install
`extended_ppo_loss` on the actor workers with verl's `set_loss_fn`; per micro-batch it calls verl's own `ppo_loss`
unchanged and adds:

- for `erc_*` loss modes, both entropies, delivered to the ERC loss that `ppo_loss` calls:
  1. the old policy's: verl's V1 trainer computes it with `old_log_probs` and stores it as `data["entropy"]`;
  2. the current policy's: the update forward computes it (`actor.calculate_entropy`, switched on by
     `enable_erc`) into `model_output["entropy"]`;
  both laid out exactly as `ppo_loss` lays out `log_prob` (`(bs, response_length)`) and set in a ContextVar
  (`delivering`) for that one call; the ERC loss reads them back with `delivered_entropies`, and raises
  `MissingEntropyError` when called anywhere else without them (it never silently runs as its base loss);
- with `positive_nll_coeff` > 0, the positive-sample NLL term of the official ERC code (see `positive_nll`).
"""

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

import torch
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from erc_verl.core.config import is_erc_mode


class MissingEntropyError(RuntimeError):
    """An ERC loss was called without the entropies it needs."""


class MissingPositiveCountError(RuntimeError):
    """The positive-sample NLL term was computed without its mini-batch-wide token count."""


_DELIVERED: ContextVar[Optional[tuple[torch.Tensor, torch.Tensor]]] = ContextVar("erc_entropies", default=None)

# ERC metrics that are extremes, not means, across micro-batches and data-parallel ranks
_EXTREME_METRICS = {
    "actor/entropy_ratio_min": AggregationType.MIN,
    "actor/entropy_ratio_max": AggregationType.MAX,
}
# ERC metrics over response tokens, reported as the mini-batch's (each micro-batch's value weighted by its share of
# the mini-batch's tokens and summed, as verl's pg_loss), not as verl's mean of micro-batch values: the same figures
# however dynamic batch size and data parallelism split the mini-batch. Exact for the fractions; for the mean ratio
# while every ratio is finite (actor/erc_nonfinite_frac = 0).
_TOKEN_WEIGHTED_METRICS = ("actor/erc_clipfrac", "actor/erc_clipfrac_low", "actor/erc_clipfrac_high",
                           "actor/erc_nonfinite_frac", "actor/entropy_ratio_mean")
POSITIVE_NLL_METRIC = "actor/positive_nll"
# set on each actor mini-batch by erc_verl.core.workers (summed over data-parallel ranks), read by positive_nll
POSITIVE_NUM_TOKENS = "erc_positive_num_tokens"
POSITIVE_NUM_SEQUENCES = "erc_positive_num_sequences"


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
    if data["batch_num_tokens"]:  # the mini-batch's tokens over all ranks: verl's engine sets it on each micro-batch
        share = response_tokens(data) / data["batch_num_tokens"] * data["dp_size"]
        for key in _TOKEN_WEIGHTED_METRICS:
            if key in metrics:
                metrics[key] = Metric(aggregation=AggregationType.SUM, value=metrics[key].aggregate() * share)
    return loss, metrics


def response_tokens(data) -> int:
    """The number of response tokens in a (micro-)batch."""
    return int(data.select("response_mask").to_padded_tensor()["response_mask"].sum())


def positive_response_mask(data, positive_reward: float) -> torch.Tensor:
    """`(bs, response_length)` bool: the response tokens of the responses whose summed token-level reward equals
    `positive_reward` (the official code's `token_level_rewards.sum(-1) == 1.0`; in verl's V1 batch the reward
    before any KL penalty is `rm_scores`, the score at the last response token)."""
    if "rm_scores" not in data.keys():
        raise KeyError("the actor batch has no `rm_scores`: the positive-sample NLL term needs verl's V1 trainer")
    padded = data.select("rm_scores", "response_mask").to_padded_tensor()
    positive = padded["rm_scores"].sum(dim=-1) == positive_reward
    return padded["response_mask"].bool() & positive.unsqueeze(-1)


def positive_counts(data, positive_reward: float) -> tuple[int, int]:
    """(positive response tokens, positive responses) in `data`."""
    mask = positive_response_mask(data, positive_reward)
    return int(mask.sum()), int(mask.any(dim=-1).sum())


def positive_nll(config, model_output, data) -> torch.Tensor:
    """The official ERC code's positive-sample term: -log pi over the response tokens of the positive responses,
    aggregated with `loss_agg_mode` (no ERC mask, no ratio, no clipping).

    Normalised like verl's own terms, by counts over the whole mini-batch and every data-parallel rank (set on the
    mini-batch by erc-verl's actor worker before verl splits it into micro-batches), so the sum over micro-batches
    and the mean over ranks is independent of micro-batching: for token-mean, the mean NLL over all positive tokens
    of the mini-batch. (The official code takes a masked mean per micro-batch instead, `dp_actor.py:510-518`.)
    A mini-batch without positive responses contributes 0.
    """
    num_tokens, num_sequences = tu.get(data, POSITIVE_NUM_TOKENS), tu.get(data, POSITIVE_NUM_SEQUENCES)
    if num_tokens is None or num_sequences is None:
        raise MissingPositiveCountError(
            "positive_nll_coeff > 0 but the mini-batch carries no positive-token count: run it through "
            "`erc-verl train` (or trainer.v1.trainer_mode=erc_sync / erc_colocate_async / erc_separate_async)"
        )
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    mask = positive_response_mask(data, config.policy_loss.positive_nll_reward)
    return agg_loss(
        loss_mat=-log_prob,
        loss_mask=mask,
        loss_agg_mode=config.loss_agg_mode,
        dp_size=data["dp_size"],
        batch_num_tokens=max(num_tokens, 1),  # no positives anywhere: the masked sum is 0, and so is the term
        global_batch_size=max(num_sequences, 1),
        loss_scale_factor=config.loss_scale_factor,
    )


def extended_ppo_loss(config, model_output, data, dp_group=None):
    """The actor loss of erc-verl's trainer modes: verl's `ppo_loss` (with both entropies delivered for `erc_*`
    loss modes) plus `positive_nll_coeff` x `positive_nll` when that is > 0."""
    policy_loss = config.policy_loss
    if is_erc_mode(policy_loss.get("loss_mode", "vanilla")):
        loss, metrics = entropy_aware_ppo_loss(config, model_output, data, dp_group)
    else:
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
    coeff = policy_loss.get("positive_nll_coeff", 0.0)
    if coeff:
        nll = positive_nll(config, model_output, data)
        loss = loss + coeff * nll
        # like verl's pg_loss: summed over micro-batches, averaged over ranks = the mini-batch's value
        metrics[POSITIVE_NLL_METRIC] = Metric(value=nll, aggregation=AggregationType.SUM)
    return loss, metrics
