"""ERC-DAPO, GPPO and ERC-GPPO against hand-computed values and gradients (CPU, no Ray)."""

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from erc_verl.core.losses import entropy_ratio_mask
from erc_verl.core.worker_loss import MissingEntropyError
from tests.verl_config import actor_config

# Five tokens of one response, old_log_prob = 0 so r = exp(log_prob); eps_low 0.2, eps_high 0.28, c 3.
#   t0: r=1.1, A=+1  inside the clip range      loss -1.1  vanilla grad -A r = -1.1  gppo -1.1
#   t1: r=1.5, A=+1  clipped above (1.28)       loss -1.28 vanilla grad 0            gppo -A (1+eps_high) = -1.28
#   t2: r=0.5, A=-1  clipped below (0.8)        loss  0.8  vanilla grad 0            gppo -A (1-eps_low) = +0.8
#   t3: r=1.0, A=-1  inside                     loss  1.0  vanilla grad -A r = +1.0  gppo +1.0
#   t4: r=4.0, A=-1  dual clip (c=3)            loss  3.0  vanilla grad 0            gppo 0
RATIOS = [1.1, 1.5, 0.5, 1.0, 4.0]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, -1.0]
TOKEN_LOSSES = [-1.1, -1.28, 0.8, 1.0, 3.0]
VANILLA_GRADS = [-1.1, 0.0, 0.0, 1.0, 0.0]
GPPO_GRADS = [-1.1, -1.28, 0.8, 1.0, 0.0]
# entropy ratios with beta = 0.05: t3 is dropped high (1.06 >= 1.05), t4 dropped low (0.9 <= 0.95)
ENTROPY = [1.0, 1.04, 0.96, 1.06, 0.9]
OLD_ENTROPY = [1.0] * 5
ERC_KEEP = [1.0, 1.0, 1.0, 0.0, 0.0]


def _inputs(ratios=RATIOS, advantages=ADVANTAGES):
    log_prob = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    return dict(
        old_log_prob=torch.zeros_like(log_prob),
        log_prob=log_prob,
        advantages=torch.tensor([advantages], dtype=torch.float64),
        response_mask=torch.ones_like(log_prob, dtype=torch.bool),
    )


def _entropies(entropy=ENTROPY, old=OLD_ENTROPY):
    return dict(entropy=torch.tensor([entropy], dtype=torch.float64), old_entropy=torch.tensor([old]))


def _run(loss_mode, config, **kwargs):
    inputs = _inputs()
    loss, metrics = get_policy_loss_fn(loss_mode)(**inputs, loss_agg_mode="token-mean", config=config, **kwargs)
    loss.backward()
    return loss.item(), inputs["log_prob"].grad[0].tolist(), metrics


@pytest.fixture(scope="module")
def config():
    return actor_config(
        "actor_rollout_ref.actor.clip_ratio_low=0.2",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.clip_ratio_c=3.0",
        "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_low=0.05",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_high=0.05",
    )


def test_vanilla_hand_computed(config):
    value, grad, metrics = _run("vanilla", config)
    assert value == pytest.approx(sum(TOKEN_LOSSES) / 5)
    assert grad == pytest.approx([g / 5 for g in VANILLA_GRADS])
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 5)  # t1 and t2 are clipped by the PPO max
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(1 / 5)  # t4 by the dual clip


def test_gppo_keeps_bounded_gradient_on_clipped_tokens(config):
    value, grad, metrics = _run("gppo", config)
    assert value == pytest.approx(sum(TOKEN_LOSSES) / 5)
    assert grad == pytest.approx([g / 5 for g in GPPO_GRADS])
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 5)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("loss_mode,base_grads", [("erc_dapo", VANILLA_GRADS), ("erc_gppo", GPPO_GRADS)])
def test_erc_drops_gradient_outside_band(config, loss_mode, base_grads):
    value, grad, metrics = _run(loss_mode, config, **_entropies())
    # value unchanged, dropped tokens still in the token-mean denominator
    assert value == pytest.approx(sum(TOKEN_LOSSES) / 5)
    assert grad == pytest.approx([g * k / 5 for g, k in zip(base_grads, ERC_KEEP)])
    assert grad[3] == 0.0 and grad[4] == 0.0
    assert metrics["actor/erc_clipfrac"] == pytest.approx(2 / 5)
    assert metrics["actor/erc_clipfrac_low"] == pytest.approx(1 / 5)
    assert metrics["actor/erc_clipfrac_high"] == pytest.approx(1 / 5)
    assert metrics["actor/entropy_ratio_min"] == pytest.approx(0.9)
    assert metrics["actor/entropy_ratio_max"] == pytest.approx(1.06)
    assert metrics["actor/entropy_ratio_mean"] == pytest.approx(sum(ENTROPY) / 5)
    assert metrics["actor/erc_nonfinite_frac"] == 0.0


