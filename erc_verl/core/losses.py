"""Where the loss is: GPPO, the entropy-ratio mask, and the ERC variant `erc_<name>` of verl's policy losses.
(`erc_verl.core.reference` is the same mathematics on one page, in plain torch: the tests' oracle.)

ERC (arXiv 2512.05591) keeps a response token's policy-gradient contribution only while the ratio of the current
to the old policy's full-vocabulary entropy at that position, rho = (H_cur + 1e-8) / (H_old + 1e-8), stays
strictly inside (1 - beta_low, 1 + beta_high). A dropped token keeps its loss value, gives zero gradient and
still counts in the aggregation denominator.

For any loss whose per-token term depends only on that token's log-prob (vanilla/DAPO, GPPO, and verl's other
token-level losses), `where(keep, loss, loss.detach())` equals calling the loss with
`where(keep, log_prob, log_prob.detach())`: so ERC is one wrapper around any registered loss.
"""

from typing import Any, Optional

import torch
from verl.trainer.ppo.core_algos import (
    POLICY_LOSS_REGISTRY,
    agg_loss,
    get_policy_loss_fn,
    register_policy_loss,
)
from verl.utils import torch_functional as verl_F

from erc_verl.core import worker_loss
from erc_verl.core.config import ERC_CONFIG_TARGET, ERC_PREFIX, POLICY_LOSS_KEY, ErcConfigError, erc_base_mode

ENTROPY_EPS = 1e-8
# verl's own log-ratio clamp (core_algos.compute_policy_loss_vanilla), kept so GPPO matches vanilla's values
LOG_RATIO_CLAMP = 20.0
# base losses with no ERC variant: bypass mode never computes the old policy's entropy
NO_ERC_VARIANT = ("bypass_mode",)


