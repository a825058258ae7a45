"""Start-up checks for runs on several nodes, without a cluster: paths every node must share, joining the cluster
of a Ray job, the trainer modes with the paper recipes (verl's own checks), and the smoke check's CUDA count."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from erc_verl.core.config import ErcConfigError
from erc_verl.runs import recipes, smoke
from erc_verl.runs.preflight import SHARED_PATH_KEYS, PreflightError, check_shared_paths
from erc_verl.runs.train import CLUSTER_START_ONLY, join_job_cluster
from tests import REPO_ROOT

PAPER = "erc_dapo_r1_distill_7b"
SHARED = {"ERC_VERL_DATA_DIR": "/shared/data", "ERC_VERL_CKPT_DIR": "/shared/ckpt",
          "ERC_VERL_MODEL_7B": "/shared/models/r1-distill-7b"}


@pytest.fixture
def paper_cfg(monkeypatch):
    """The paper recipe with every path on shared storage, unless a test says otherwise."""
    for key, value in SHARED.items():
        monkeypatch.setenv(key, value)

    def compose(*overrides, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return recipes.compose(PAPER, list(overrides))

    return compose


def test_shared_paths_pass(paper_cfg):
    check_shared_paths(paper_cfg())
    # one node: relative paths are that node's own, nothing to share
    check_shared_paths(paper_cfg("trainer.nnodes=1", ERC_VERL_DATA_DIR="data", ERC_VERL_CKPT_DIR="checkpoints"))


@pytest.mark.parametrize("key, override", [
    ("trainer.default_local_dir", "trainer.default_local_dir=checkpoints/run"),
    ("data.train_files", "data.train_files=data/train.parquet"),
    ("data.val_files", "data.val_files=[/shared/aime.parquet,aime2025.parquet]"),
    ("actor_rollout_ref.model.path", "actor_rollout_ref.model.path=./models/r1"),
    ("erc_verl.metrics_file", "+erc_verl.metrics_file=outputs/metrics.jsonl"),
])
def test_relative_path_on_several_nodes_is_named(paper_cfg, key, override):
    with pytest.raises(PreflightError) as err:
        check_shared_paths(paper_cfg(override, "trainer.nnodes=2"))
    message = str(err.value)
    assert message.startswith(f"{key}=") and "relative path with trainer.nnodes=2" in message
    assert SHARED_PATH_KEYS[key] in message and "absolute path on storage every node mounts" in message


def test_hub_model_on_several_nodes_needs_a_shared_copy(paper_cfg, monkeypatch):
    monkeypatch.delenv("ERC_VERL_MODEL_7B")  # the recipe's default: the hub id
    cfg = paper_cfg()
    with pytest.raises(PreflightError, match=r"actor_rollout_ref.model.path=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B: "
                                             r"a Hugging Face hub id with trainer.nnodes=8 makes every node download"):
        check_shared_paths(cfg, environ={})
    check_shared_paths(cfg, environ={"HF_HUB_OFFLINE": "1"})  # a pre-filled shared HF cache, never downloaded


def test_remote_paths_are_shared_by_definition(paper_cfg):
    check_shared_paths(paper_cfg("trainer.nnodes=2", "data.train_files=hdfs://nn/data/train.parquet"))


def test_train_stops_before_ray_and_names_the_key(tmp_path):
    env = {**os.environ, **SHARED, "ERC_VERL_CKPT_DIR": "checkpoints"}
    r = subprocess.run([sys.executable, "-m", "erc_verl", "train", PAPER, "trainer.nnodes=2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"erc-verl train: trainer.default_local_dir=checkpoints/erc_verl/{PAPER}: a relative path")
    assert "ray init kwargs" not in r.stdout, "stopped before Ray"


def test_cpu_recipe_inside_a_ray_job_joins_its_cluster(monkeypatch):
    cfg = recipes.compose("cpu_tiny_erc_dapo", ["+ray_kwargs.ray_init._temp_dir=/tmp/x"])
    assert cfg.ray_kwargs.ray_init.address == "local"
    outside = OmegaConf.to_container(cfg.ray_kwargs)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    join_job_cluster(cfg)
    assert OmegaConf.to_container(cfg.ray_kwargs) == outside, "outside a job the recipe owns its cluster"

    # what Ray's job supervisor sets in the driver's environment
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"OMP_NUM_THREADS": "4"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", "/shared/run/metrics.jsonl.attempt")
    monkeypatch.setenv("TENSORBOARD_DIR", "/shared/run/tensorboard")
    join_job_cluster(cfg)
    ray_init = OmegaConf.to_container(cfg.ray_kwargs.ray_init)
    assert ray_init["address"] is None  # ray.init then joins RAY_ADDRESS, the job's cluster
    assert not set(CLUSTER_START_ONLY) & set(ray_init), ray_init
    # the job's variable wins over the recipe's (Ray refuses one set twice); the workers learn where to log
    assert ray_init["runtime_env"]["env_vars"] == {
        "TQ_NUM_THREADS": "1", "VERL_FILE_LOGGER_PATH": "/shared/run/metrics.jsonl.attempt",
        "TENSORBOARD_DIR": "/shared/run/tensorboard",
    }


def test_explicit_address_is_kept_inside_a_job(monkeypatch):
    cfg = recipes.compose("cpu_tiny_erc_dapo", ["ray_kwargs.ray_init.address=10.0.0.1:6379"])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    join_job_cluster(cfg)
    assert cfg.ray_kwargs.ray_init.address == "10.0.0.1:6379" and cfg.ray_kwargs.ray_init.num_cpus == 12


# The paper recipes' official dynamic sampling (one generation batch per step) is a sync mode's: the async modes
# sample as verl does, refilling until data.train_batch_size groups survive (launch/README.md: "Trainer modes").
ASYNC = ["algorithm.filter_groups.max_num_gen_batches=0"]
# trainer.v1.separate_async.parameter_sync_step = data.train_batch_size / actor.ppo_mini_batch_size (128 / 16),
# plus a rollout pool of its own
SEPARATE_ASYNC = [*ASYNC, "trainer.v1.separate_async.parameter_sync_step=8", "trainer.nnodes=4",
                  "actor_rollout_ref.rollout.nnodes=4", "actor_rollout_ref.rollout.n_gpus_per_node=8",
                  "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl"]


def _verl_checks(cfg):
    """verl's own validation of a run: its config check, then the trainer's constructor (which asserts a mode's
    constraints; init() would start the workers)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    from verl.utils.config import validate_config

    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    return TRAINER_REGISTRY[cfg.trainer.v1.trainer_mode](cfg)