@pytest.mark.parametrize("erc_mode,base_mode", [("erc_dapo", "vanilla"), ("erc_gppo", "gppo")])
def test_wide_band_equals_base_loss(erc_mode, base_mode):
    wide = actor_config(
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_low=0.999999",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_high=1e9",
    )
    gen = torch.Generator().manual_seed(0)
    shape = (4, 7)
    old_log_prob = -torch.rand(shape, generator=gen) * 3
    log_prob_data = old_log_prob + torch.randn(shape, generator=gen) * 0.3
    advantages = torch.randn(shape, generator=gen)
    response_mask = torch.rand(shape, generator=gen) > 0.2
    entropy = torch.rand(shape, generator=gen) * 2 + 0.1
    old_entropy = entropy * (0.5 + torch.rand(shape, generator=gen))

    results = []
    for mode, extra in ((base_mode, {}), (erc_mode, dict(entropy=entropy, old_entropy=old_entropy))):
        log_prob = log_prob_data.clone().requires_grad_(True)
        loss, metrics = get_policy_loss_fn(mode)(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=response_mask,
            loss_agg_mode="token-mean",
            config=wide,
            **extra,
        )
        loss.backward()
        results.append((loss.detach(), log_prob.grad, metrics))
    (base_loss, base_grad, base_metrics), (erc_loss, erc_grad, erc_metrics) = results
    assert torch.equal(base_loss, erc_loss)
    assert torch.equal(base_grad, erc_grad)
    assert base_grad.abs().sum() > 0
    assert erc_metrics["actor/erc_clipfrac"] == 0.0
    for key, value in base_metrics.items():
        assert erc_metrics[key] == value


def test_band_boundaries_are_strict():
    # beta = 0.25 / 0.5: 0.75 and 1.5 are exact in binary, so "on the bound" is tested exactly
    below, above = torch.tensor(0.75), torch.tensor(1.5)
    one, zero, two = torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.0)
    entropy = torch.stack(
        [
            below,
            torch.nextafter(below, one),  # just inside the lower bound (next float32)
            torch.nextafter(below, zero),  # just outside
            above,
            torch.nextafter(above, one),  # just inside the upper bound
            torch.nextafter(above, two),  # just outside
        ]
    )
    keep, metrics = entropy_ratio_mask(
        entropy, torch.ones_like(entropy), torch.ones_like(entropy, dtype=torch.bool), 0.25, 0.5
    )
    assert keep.tolist() == [False, True, False, False, True, False]
    assert metrics["actor/erc_clipfrac_low"] == pytest.approx(2 / 6)
    assert metrics["actor/erc_clipfrac_high"] == pytest.approx(2 / 6)


def test_zero_and_nonfinite_entropies(config):
    # t0: both zero -> rho = 1e-8/1e-8 = 1, kept; t1: current 0 -> rho ~ 0, dropped low;
    # t2: old 0 -> rho ~ 1e8, dropped high; t3: NaN; t4: inf old and inf current -> NaN ratio
    entropy = [0.0, 0.0, 0.5, float("nan"), float("inf")]
    old = [0.0, 0.7, 0.0, 1.0, float("inf")]
    value, grad, metrics = _run("erc_gppo", config, **_entropies(entropy, old))
    assert math.isfinite(value) and all(math.isfinite(g) for g in grad)
    assert grad == pytest.approx([GPPO_GRADS[0] / 5, 0.0, 0.0, 0.0, 0.0])
    assert metrics["actor/erc_nonfinite_frac"] == pytest.approx(2 / 5)
    assert metrics["actor/erc_clipfrac_low"] == pytest.approx(1 / 5)
    assert metrics["actor/erc_clipfrac_high"] == pytest.approx(1 / 5)
    assert metrics["actor/erc_clipfrac"] == pytest.approx(4 / 5)
    assert all(math.isfinite(v) for v in metrics.values())


def test_masked_tokens_do_not_count():
    entropy = torch.tensor([[1.0, 2.0, 1.0, 0.1]])
    mask = torch.tensor([[True, False, True, False]])
    keep, metrics = entropy_ratio_mask(entropy, torch.ones_like(entropy), mask, 0.05, 0.05)
    assert metrics["actor/erc_clipfrac"] == 0.0
    assert metrics["actor/entropy_ratio_max"] == pytest.approx(1.0)
    _, empty = entropy_ratio_mask(entropy, torch.ones_like(entropy), torch.zeros_like(mask), 0.05, 0.05)
    assert empty["actor/erc_clipfrac"] == 0.0 and empty["actor/entropy_ratio_mean"] == 1.0


def test_misaligned_entropies_are_rejected(config):
    with pytest.raises(ValueError, match="aligned"):
        _run("erc_dapo", config, entropy=torch.ones(1, 4), old_entropy=torch.ones(1, 5))


def test_erc_without_entropies_fails_loudly(config):
    with pytest.raises(MissingEntropyError, match="erc-verl train"):
        _run("erc_dapo", config)
