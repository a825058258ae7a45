"""The paper recipes' own code path on CPU: `cpu_paper_erc_dapo` is the paper's ERC-DAPO recipe with only sizes and
hardware changed, it runs end to end (packed sequences through the flash-attention path, Ulysses SP over 2 ranks,
bf16, compile, offload, gradient checkpointing, dynamic batch size, the paper's reward pool), and configurations
in which verl's Ulysses or flash paths cannot work stop at start-up naming the keys."""

import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from erc_verl.runs.preflight import PreflightError, check_attention, check_reference_on_cpu, check_token_budgets
from erc_verl.runs.recipes import compose
from tests import REPO_ROOT

RECIPE = "cpu_paper_erc_dapo"
PAPER = "erc_dapo_r1_distill_1p5b"
# what the CPU recipe may change: sizes (batch, lengths, SP degree, token budgets), the model and data, the machine
SIZES_AND_HARDWARE = (
    "data.", "erc_verl.", "ray_kwargs.", "transfer_queue.",
    "actor_rollout_ref.model.path", "actor_rollout_ref.model.override_config.attn_implementation",
    "actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size", "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu", "actor_rollout_ref.actor.rollout_n",
    "actor_rollout_ref.ref.rollout_n", "critic.ppo_mini_batch_size", "critic.rollout_n",
    "actor_rollout_ref.rollout.n", "actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.agent.num_workers",
    "actor_rollout_ref.rollout.n_gpus_per_node", "actor_rollout_ref.rollout.prompt_length",
    "actor_rollout_ref.rollout.response_length", "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
    "actor_rollout_ref.rollout.prometheus.served_model_name", "actor_rollout_ref.rollout.trace.experiment_name",
    "distillation.teacher_models.teacher_model.inference.",
    "reward.num_workers", "reward.custom_reward_function.reward_kwargs.long_cot",
    "trainer.device", "trainer.nnodes", "trainer.n_gpus_per_node", "trainer.experiment_name",
    "trainer.total_training_steps", "trainer.test_freq", "trainer.save_freq", "trainer.default_local_dir",
)


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def test_the_cpu_recipe_changes_only_sizes_and_hardware():
    paper, cpu = (_flat(OmegaConf.to_container(compose(name), resolve=True)) for name in (PAPER, RECIPE))
    changed = {key for key in paper.keys() | cpu.keys() if paper.get(key, "<absent>") != cpu.get(key, "<absent>")}
    assert changed and all(key.startswith(SIZES_AND_HARDWARE) for key in changed), sorted(
        key for key in changed if not key.startswith(SIZES_AND_HARDWARE))
    # ...so it takes the paper's branches of verl
    for key, value in {
        "actor_rollout_ref.model.use_remove_padding": True,
        "actor_rollout_ref.model.enable_gradient_checkpointing": True,
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.actor.fsdp_config.param_offload": True,
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload": True,
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile": True,
        "actor_rollout_ref.actor.fsdp_config.mixed_precision": None,  # unset: verl's bf16 params, fp32 reduce
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "erc_dapo",
        "actor_rollout_ref.rollout.mode": "async",
        "trainer.v1.trainer_mode": "erc_sync",
    }.items():
        assert cpu.get(key) == value, key
    assert cpu["actor_rollout_ref.actor.ulysses_sequence_parallel_size"] == cpu["trainer.n_gpus_per_node"] == 2


def _cfg(*overrides):
    return compose(RECIPE, list(overrides))


def test_sequence_parallelism_on_an_attention_verls_patch_never_sees_stops_at_start_up():
    check_attention(_cfg())  # cpu_varlen: goes through transformers' flash path
    for attention in ("sdpa", "eager"):
        with pytest.raises(PreflightError, match=rf"actor_rollout_ref.actor.ulysses_sequence_parallel_size=2 with "
                                                 rf"actor_rollout_ref.model.override_config.attn_implementation={attention}"):
            check_attention(_cfg(f"actor_rollout_ref.model.override_config.attn_implementation={attention}"))
    check_attention(_cfg("actor_rollout_ref.model.override_config.attn_implementation=sdpa",
                         "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"))  # packed rows alone are fine


def test_flash_attention_on_a_machine_without_a_gpu_stops_at_start_up():
    with pytest.raises(PreflightError, match="attn_implementation=flash_attention_2: flash-attn's kernels need a GPU"):
        check_attention(_cfg("actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2"))
    with pytest.raises(PreflightError, match="attn_implementation=flash_attention_2"):  # verl's default, unset
        check_attention(compose(PAPER))


