"""The paper recipes compose on verl's tree, instantiate verl's dataclasses, and carry the paper's settings."""

import subprocess
import sys

import pytest
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config

from erc_verl.core.config import ErcConfigError
from erc_verl.reward.judge import MathRewardConfig
from erc_verl.runs.recipes import RecipeError, available as available_recipes, compose
from erc_verl.runs.train import split_recipe

GRID = {
    f"{row}_r1_distill_{size}": (row, size)
    for row in ("dapo", "erc_dapo", "gppo", "erc_gppo")
    for size in ("1p5b", "7b")
}
MODEL_IDS = {"1p5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}
LOSS_MODES = {"dapo": "vanilla", "erc_dapo": "erc_dapo", "gppo": "gppo", "erc_gppo": "erc_gppo"}


def test_every_paper_row_has_a_recipe():
    assert set(GRID) <= set(available_recipes())
    assert all(available_recipes()[name] for name in GRID), "each recipe starts with a one-line description"


@pytest.mark.parametrize("recipe", sorted(GRID))
def test_recipe_matches_the_paper(recipe, monkeypatch):
    monkeypatch.delenv("ERC_VERL_MODEL_1P5B", raising=False)
    monkeypatch.delenv("ERC_VERL_MODEL_7B", raising=False)
    row, size = GRID[recipe]
    cfg = compose(recipe)
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout

    assert cfg.actor_rollout_ref.model.path == MODEL_IDS[size]
    # advantage: GRPO, no KL anywhere, no entropy bonus
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.algorithm.use_kl_in_reward is False and actor.use_kl_loss is False and actor.entropy_coeff == 0
    # PPO clip
    assert actor.policy_loss.loss_mode == LOSS_MODES[row]
    assert actor.clip_ratio_low == 0.2
    assert actor.clip_ratio_high == (0.28 if "dapo" in row else 0.2)
    assert actor.clip_ratio_c == 10.0 and actor.loss_agg_mode == "token-mean"
    # ERC band and what ERC switches on
    if row.startswith("erc_"):
        assert (actor.policy_loss.erc_beta_low, actor.policy_loss.erc_beta_high) == (0.05, 0.05)
        assert actor.calculate_entropy is True
    else:
        assert actor.calculate_entropy is False and "erc_beta_low" not in actor.policy_loss
    # the official positive-sample NLL term, for every row (the official actor.yaml default and all four scripts)
    assert actor.policy_loss.positive_nll_coeff == 0.1 and actor.policy_loss.get("positive_nll_reward", 1.0) == 1.0
    # erc-verl's sync trainer mode: it adds the NLL term and the official dynamic sampling to every row
    assert cfg.trainer.v1.trainer_mode == "erc_sync"
    # lengths
    assert cfg.data.max_prompt_length == 4096 and cfg.data.max_response_length == 16384
    assert cfg.erc_verl.eval.max_response_length == 32768
    # batches; official dynamic sampling on acc: one generation batch of 256 prompts per step, no refill
    assert cfg.data.train_batch_size == 128 and cfg.data.gen_batch_size == 256
    assert rollout.n == 8 and actor.ppo_mini_batch_size == 16 and actor.ppo_epochs == 1
    assert cfg.algorithm.filter_groups.enable is True and cfg.algorithm.filter_groups.metric == "acc"
    assert cfg.algorithm.filter_groups.max_num_gen_batches == 1
    # optimizer
    assert actor.optim.lr == 1e-6 and actor.optim.lr_warmup_steps == 10
    assert actor.optim.weight_decay == 0.1 and actor.grad_clip == 1.0
    # rollout and validation sampling
    assert rollout.name == "vllm" and (rollout.temperature, rollout.top_p, rollout.top_k) == (1.0, 1.0, -1)
    assert (rollout.val_kwargs.n, rollout.val_kwargs.temperature, rollout.val_kwargs.top_p) == (32, 0.6, 0.95)
    assert (cfg.erc_verl.eval.n, cfg.erc_verl.eval.temperature, cfg.erc_verl.eval.top_p) == (32, 0.6, 0.95)
    # reward: the project's math-verify reward with the official verdicts, no overlong buffer
    assert cfg.reward.custom_reward_function.path == "pkg://erc_verl.reward.math_verify_score"
    assert dict(cfg.reward.custom_reward_function.reward_kwargs) == {"rules": "official"}
    assert cfg.reward.reward_manager.name == "naive"
    # data
    assert cfg.data.train_files.endswith("klear_mathsub_30k.parquet")
    assert [f.rsplit("/", 1)[-1] for f in cfg.data.val_files] == ["aime2024.parquet", "aime2025.parquet"]
    # scale
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (8, 8)
    assert actor.use_dynamic_bsz is True and actor.ulysses_sequence_parallel_size == 4
    assert actor.ppo_max_token_len_per_gpu == 5120  # x SP 4: one 4096 + 16384 sequence per micro-batch, official
    assert rollout.tensor_model_parallel_size == 2
    assert actor.fsdp_config.param_offload is True and actor.fsdp_config.optimizer_offload is True
    # schedule
    assert cfg.trainer.total_epochs == 10 and cfg.trainer.test_freq == 10 and cfg.trainer.save_freq == 10
    assert cfg.trainer.resume_mode == "auto" and cfg.trainer.val_before_train is False

    # verl's own dataclasses and checks accept it
    actor_dc = omega_conf_to_dataclass(actor)
    assert actor_dc.policy_loss.loss_mode == LOSS_MODES[row] and actor_dc.policy_loss.positive_nll_coeff == 0.1
    MathRewardConfig.from_kwargs(dict(cfg.reward.custom_reward_function.reward_kwargs))
    omega_conf_to_dataclass(rollout)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_overrides_reach_the_config(monkeypatch):
    monkeypatch.setenv("ERC_VERL_DATA_DIR", "/datasets/erc")
    cfg = compose(
        "erc_dapo_r1_distill_1p5b",
        ["actor_rollout_ref.actor.policy_loss.erc_beta_low=0.1", "actor_rollout_ref.model.path=/models/mine"],
    )
    assert cfg.actor_rollout_ref.actor.policy_loss.erc_beta_low == 0.1
    assert cfg.actor_rollout_ref.model.path == "/models/mine"
    assert cfg.data.train_files == "/datasets/erc/klear_mathsub_30k.parquet"


@pytest.mark.parametrize(
    "band,expected", [("band_80_120", (0.2, 0.2)), ("band_85_125", (0.15, 0.25)), ("band_95_110", (0.05, 0.1))]
)
def test_band_presets(band, expected):
    policy_loss = compose("erc_gppo_r1_distill_7b", [f"+erc_band={band}"]).actor_rollout_ref.actor.policy_loss
    assert (policy_loss.erc_beta_low, policy_loss.erc_beta_high) == pytest.approx(expected)


def test_invalid_override_fails_before_any_worker_starts():
    with pytest.raises(ErcConfigError, match="erc_beta_low=1.5"):
        compose("erc_dapo_r1_distill_1p5b", ["actor_rollout_ref.actor.policy_loss.erc_beta_low=1.5"])
    # through the command line: exits non-zero naming the key, long before Ray would start
    result = subprocess.run(
        [sys.executable, "-m", "erc_verl", "train", "erc_dapo_r1_distill_1p5b",
         "actor_rollout_ref.actor.policy_loss.erc_beta_high=0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "erc_beta_high=0" in result.stderr and "must be a number > 0" in result.stderr
    assert "ray init" not in result.stdout.lower()


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(RecipeError, match="available recipes:(.|\n)*erc_dapo_r1_distill_1p5b"):
        compose("no_such_recipe")
    result = subprocess.run([sys.executable, "-m", "erc_verl", "train", "no_such_recipe"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "no recipe 'no_such_recipe'" in result.stderr


def test_split_recipe():
    assert split_recipe(["erc_dapo_r1_distill_7b", "a=1"]) == ("erc_dapo_r1_distill_7b", ["a=1"])
    assert split_recipe(["--config-name", "x", "a=1", "-m"]) == ("x", ["a=1", "-m"])
    assert split_recipe(["--config-name=x", "a=1"]) == ("x", ["a=1"])
    assert split_recipe(["a=1"]) == (None, ["a=1"])


def test_paper_yaml_sets_only_known_keys():
    """Every key common/paper.yaml sets is a key of verl's config tree or an erc-verl option: no misspelt key is
    silently carried along. (data.gen_batch_size, which verl's V1 sampler ignores when filtering, is read by the
    official sampler that max_num_gen_batches selects: tests/test_sampling.py.)"""
    from omegaconf import OmegaConf

    from erc_verl.runs.recipes import recipes_dir
    from tests.verl_config import verl_config

    paper = OmegaConf.load(recipes_dir() / "common" / "paper.yaml")
    verl = verl_config()
    ours = {"actor_rollout_ref.actor.policy_loss._target_", "actor_rollout_ref.actor.policy_loss.positive_nll_coeff",
            "reward.custom_reward_function.reward_kwargs.rules"}

    def keys(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from keys(value, path + ".")
            else:
                yield path

    for key in keys(OmegaConf.to_container(paper)):
        if key.startswith(("defaults", "erc_verl.")) or key in ours:
            continue
        parent, _, name = key.rpartition(".")
        assert name in OmegaConf.select(verl, parent).keys(), key  # some are '???' until a recipe sets them


def test_official_sampling_and_nll_fail_at_start_up_naming_the_key():
    with pytest.raises(ErcConfigError, match="positive_nll_coeff=-0.1: must be a finite number >= 0"):
        compose("dapo_r1_distill_1p5b", ["actor_rollout_ref.actor.policy_loss.positive_nll_coeff=-0.1"])
    with pytest.raises(ErcConfigError, match="data.gen_batch_size=None"):
        compose("dapo_r1_distill_1p5b", ["data.gen_batch_size=null"])
    with pytest.raises(ErcConfigError, match="trainer.use_v1=False: positive_nll_coeff=0.1"):
        compose("gppo_r1_distill_7b", ["trainer.use_v1=false", "algorithm.filter_groups.max_num_gen_batches=0"])
    with pytest.raises(ErcConfigError, match="official dynamic sampling.*sync mode"):
        compose("dapo_r1_distill_1p5b", ["trainer.v1.trainer_mode=colocate_async"])
    # verl's own refilling sampler and no NLL term: verl's stock trainer mode
    stock = compose("dapo_r1_distill_1p5b", ["algorithm.filter_groups.max_num_gen_batches=0",
                                             "actor_rollout_ref.actor.policy_loss.positive_nll_coeff=0"])
    assert stock.trainer.v1.trainer_mode == "sync"
