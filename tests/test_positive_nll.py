"""The positive-sample NLL term (`positive_nll_coeff`): against hand-computed values and gradients, with verl's own
micro-batch layout, for any loss mode, independent of micro-batching and data-parallel ranks."""

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss

from erc_verl.core.worker_loss import (
    POSITIVE_NLL_METRIC,
    POSITIVE_NUM_SEQUENCES,
    POSITIVE_NUM_TOKENS,
    MissingPositiveCountError,
    extended_ppo_loss,
    positive_counts,
)
from tests.verl_config import actor_config

PROMPT_LENS = [3, 2, 4, 2]
RESPONSE_LENS = [4, 2, 3, 5]
# correct, wrong, correct, no </think>: only rows 0 and 2 are positive (7 tokens). Row 3's advantage is positive
# (-0.5 beats -1 in its group): the official predicate is the reward, not the advantage.
REWARDS = [1.0, -1.0, 1.0, -0.5]
ADVANTAGES = [1.0, -1.0, 0.8, 0.3]
COEFF = 0.1
NLL_OVERRIDES = (
    "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
    f"+actor_rollout_ref.actor.policy_loss.positive_nll_coeff={COEFF}",
)
ERC_OVERRIDES = (
    "actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo",
    "+actor_rollout_ref.actor.policy_loss.erc_beta_low=0.05",
    "+actor_rollout_ref.actor.policy_loss.erc_beta_high=0.05",
)


def _jagged(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _full_log_probs():
    gen = torch.Generator().manual_seed(0)
    return [-torch.rand(p + r, generator=gen, dtype=torch.float64) - 0.1 for p, r in zip(PROMPT_LENS, RESPONSE_LENS)]


def _response_view(full, row):
    """Response token j of a row is predicted at position prompt_len + j - 1."""
    return full[PROMPT_LENS[row] - 1 : PROMPT_LENS[row] - 1 + RESPONSE_LENS[row]]


def _micro_batch(rows, full, counts=None, dp_size=1, entropy_ratio=None):
    """(model_output, data, leaf log-prob tensors) for `rows`, laid out as verl's engine hands a micro-batch to the
    loss: whole sequences in the model output, per-response jagged tensors, global batch info as non-tensors."""
    leaves = [full[i].clone().requires_grad_(True) for i in rows]
    seq_lens = [PROMPT_LENS[i] + RESPONSE_LENS[i] for i in rows]
    offsets = torch.tensor([0] + seq_lens).cumsum(0)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(torch.cat(leaves), offsets)}
    responses = [RESPONSE_LENS[i] for i in rows]
    rm_scores = [torch.zeros(r, dtype=torch.float32) for r in responses]
    for scores, i in zip(rm_scores, rows):
        scores[-1] = REWARDS[i]  # verl's reward loop puts the score at the last response token
    fields = {
        "prompts": _jagged([torch.ones(PROMPT_LENS[i], dtype=torch.long) for i in rows]),
        "responses": _jagged([torch.ones(r, dtype=torch.long) for r in responses]),
        "response_mask": _jagged([torch.ones(r, dtype=torch.long) for r in responses]),
        "old_log_probs": _jagged([_response_view(full[i], i).detach() + 0.05 for i in rows]),
        "advantages": _jagged([torch.full((RESPONSE_LENS[i],), ADVANTAGES[i], dtype=torch.float64) for i in rows]),
        "rm_scores": _jagged(rm_scores),
    }
    if entropy_ratio is not None:  # current / old entropy at every token
        current = [torch.ones(PROMPT_LENS[i] + RESPONSE_LENS[i], dtype=torch.float64) for i in rows]
        model_output["entropy"] = torch.nested.nested_tensor_from_jagged(torch.cat(current), offsets)
        fields["entropy"] = _jagged([torch.full((r,), 1.0 / entropy_ratio, dtype=torch.float64) for r in responses])
    non_tensors = {"dp_size": dp_size, "batch_num_tokens": sum(RESPONSE_LENS), "global_batch_size": len(REWARDS)}
    if counts is not None:
        non_tensors.update({POSITIVE_NUM_TOKENS: counts[0], POSITIVE_NUM_SEQUENCES: counts[1]})
    return model_output, tu.get_tensordict(tensor_dict=fields, non_tensor_dict=non_tensors), leaves


def _hand_nll(full, agg="token-mean"):
    positive = [i for i, r in enumerate(REWARDS) if r == 1.0]
    nlls = [-_response_view(full[i], i) for i in positive]
    if agg == "token-mean":
        return float(sum(n.sum() for n in nlls) / sum(len(n) for n in nlls))
    return float(sum(n.mean() for n in nlls) / len(nlls))  # seq-mean-token-mean


def _grads(leaves):
    return [leaf.grad.clone() for leaf in leaves]


def test_counts_follow_the_reward_not_the_advantage():
    full = _full_log_probs()
    _, data, _ = _micro_batch([0, 1, 2, 3], full)
    assert positive_counts(data, 1.0) == (RESPONSE_LENS[0] + RESPONSE_LENS[2], 2)
    assert positive_counts(data, -0.5) == (RESPONSE_LENS[3], 1)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_and_gradient_by_hand(agg):
    """loss = verl's ppo_loss + 0.1 x NLL; d(0.1 x NLL)/d log pi = -0.1 / 7 on each positive response token."""
    config = actor_config(*NLL_OVERRIDES, f"actor_rollout_ref.actor.loss_agg_mode={agg}")
    full = _full_log_probs()
    model_output, data, leaves = _micro_batch([0, 1, 2, 3], full, counts=(7, 2))
    loss, metrics = extended_ppo_loss(config, model_output, data)
    loss.backward()
    ext_grads = _grads(leaves)
    model_output, data, leaves = _micro_batch([0, 1, 2, 3], full, counts=(7, 2))
    base_loss, _ = ppo_loss(config, model_output, data)
    base_loss.backward()

    nll = _hand_nll(full, agg)
    assert metrics[POSITIVE_NLL_METRIC].aggregate() == pytest.approx(nll, rel=1e-12)
    assert (loss - base_loss).item() == pytest.approx(COEFF * nll, rel=1e-9)
    for row, (ext, base) in enumerate(zip(ext_grads, _grads(leaves))):
        expected = torch.zeros_like(ext)
        if REWARDS[row] == 1.0:
            per_token = COEFF / 7 if agg == "token-mean" else COEFF / (2 * RESPONSE_LENS[row])
            _response_view(expected, row).fill_(-per_token)
        torch.testing.assert_close(ext - base, expected, rtol=0, atol=1e-12)