def entropy_ratio_mask(
    entropy: torch.Tensor,
    old_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    beta_low: float,
    beta_high: float,
    unusable: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token keep mask of ERC and its metrics (fractions over the response tokens of this micro-batch).

    Args:
        entropy: `(bs, response_length)`, the current policy's full-vocabulary entropy at each response token.
        old_entropy: `(bs, response_length)`, the old (rollout-time) policy's, at the same tokens.
        response_mask: `(bs, response_length)`, 1 for response tokens; only they count in the metrics.
        beta_low, beta_high: the band: a token is kept while 1 - beta_low < rho < 1 + beta_high.
        unusable: optional `(bs, response_length)` bool, tokens to drop whatever their ratio.

    Returns:
        keep: `(bs, response_length)` bool; metrics: `actor/erc_clipfrac[_low|_high]`, `actor/erc_nonfinite_frac`,
        `actor/entropy_ratio_{mean,min,max}`, as floats.

    A token whose ratio is not finite (NaN/inf entropies), or marked `unusable` (e.g. a non-finite log-prob), is
    dropped and counted in `actor/erc_nonfinite_frac`; it is in neither the low nor the high fraction. Without
    response tokens the ratio statistics read 1.0 (the neutral ratio), so micro-batch metrics stay aggregatable.
    """
    if entropy.shape != old_entropy.shape or entropy.shape != response_mask.shape:
        raise ValueError(
            f"ERC entropies must be aligned with log_prob: entropy {tuple(entropy.shape)}, old_entropy "
            f"{tuple(old_entropy.shape)}, response_mask {tuple(response_mask.shape)}"
        )
    with torch.no_grad():
        rho = (entropy.float() + ENTROPY_EPS) / (old_entropy.float() + ENTROPY_EPS)
        finite = torch.isfinite(rho) if unusable is None else torch.isfinite(rho) & ~unusable
        low = finite & (rho <= 1.0 - beta_low)
        high = finite & (rho >= 1.0 + beta_high)
        keep = finite & ~low & ~high
        mask = response_mask.bool()
        num_tokens = mask.sum().clamp(min=1)
        observed = rho[finite & mask]
        has_tokens = observed.numel() > 0
        metrics = {
            "actor/erc_clipfrac": ((~keep & mask).sum() / num_tokens).item(),
            "actor/erc_clipfrac_low": ((low & mask).sum() / num_tokens).item(),
            "actor/erc_clipfrac_high": ((high & mask).sum() / num_tokens).item(),
            "actor/erc_nonfinite_frac": ((~finite & mask).sum() / num_tokens).item(),
            "actor/entropy_ratio_mean": observed.mean().item() if has_tokens else 1.0,
            "actor/entropy_ratio_min": observed.min().item() if has_tokens else 1.0,
            "actor/entropy_ratio_max": observed.max().item() if has_tokens else 1.0,
        }
    return keep, metrics


def erc_band(config) -> tuple[float, float]:
    """(beta_low, beta_high) from `config.policy_loss` (an ErcPolicyLossConfig)."""
    policy_loss = config.policy_loss if config is not None else None
    beta_low = policy_loss.get("erc_beta_low") if policy_loss is not None else None
    beta_high = policy_loss.get("erc_beta_high") if policy_loss is not None else None
    if beta_low is None or beta_high is None:
        raise ErcConfigError(
            f"{POLICY_LOSS_KEY}.erc_beta_low/erc_beta_high are missing: set "
            f"{POLICY_LOSS_KEY}._target_={ERC_CONFIG_TARGET} (erc-verl train does this for erc_* loss modes)"
        )
    return beta_low, beta_high


def make_erc_loss(base_name: str):
    """ERC around the registered loss `base_name` (looked up at call time, so a re-registered base is honoured).

    The returned function has verl's policy-loss signature plus two optional tensors:

    Args:
        old_log_prob, log_prob, advantages, response_mask: `(bs, response_length)`, as for any verl policy loss.
        loss_agg_mode, config, rollout_is_weights: passed through to the base loss; `config.policy_loss` must
            carry `erc_beta_low` / `erc_beta_high` (an `ErcPolicyLossConfig`).
        entropy, old_entropy: `(bs, response_length)`, the current and old policies' entropies. verl's `ppo_loss`
            passes neither: inside the actor update they come from `worker_loss.delivered_entropies`, the
            ContextVar that `worker_loss.entropy_aware_ppo_loss` sets around verl's `ppo_loss` for one call.

    Returns:
        (scalar loss, metrics): the base loss of the gated log-probs and its metrics plus ERC's.
    """

    def compute_policy_loss_erc(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: Optional[torch.Tensor] = None,
        entropy: Optional[torch.Tensor] = None,
        old_entropy: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if entropy is None or old_entropy is None:
            entropy, old_entropy = worker_loss.delivered_entropies(entropy, old_entropy)
        beta_low, beta_high = erc_band(config)
        # a token with a non-finite input is dropped, and neutralised (A = 0, r = 1: loss 0) so no NaN reaches
        # the aggregate; it still counts in the denominator like any dropped token
        unusable = ~(torch.isfinite(log_prob.detach()) & torch.isfinite(old_log_prob) & torch.isfinite(advantages))
        keep, erc_metrics = entropy_ratio_mask(entropy, old_entropy, response_mask, beta_low, beta_high, unusable)
        gated_log_prob = torch.where(keep, log_prob, log_prob.detach())
        if unusable.any():
            gated_log_prob = torch.where(unusable, 0.0, gated_log_prob)
            old_log_prob = torch.where(unusable, 0.0, old_log_prob)
            advantages = torch.where(unusable, 0.0, advantages)
        loss, metrics = get_policy_loss_fn(base_name)(
            old_log_prob=old_log_prob,
            log_prob=gated_log_prob,
            advantages=advantages,
            response_mask=response_mask,
            loss_agg_mode=loss_agg_mode,
            config=config,
            rollout_is_weights=rollout_is_weights,
        )
        if not response_mask.any():
            # nothing to learn from; verl's aggregation may have divided by a zero local token count
            loss = torch.where(response_mask.bool(), gated_log_prob, 0.0).sum()
        return loss, {**metrics, **erc_metrics}

    compute_policy_loss_erc.__name__ = f"compute_policy_loss_erc_{base_name}"
    compute_policy_loss_erc.__doc__ = f"ERC (arXiv 2512.05591) around verl's `{base_name}` policy loss."
    return compute_policy_loss_erc


def compute_policy_loss_gppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Gradient-preserving clipping (GPPO, Klear-Reasoner arXiv 2508.07629).

    The PPO clip bounds are rescaled by r / sg(r): values are those of verl's `vanilla` loss (clip-higher and
    dual clip included), but a clipped token keeps the bounded gradient -A (1 +/- eps) grad log pi instead of 0.
    """
    if config is None:
        raise ValueError("gppo needs the actor config (clip_ratio_low/high, clip_ratio_c)")
    clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    clip_ratio_c = config.get("clip_ratio_c", 3.0)

    log_ratio = torch.clamp(log_prob - old_log_prob, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    ppo_kl = verl_F.masked_mean(-log_ratio, response_mask)

    gradient_carrier = ratio / ratio.detach()  # == 1 in value, d/dtheta = grad log pi
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(
        ratio, min=(1 - clip_ratio_low) * gradient_carrier, max=(1 + clip_ratio_high) * gradient_carrier
    )
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.minimum(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_F.masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights

    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )
    return pg_loss, {
        "actor/pg_clipfrac": pg_clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.detach().item(),
    }


def register_erc_variants() -> list[str]:
    """Register `erc_dapo` and `erc_<name>` for every base loss registered so far; returns the new names.

    The plugin calls it once (`register`); call it again after registering a loss of your own to get its ERC
    variant.
    """
    added = []
    for base in [name for name in POLICY_LOSS_REGISTRY if not name.startswith(ERC_PREFIX)]:
        if base in NO_ERC_VARIANT:
            continue
        name = ERC_PREFIX + base
        if name not in POLICY_LOSS_REGISTRY:
            register_policy_loss(name)(make_erc_loss(base))
            added.append(name)
    if "erc_dapo" not in POLICY_LOSS_REGISTRY:
        register_policy_loss("erc_dapo")(make_erc_loss(erc_base_mode("erc_dapo")))
        added.append("erc_dapo")
    return added


def register() -> None:
    """Add `gppo` and the ERC variants to verl's policy-loss registry (the plugin calls this in every process)."""
    if "gppo" not in POLICY_LOSS_REGISTRY:
        register_policy_loss("gppo")(compute_policy_loss_gppo)
    register_erc_variants()