@pytest.mark.parametrize("recipe", [PAPER, "erc_gppo_r1_distill_1p5b"])
@pytest.mark.parametrize("mode, overrides", [("erc_sync", []), ("erc_colocate_async", ASYNC),
                                             ("erc_separate_async", SEPARATE_ASYNC)])
def test_trainer_modes_with_the_paper_recipes(recipe, mode, overrides):
    trainer = _verl_checks(recipes.compose(recipe, [f"trainer.v1.trainer_mode={mode}", *overrides]))
    assert trainer.trainer_mode == mode.removeprefix("erc_")


@pytest.mark.parametrize("mode", ["erc_colocate_async", "erc_separate_async"])
def test_async_modes_with_the_official_sampling_name_the_way_out(mode):
    with pytest.raises(ErcConfigError, match=rf"^trainer.v1.trainer_mode='{mode}': .*max_num_gen_batches=1 .*is a "
                                             r"sync mode; use .*erc_sync, or .*max_num_gen_batches=0"):
        recipes.compose(PAPER, [f"trainer.v1.trainer_mode={mode}"])


def test_separate_async_needs_the_sync_step_of_the_batch():
    cfg = recipes.compose(PAPER, ["trainer.v1.trainer_mode=erc_separate_async", *ASYNC])
    with pytest.raises(AssertionError, match="train_batch_size must equal parameter_sync_step"):
        _verl_checks(cfg)


def test_launch_readme_gives_the_tested_separate_async_overrides():
    text = (REPO_ROOT / "launch" / "README.md").read_text()
    assert all(override in text for override in SEPARATE_ASYNC), "launch/README.md: Trainer modes"


@pytest.mark.parametrize("report, ray_gpus, problem", [
    ({"cuda_build": None}, 1, None),                           # CPU build of torch: a CPU cluster, skipped
    ({"cuda_build": "13.0", "devices": 8}, 8, None),
    ({"cuda_build": "13.0", "devices": 0}, 8, "Ray counts 8 GPU(s) but CUDA sees 0"),  # e.g. a driver below R580
    ({"cuda_build": "13.0", "devices": 4}, 8, "Ray counts 8 GPU(s) but CUDA sees 4"),
])
def test_smoke_compares_cuda_with_rays_gpu_count(report, ray_gpus, problem):
    found = smoke.check_cuda(report, ray_gpus)
    assert found == problem if problem is None else found.startswith(problem) and "R580" in found


def test_smoke_cuda_report_runs_torch():
    report = smoke._cuda_report()
    import torch

    assert report["cuda_build"] == torch.version.cuda
    if torch.version.cuda is not None:
        assert report["devices"] == torch.cuda.device_count()
