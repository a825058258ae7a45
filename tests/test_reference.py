"""`erc_verl.core.reference` (ERC on one page) is the specification: it reproduces the hand-worked table, and the
losses registered in verl (computed another way: gated log-probs through verl's own losses) equal it in value,
gradient and metrics on random batches."""

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from erc_verl.core import reference as ref
from tests.test_losses import ADVANTAGES, ENTROPY, ERC_KEEP, GPPO_GRADS, OLD_ENTROPY, RATIOS, TOKEN_LOSSES, VANILLA_GRADS
from tests.verl_config import actor_config

EPS_LOW, EPS_HIGH, CLIP_C = 0.2, 0.28, 3.0
BETA = 0.05
TOKEN_LOSS = {"vanilla": ref.dapo_token_loss, "gppo": ref.gppo_token_loss}
BASE = {"erc_dapo": "vanilla", "erc_gppo": "gppo"}


@pytest.fixture(scope="module")
def config():
    return actor_config(
        f"actor_rollout_ref.actor.clip_ratio_low={EPS_LOW}",
        f"actor_rollout_ref.actor.clip_ratio_high={EPS_HIGH}",
        f"actor_rollout_ref.actor.clip_ratio_c={CLIP_C}",
        "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
        f"+actor_rollout_ref.actor.policy_loss.erc_beta_low={BETA}",
        f"+actor_rollout_ref.actor.policy_loss.erc_beta_high={BETA}",
    )


def _table():
    log_prob = torch.tensor([[math.log(r) for r in RATIOS]], dtype=torch.float64, requires_grad=True)
    return log_prob, torch.zeros_like(log_prob), torch.tensor([ADVANTAGES], dtype=torch.float64)


@pytest.mark.parametrize("base,grads", [("vanilla", VANILLA_GRADS), ("gppo", GPPO_GRADS)])
@pytest.mark.parametrize("erc", [False, True])
def test_reference_reproduces_the_hand_worked_table(base, grads, erc):
    log_prob, old_log_prob, advantages = _table()
    mask = torch.ones_like(log_prob, dtype=torch.bool)
    token_loss = TOKEN_LOSS[base](log_prob, old_log_prob, advantages, EPS_LOW, EPS_HIGH, CLIP_C)
    assert token_loss.detach()[0].tolist() == pytest.approx(TOKEN_LOSSES)
    keep = ref.erc_keep(ref.entropy_ratio(torch.tensor([ENTROPY]), torch.tensor([OLD_ENTROPY])), BETA, BETA)
    assert keep[0].tolist() == [bool(k) for k in ERC_KEEP]
    loss = ref.erc_loss(token_loss, keep, mask) if erc else ref.token_mean(token_loss, mask)
    loss.backward()
    assert loss.item() == pytest.approx(sum(TOKEN_LOSSES) / 5)
    expected = [g * (k if erc else 1) / 5 for g, k in zip(grads, ERC_KEEP)]
    assert log_prob.grad[0].tolist() == pytest.approx(expected)


def test_reference_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [50.0, 0.0]], dtype=torch.float64)
    expected = [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    assert ref.token_entropy(logits).tolist() == pytest.approx(expected, abs=1e-12)


def _random_batch(seed: int, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 6)
    logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    old_entropy = ref.token_entropy(logits) * (1 + 0.06 * torch.randn(shape, generator=g, dtype=torch.float64))
    old_log_prob = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    log_prob = old_log_prob + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) > 0.25
    mask[0, 0] = True
    return logits, old_entropy, log_prob, old_log_prob, advantages, mask


@pytest.mark.parametrize("loss_mode", ["erc_dapo", "erc_gppo"])
@pytest.mark.parametrize("seed", range(8))
def test_registered_losses_equal_the_reference(config, loss_mode, seed):
    logits, old_entropy, log_prob_data, old_log_prob, advantages, mask = _random_batch(seed)
    entropy = ref.token_entropy(logits)

    expected_log_prob = log_prob_data.clone().requires_grad_(True)
    token_loss = TOKEN_LOSS[BASE[loss_mode]](expected_log_prob, old_log_prob, advantages, EPS_LOW, EPS_HIGH, CLIP_C)
    rho = ref.entropy_ratio(entropy, old_entropy)
    keep = ref.erc_keep(rho, BETA, BETA)
    expected = ref.erc_loss(token_loss, keep, mask)
    expected.backward()
    expected_metrics = ref.erc_metrics(rho, keep, mask, BETA, BETA)

    log_prob = log_prob_data.clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=mask,
        loss_agg_mode="token-mean", config=config, entropy=entropy, old_entropy=old_entropy,
    )
    loss.backward()
    assert keep[mask].any() and (~keep[mask]).any(), "the batch must exercise both sides of the band"
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_prob.grad, expected_log_prob.grad, rtol=1e-12, atol=1e-12)
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key  # erc-verl takes the ratio in float32