def test_independent_of_micro_batches_and_ranks():
    """Micro-batches and data-parallel ranks (FSDP averages rank gradients) add up to the whole mini-batch's term."""
    config = actor_config(*NLL_OVERRIDES)
    full = _full_log_probs()
    nll = _hand_nll(full)

    def nll_term(rows, dp_size):
        model_output, data, leaves = _micro_batch(rows, full, counts=(7, 2), dp_size=dp_size)
        loss, metrics = extended_ppo_loss(config, model_output, data)
        ppo, _ = ppo_loss(config, *_micro_batch(rows, full, counts=(7, 2), dp_size=dp_size)[:2])
        return (loss - ppo).item() / COEFF, metrics[POSITIVE_NLL_METRIC].aggregate()

    one = nll_term([0, 1, 2, 3], 1)
    micro = [nll_term(rows, 1) for rows in ([0, 1], [2], [3])]
    ranks = [nll_term(rows, 2) for rows in ([0, 3], [1, 2])]
    assert one[0] == pytest.approx(nll) and one[1] == pytest.approx(nll)
    assert sum(term for term, _ in micro) == pytest.approx(nll)
    assert sum(term for term, _ in ranks) / 2 == pytest.approx(nll)
    # verl's SUM metrics: summed over a rank's micro-batches, averaged over ranks
    assert sum(metric for _, metric in micro) == pytest.approx(nll)


def test_no_positive_response_adds_nothing():
    config = actor_config(*NLL_OVERRIDES)
    model_output, data, leaves = _micro_batch([1, 3], _full_log_probs(), counts=(0, 0))
    loss, metrics = extended_ppo_loss(config, model_output, data)
    loss.backward()
    assert metrics[POSITIVE_NLL_METRIC].aggregate() == 0.0
    assert torch.isfinite(loss) and all(torch.isfinite(leaf.grad).all() for leaf in leaves)


def test_nll_term_is_outside_the_erc_mask():
    """With every token outside the ERC band the policy gradient is zero; the NLL still trains the positives."""
    config = actor_config(*NLL_OVERRIDES, *ERC_OVERRIDES)
    full = _full_log_probs()
    model_output, data, leaves = _micro_batch([0, 1, 2, 3], full, counts=(7, 2), entropy_ratio=1.5)
    loss, metrics = extended_ppo_loss(config, model_output, data)
    loss.backward()
    assert metrics["actor/erc_clipfrac"].aggregate() == 1.0
    for row, grad in enumerate(_grads(leaves)):
        expected = torch.zeros_like(grad)
        if REWARDS[row] == 1.0:
            _response_view(expected, row).fill_(-COEFF / 7)
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_off_by_default_and_without_counts_it_refuses():
    full = _full_log_probs()
    stock = actor_config()
    model_output, data, _ = _micro_batch([0, 1, 2, 3], full)
    loss, metrics = extended_ppo_loss(stock, model_output, data)
    assert POSITIVE_NLL_METRIC not in metrics
    assert loss.item() == ppo_loss(stock, *_micro_batch([0, 1, 2, 3], full)[:2])[0].item()
    with pytest.raises(MissingPositiveCountError, match="erc-verl train"):
        extended_ppo_loss(actor_config(*NLL_OVERRIDES), *_micro_batch([0, 1, 2, 3], full)[:2])


def test_setting_the_coefficient_is_all_it_takes():
    from erc_verl.core.config import ErcConfigError, check_erc_config, enable_erc
    from tests.verl_config import verl_config

    cfg = enable_erc(verl_config("+actor_rollout_ref.actor.policy_loss.positive_nll_coeff=0.1"))
    assert cfg.actor_rollout_ref.actor.policy_loss._target_ == "erc_verl.core.config.ErcPolicyLossConfig"
    assert cfg.trainer.v1.trainer_mode == "erc_sync"  # installs the loss and counts the positive tokens
    assert cfg.actor_rollout_ref.actor.calculate_entropy is False  # no ERC: no entropy needed
    cfg.actor_rollout_ref.actor.policy_loss._target_ = "verl.workers.config.PolicyLossConfig"
    with pytest.raises(ErcConfigError, match="positive_nll_coeff need erc_verl.core.config.ErcPolicyLossConfig"):
        check_erc_config(cfg)
    with pytest.raises(ErcConfigError, match="positive_nll_coeff=nan: must be a finite number >= 0"):
        enable_erc(verl_config("+actor_rollout_ref.actor.policy_loss.positive_nll_coeff=nan"))
    stock_mode = verl_config("+actor_rollout_ref.actor.policy_loss.positive_nll_coeff=0.1",
                             "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig")
    with pytest.raises(ErcConfigError, match="trainer.v1.trainer_mode='sync': positive_nll_coeff=0.1 needs one of"):
        check_erc_config(stock_mode)