def test_heads_that_cannot_be_split_over_the_ranks_stop_at_start_up(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    cfg = _cfg(f"actor_rollout_ref.model.path={tmp_path}", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=3")
    with pytest.raises(PreflightError, match="ulysses_sequence_parallel_size=3: the model's num_attention_heads=4"):
        check_attention(cfg)


def test_a_reference_model_on_cpu_stops_at_start_up():
    check_reference_on_cpu(_cfg())
    with pytest.raises(PreflightError, match="use_kl_loss .* cannot run without an accelerator"):
        check_reference_on_cpu(_cfg("actor_rollout_ref.actor.use_kl_loss=true"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_path")
    env = dict(os.environ, ERC_VERL_CACHE=os.environ.get("ERC_VERL_CACHE", str(REPO_ROOT / ".cache" / "erc_verl")),
               ERC_VERL_RUN_DIR=str(work / "run"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "erc_verl", "train", RECIPE, f"+ray_kwargs.ray_init._temp_dir=/tmp/ray_erc_{os.getpid()}_gp"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    from erc_verl.runs.metrics import read_steps

    return read_steps(str(work / "run" / "metrics.jsonl")), log, work / "run"


@pytest.mark.e2e
def test_the_paper_path_trains_end_to_end_on_cpu(run):
    rows, log, run_dir = run
    steps = [(s, d) for s, d in rows if "timing_s/step" in d]
    assert [s for s, _ in steps] == [1, 2]
    for _, d in steps:
        for key in ("actor/erc_clipfrac", "actor/entropy_ratio_min", "actor/entropy_ratio_max", "actor/pg_loss",
                    "actor/positive_nll", "actor/grad_norm", "critic/score/mean"):
            assert math.isfinite(d[key]), key
        # bf16 actor against the bf16 rollout: rounding, not a wrong attention (that gives ~0.5, see the README)
        assert d["training/rollout_probs_diff_mean"] < 1e-2 and d["training/rollout_probs_diff_max"] < 0.2
        assert d["training/filter_groups/gen_batches"] >= 1  # the official dynamic sampling, as the paper recipes
    first = steps[0][1]  # lr warms up from 0: both mini-batches of step 1 see the old policy
    assert first["actor/entropy_ratio_min"] == pytest.approx(1.0, abs=1e-3)
    assert first["actor/entropy_ratio_max"] == pytest.approx(1.0, abs=1e-3)
    val = [s for s, d in rows if any(k.startswith("val-core/") for k in d)]
    assert val == [2]  # the paper validates every test_freq steps, not before training
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "global_step_2" / "actor").glob("model_world_size_2_*"))
    assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    # verl's Ulysses patch was applied on both ranks, and the ERC engine computed the entropy
    assert log.count("Monkey patch _flash_attention_forward in transformers.integrations.flash_attention") == 2
    assert "the actor engine computes the current entropy without autograd" in log


@pytest.mark.parametrize("recipe", [RECIPE, PAPER])
def test_a_token_budget_below_verls_padding_sequence_stops_at_start_up(recipe):
    """verl pads a batch that does not divide over the ranks with 128-token sequences (a partial batch of the
    official dynamic sampling): a smaller dynamic-batch budget fails mid-run in verl's micro-batching."""
    check_token_budgets(compose(recipe))
    budget = "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"
    with pytest.raises(PreflightError, match=rf"{budget}=40 \(x actor_rollout_ref.actor.ulysses_sequence_parallel_"
                                             rf"size=2\) < 128 tokens.*at least 64"):
        check_token_budgets(compose(recipe, [f"{budget}=40", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
                                             "data.max_prompt_length=24", "data.max_response_length=12"]))
    with pytest.raises(PreflightError, match=r"ppo_max_token_len_per_gpu=5120 .*< 20480 tokens"):  # the paper's
        check_token_budgets(compose(recipe, ["actor_rollout_ref.actor.ppo_max_token_len_per_gpu=5120",
                                             "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
                                             "data.max_prompt_length=4096", "data.max_response_length=16384"]))
    check_token_budgets(compose(recipe, ["actor_rollout_ref.actor.use_dynamic_bsz=false",
                                         "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=false",
                                         "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1"]))
