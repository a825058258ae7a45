"""Both entropies reach the ERC loss through verl's real loss call site, with verl's own data layouts.

The actor's micro-batch arrives as verl's engine hands it to the loss function: no-padding (jagged nested)
tensors, model outputs over whole sequences (prompt + response), response fields per response token.
"""

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss

from erc_verl.core.config import ErcPolicyLossConfig, check_erc_config, enable_erc
from erc_verl.core.config import ErcConfigError
from erc_verl.core.config import ERC_TRAINER_MODES, erc_trainer_mode
from erc_verl.core.trainer_modes import ERC_TRAINERS
from erc_verl.core.worker_loss import entropy_aware_ppo_loss
from tests.verl_config import actor_config, verl_config

PROMPT_LENS = [3, 2, 4]
RESPONSE_LENS = [4, 2, 3]
ERC_OVERRIDES = (
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo",
    "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
    "+actor_rollout_ref.actor.policy_loss.erc_beta_low=0.05",
    "+actor_rollout_ref.actor.policy_loss.erc_beta_high=0.05",
)


def _jagged(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _micro_batch(seed=0, prompt_lens=PROMPT_LENS, response_lens=RESPONSE_LENS, batch_num_tokens=None, dp_size=1):
    """(model_output, data, per-response padded views) in verl 0.9.1's no-padding layout."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + r for p, r in zip(prompt_lens, response_lens)]
    # model outputs over whole sequences; position t predicts token t+1, so response token j of a sample is
    # read at position prompt_len + j - 1
    full_log_probs = [-torch.rand(n, generator=gen, dtype=torch.float64) for n in seq_lens]
    full_entropy = [torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 for n in seq_lens]
    cur_entropy = [e[p - 1 : p - 1 + r] for e, p, r in zip(full_entropy, prompt_lens, response_lens)]
    # old entropy: every second response token moves by 10% (outside a 5% band), the rest by 1%
    old_entropy = [
        torch.stack([c[j] * (1.1 if j % 2 else 1.01) for j in range(len(c))]) for c in cur_entropy
    ]
    old_log_probs = [
        lp[p - 1 : p - 1 + r] + 0.05 * torch.randn(r, generator=gen, dtype=torch.float64)
        for lp, p, r in zip(full_log_probs, prompt_lens, response_lens)
    ]
    advantages = [torch.randn(1, generator=gen, dtype=torch.float64).expand(r).clone() for r in response_lens]

    log_probs_values = torch.cat(full_log_probs).requires_grad_(True)
    offsets = torch.tensor([0] + seq_lens).cumsum(0)
    model_output = {
        "log_probs": torch.nested.nested_tensor_from_jagged(log_probs_values, offsets),
        "entropy": torch.nested.nested_tensor_from_jagged(torch.cat(full_entropy).requires_grad_(True), offsets),
    }
    data = tu.get_tensordict(
        tensor_dict={
            "prompts": _jagged([torch.ones(p, dtype=torch.long) for p in prompt_lens]),
            "responses": _jagged([torch.ones(r, dtype=torch.long) for r in response_lens]),
            "response_mask": _jagged([torch.ones(r, dtype=torch.long) for r in response_lens]),
            "old_log_probs": _jagged(old_log_probs),
            "advantages": _jagged(advantages),
            "entropy": _jagged(old_entropy),
        },
        non_tensor_dict={"dp_size": dp_size, "batch_num_tokens": batch_num_tokens or sum(response_lens),
                         "global_batch_size": 3},
    )
    return model_output, data, log_probs_values


def _padded(rows):
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _values(metrics):
    return {k: (v.aggregate() if hasattr(v, "aggregate") else v) for k, v in metrics.items()}


def test_erc_receives_both_entropies_aligned_with_log_prob():
    config = actor_config(*ERC_OVERRIDES)
    model_output, data, log_probs_values = _micro_batch()
    loss, metrics = entropy_aware_ppo_loss(config, model_output, data)
    loss.backward()

    # Expected by hand: every odd response token has rho = 1/1.1 (dropped low), every even one 1/1.01 (kept).
    dropped = sum(r // 2 for r in RESPONSE_LENS)
    values = _values(metrics)
    assert values["actor/erc_clipfrac"] == pytest.approx(dropped / sum(RESPONSE_LENS))
    assert values["actor/erc_clipfrac_low"] == pytest.approx(dropped / sum(RESPONSE_LENS))
    assert values["actor/entropy_ratio_min"] == pytest.approx(1 / 1.1)
    assert values["actor/entropy_ratio_max"] == pytest.approx(1 / 1.01)

    # Gradient reaches exactly the kept response positions of the whole-sequence log-probs.
    grad = log_probs_values.grad
    start = 0
    for p, r in zip(PROMPT_LENS, RESPONSE_LENS):
        seq = grad[start : start + p + r]
        response_grad = seq[p - 1 : p - 1 + r]
        assert torch.all(response_grad[1::2] == 0)
        assert torch.all(response_grad[0::2] != 0)
        assert torch.all(seq[: p - 1] == 0) and torch.all(seq[p - 1 + r :] == 0)
        start += p + r

    # The current entropy is a mask only: with entropy_coeff 0 nothing is backpropagated into it.
    assert model_output["entropy"].values().grad is None


def test_erc_metrics_are_the_mini_batchs_however_it_is_split():
    """Micro-batches of unequal size on two ranks give the mini-batch's token fractions (as verl's pg_loss), not
    verl's mean of micro-batch values."""
    from verl.utils.metric import Metric

    config = actor_config(*ERC_OVERRIDES)
    # two ranks, two micro-batches each (as verl's dynamic batch size balances them), of 1 + 6 and 3 + 2 response
    # tokens; every odd response token is dropped
    ranks = [[([3], [1]), ([2], [6])], [([4], [3]), ([2], [2])]]
    total = sum(r for micro_batches in ranks for _, (r,) in micro_batches)
    dropped = sum(r // 2 for micro_batches in ranks for _, (r,) in micro_batches)
    keys = ("actor/erc_clipfrac", "actor/erc_clipfrac_low", "actor/entropy_ratio_min", "actor/entropy_ratio_max")
    per_rank = []
    for micro_batches in ranks:
        collected = {}
        for prompt_lens, response_lens in micro_batches:
            model_output, data, _ = _micro_batch(0, prompt_lens, response_lens, batch_num_tokens=total, dp_size=2)
            metrics = entropy_aware_ppo_loss(config, model_output, data)[1]
            for key in keys:
                collected.setdefault(key, metrics[key].init_list()).append(metrics[key])  # as verl's engine does
        per_rank.append(collected)
    values = {key: Metric.aggregate_dp([rank[key] for rank in per_rank]) for key in keys}  # verl's reduction
    assert values["actor/erc_clipfrac"] == pytest.approx(dropped / total)
    assert values["actor/erc_clipfrac_low"] == pytest.approx(dropped / total)
    # what verl's mean of micro-batch values would report: 1/3, not 5/12
    mean_of_micro_batches = sum(r // 2 / r for micro_batches in ranks for _, (r,) in micro_batches) / 4
    assert abs(mean_of_micro_batches - dropped / total) > 0.05
    assert values["actor/entropy_ratio_min"] == pytest.approx(1 / 1.1)
    assert values["actor/entropy_ratio_max"] == pytest.approx(1 / 1.01)


def test_same_loss_as_direct_call_with_padded_entropies():
    """The delivered tensors are exactly the padded response views that ppo_loss uses for log_prob."""
    config = actor_config(*ERC_OVERRIDES)
    model_output, data, _ = _micro_batch(seed=3)
    loss, metrics = entropy_aware_ppo_loss(config, model_output, data)

    log_prob = _padded(
        [v[p - 1 : p - 1 + r] for v, p, r in zip(model_output["log_probs"].unbind(), PROMPT_LENS, RESPONSE_LENS)]
    )
    entropy = _padded(
        [v[p - 1 : p - 1 + r] for v, p, r in zip(model_output["entropy"].unbind(), PROMPT_LENS, RESPONSE_LENS)]
    )
    padded = data.select("old_log_probs", "advantages", "entropy", "response_mask").to_padded_tensor()
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    direct_loss, direct_metrics = get_policy_loss_fn("erc_dapo")(
        old_log_prob=padded["old_log_probs"],
        log_prob=log_prob.detach(),
        advantages=padded["advantages"],
        response_mask=padded["response_mask"].bool(),
        loss_agg_mode="token-mean",
        config=config,
        entropy=entropy.detach(),
        old_entropy=padded["entropy"],
    )
    assert loss.item() == pytest.approx(direct_loss.item(), rel=1e-12)
    values = _values(metrics)
    for key, value in direct_metrics.items():
        assert values[key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.parametrize("entropy_coeff", [0.0, 0.01])
def test_vanilla_matches_upstream_ppo_loss(entropy_coeff):
    """Drift guard: for a non-ERC loss the worker loss is verl's ppo_loss, value, gradient and metrics."""
    config = actor_config(
        "actor_rollout_ref.actor.clip_ratio_high=0.28", f"actor_rollout_ref.actor.entropy_coeff={entropy_coeff}"
    )
    results = []
    for fn in (ppo_loss, entropy_aware_ppo_loss):
        model_output, data, log_probs_values = _micro_batch(seed=1)
        loss, metrics = fn(config, model_output, data)
        loss.backward()
        results.append((loss.item(), log_probs_values.grad.clone(), _values(metrics)))
    (ref_loss, ref_grad, ref_metrics), (loss, grad, metrics) = results
    assert loss == ref_loss
    assert torch.equal(grad, ref_grad)
    # with entropy_coeff 0 the (zero-weighted) entropy bonus term is left out on purpose
    expected_keys = set(ref_metrics) - ({"actor/entropy_loss"} if entropy_coeff == 0 else set())
    assert set(metrics) == expected_keys
    for key in expected_keys:
        assert metrics[key] == ref_metrics[key], key


def test_missing_entropies_fail_loudly():
    config = actor_config(*ERC_OVERRIDES)
    model_output, data, _ = _micro_batch()
    with pytest.raises(RuntimeError, match="calculate_entropy"):
        entropy_aware_ppo_loss(config, {"log_probs": model_output["log_probs"]}, data)
    with pytest.raises(RuntimeError, match="old-policy `entropy`"):
        entropy_aware_ppo_loss(config, model_output, data.exclude("entropy"))
    # verl's stock loss call site delivers no entropies: the ERC loss must refuse, never run as plain DAPO
    with pytest.raises(RuntimeError, match="erc-verl train"):
        ppo_loss(config, model_output, data)


# ---- start-up configuration ---------------------------------------------------------------------------------


def test_enable_erc_turns_on_what_erc_needs():
    cfg = enable_erc(verl_config("actor_rollout_ref.actor.policy_loss.loss_mode=erc_gppo"))
    assert cfg.trainer.v1.trainer_mode == "erc_sync"
    assert cfg.actor_rollout_ref.actor.calculate_entropy is True
    # a mask only, computed in chunks: on verl's default remove-padding path the ERC workers' engine computes it
    # without autograd (erc_verl.core.entropy), so verl's checkpoint must not wrap it
    assert cfg.actor_rollout_ref.model.use_remove_padding is True
    assert cfg.actor_rollout_ref.actor.entropy_checkpointing is False
    assert cfg.actor_rollout_ref.actor.fsdp_config.entropy_from_logits_with_chunking is True
    policy_loss = cfg.actor_rollout_ref.actor.policy_loss
    assert policy_loss._target_ == "erc_verl.core.config.ErcPolicyLossConfig"
    assert (policy_loss.erc_beta_low, policy_loss.erc_beta_high) == (0.05, 0.05)


@pytest.mark.parametrize("override", ["actor_rollout_ref.model.use_remove_padding=false",
                                      "actor_rollout_ref.actor.strategy=megatron"])
def test_verls_own_entropy_paths_are_checkpointed(override):
    # there verl calls its own entropy function: checkpointing keeps no graph for it
    cfg = enable_erc(verl_config("actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo", override))
    assert cfg.actor_rollout_ref.actor.entropy_checkpointing is True


def test_entropy_bonus_keeps_its_gradient_graph():
    cfg = enable_erc(
        verl_config("actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo", "actor_rollout_ref.actor.entropy_coeff=0.01")
    )
    assert cfg.actor_rollout_ref.actor.entropy_checkpointing is False


def test_enable_erc_leaves_other_losses_alone():
    cfg = enable_erc(verl_config())
    assert cfg.trainer.v1.trainer_mode == "sync"
    assert cfg.actor_rollout_ref.actor.calculate_entropy is False


@pytest.mark.parametrize(
    "overrides,match",
    [
        (("trainer.use_v1=False",), r"trainer.use_v1=False"),
        (("algorithm.rollout_correction.bypass_mode=True",), r"bypass_mode"),
        (("+actor_rollout_ref.actor.policy_loss.erc_beta_low=0",), r"erc_beta_low=0: must be a number in \(0, 1\)"),
        (("+actor_rollout_ref.actor.policy_loss.erc_beta_low=1.0",), r"erc_beta_low=1.0"),
        (("+actor_rollout_ref.actor.policy_loss.erc_beta_high=-0.1",), r"erc_beta_high=-0.1: must be a number > 0"),
        (("actor_rollout_ref.actor.clip_ratio_low=1.5",), r"clip_ratio_low=1.5"),
        (("actor_rollout_ref.actor.clip_ratio_c=0.5",), r"clip_ratio_c=0.5"),
    ],
)
def test_bad_configs_fail_at_start_up_naming_the_key(overrides, match):
    cfg = verl_config("actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo", *overrides)
    with pytest.raises(ErcConfigError, match=match):
        enable_erc(cfg)


def test_erc_loss_with_a_stock_trainer_mode_is_rejected():
    cfg = verl_config(
        "actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo",
        "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_low=0.05",
        "+actor_rollout_ref.actor.policy_loss.erc_beta_high=0.05",
    )
    with pytest.raises(ErcConfigError, match="trainer.v1.trainer_mode='sync'"):
        check_erc_config(cfg)
    cfg.actor_rollout_ref.actor.policy_loss._target_ = "verl.workers.config.PolicyLossConfig"
    with pytest.raises(ErcConfigError, match="_target_"):
        check_erc_config(cfg)


def test_erc_policy_loss_config_validates_itself():
    assert ErcPolicyLossConfig(loss_mode="erc_dapo", erc_beta_low=0.2, erc_beta_high=0.1).erc_beta_high == 0.1
    with pytest.raises(ErcConfigError, match="erc_beta_low"):
        ErcPolicyLossConfig(erc_beta_low=0.0)
    with pytest.raises(ErcConfigError, match="erc_beta_high"):
        ErcPolicyLossConfig(erc_beta_high=0.0)


def test_trainer_modes():
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    assert set(ERC_TRAINER_MODES) == set(ERC_TRAINERS) == {"erc_sync", "erc_colocate_async", "erc_separate_async"}
    assert all(TRAINER_REGISTRY[name] is cls for name, cls in ERC_TRAINERS.items())  # registered by the plugin
    assert erc_trainer_mode("sync") == "erc_sync" and erc_trainer_mode("erc_sync") == "erc_sync"
    with pytest.raises(ValueError, match="trainer_mode='fully_async'"):
        erc_trainer_mode("fully_async")
