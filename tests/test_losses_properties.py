"""Property-based checks of the ERC losses over random shapes, masks and values, bad numbers included."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from tests.verl_config import actor_config

SPECIAL = [0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 5e-324, 1e-8]


@pytest.fixture(scope="module")
def config():
    return actor_config(
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.clip_ratio_c=10.0",
        "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_low=0.05",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_high=0.05",
    )


@st.composite
def batches(draw, bad_numbers: bool):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, cols)
    old_log_prob = -torch.rand(shape, generator=gen, dtype=torch.float64) * 5
    log_prob = old_log_prob + torch.randn(shape, generator=gen, dtype=torch.float64) * draw(st.floats(0, 2))
    advantages = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) < draw(st.floats(0, 1))  # includes all-masked micro-batches
    old_entropy = torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    entropy = old_entropy * (1 + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.08)
    if bad_numbers:
        for tensor in (entropy, old_entropy, log_prob, old_log_prob, advantages):
            hits = torch.rand(shape, generator=gen) < 0.15
            values = torch.tensor(SPECIAL, dtype=torch.float64)[torch.randint(len(SPECIAL), shape, generator=gen)]
            tensor[hits] = values[hits]
    return dict(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=mask,
        entropy=entropy, old_entropy=old_entropy,
    )


def _loss_and_grad(mode, config, batch, log_prob):
    kwargs = {k: v for k, v in batch.items() if k != "log_prob"}
    if not mode.startswith("erc_"):
        kwargs.pop("entropy"), kwargs.pop("old_entropy")
    leaf = log_prob.clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn(mode)(log_prob=leaf, loss_agg_mode="token-mean", config=config, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches(bad_numbers=True), mode=st.sampled_from(["erc_dapo", "erc_gppo"]))
def test_bad_numbers_never_reach_loss_or_gradient(config, batch, mode):
    loss, grad, metrics = _loss_and_grad(mode, config, batch, batch["log_prob"])
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    unusable = ~(
        torch.isfinite(batch["log_prob"]) & torch.isfinite(batch["old_log_prob"]) & torch.isfinite(batch["advantages"])
    )
    assert torch.all(grad[unusable] == 0)
    assert 0.0 <= metrics["actor/erc_clipfrac"] <= 1.0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches(bad_numbers=False), erc_mode=st.sampled_from(["erc_dapo", "erc_gppo"]))
def test_dropped_tokens_have_zero_gradient_kept_tokens_the_base_gradient(config, batch, erc_mode):
    base_mode = {"erc_dapo": "vanilla", "erc_gppo": "gppo"}[erc_mode]
    erc_loss, erc_grad, _ = _loss_and_grad(erc_mode, config, batch, batch["log_prob"])
    base_loss, base_grad, _ = _loss_and_grad(base_mode, config, batch, batch["log_prob"])
    rho = (batch["entropy"].float() + 1e-8) / (batch["old_entropy"].float() + 1e-8)
    keep = (rho > 0.95) & (rho < 1.05)
    assert torch.equal(erc_grad[~keep], torch.zeros_like(erc_grad[~keep]))
    assert torch.equal(erc_grad[keep], base_grad[keep])
    if batch["response_mask"].any():
        assert erc_loss == base_loss  # dropping changes gradients, never the loss value
    else:
        assert erc_loss == 0
