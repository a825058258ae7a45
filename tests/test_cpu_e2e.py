"""End to end on CPU: `erc-verl train cpu_tiny_erc_dapo`, shortened, through Ray, verl's V1 trainer, the FSDP2
actor, the `hf` rollout, a reward worker and the ERC-DAPO loss.

Three short runs (module-scoped, each shared by several assertions):
- `main`: one mini-batch per step, one epoch, dynamic sampling, validation before/after, checkpoint, report. The
  old entropy must be the old policy's (entropy ratio == 1 on that only mini-batch) and rollout log-probs the
  actor's. It runs with verl's own loggers, `trainer.logger=[console,file,tensorboard]`: verl's full console
  (every worker's output included) and TensorBoard event files.
  Its last checkpoint is then evaluated with `erc-verl eval --recipe cpu_tiny_erc_dapo`.
- `narrow` / `wide`: two mini-batches per step, so the second one sees a moved policy; a narrow band must drop
  tokens, a very wide one none. They run with the recipe's compact console (one line per step).
The tiny model and data come from the shared cache (built once if missing, as the main command does).
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests import REPO_ROOT

pytestmark = pytest.mark.e2e

ERC_KEYS = (
    "actor/erc_clipfrac",
    "actor/erc_clipfrac_low",
    "actor/erc_clipfrac_high",
    "actor/entropy_ratio_mean",
    "actor/entropy_ratio_min",
    "actor/entropy_ratio_max",
)
SHORT = [
    "data.train_batch_size=8",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
    "data.val_max_samples=32",
]


def train(tmp_path_factory, name: str, overrides: list[str]) -> tuple[list[tuple[int, dict]], str]:
    """Run `erc-verl train` in a subprocess; return the JSONL metrics rows and the run directory (its log is
    `train.log` beside it)."""
    work = tmp_path_factory.mktemp(name)
    run_dir = str(work / "run")
    env = dict(
        os.environ,
        ERC_VERL_CACHE=os.environ.get("ERC_VERL_CACHE", str(REPO_ROOT / ".cache" / "erc_verl")),
        ERC_VERL_RUN_DIR=run_dir,
        PYTHONUNBUFFERED="1",
    )
    ray_tmp = f"/tmp/ray_erc_{os.getpid()}_{name}"  # own Ray session dir: other clusters may share the machine
    cmd = [sys.executable, "-m", "erc_verl", "train", "cpu_tiny_erc_dapo", *SHORT, *overrides,
           f"+ray_kwargs.ray_init._temp_dir={ray_tmp}"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (work / "train.log").write_text(log)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-6000:]}"
    from erc_verl.runs.metrics import read_steps

    return read_steps(os.path.join(run_dir, "metrics.jsonl")), run_dir


def train_steps(rows):
    return [(s, d) for s, d in rows if "timing_s/step" in d]


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    return train(
        tmp_path_factory,
        "main",
        [
            "trainer.total_training_steps=2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=8",  # one mini-batch per step
            "actor_rollout_ref.actor.ppo_epochs=1",
            "trainer.test_freq=2",
            "trainer.save_freq=2",
            "trainer.logger=[console,file,tensorboard]",
        ],
    )


def band_run(tmp_path_factory, name, beta_low, beta_high):
    rows, run_dir = train(
        tmp_path_factory,
        name,
        [
            "trainer.total_training_steps=1",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",  # two mini-batches: the second sees a moved policy
            "actor_rollout_ref.actor.optim.lr=1e-3",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=-1",  # the recipe's ramp starts at lr 0
            f"actor_rollout_ref.actor.policy_loss.erc_beta_low={beta_low}",
            f"actor_rollout_ref.actor.policy_loss.erc_beta_high={beta_high}",
            "algorithm.filter_groups.enable=false",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
        ],
    )
    return train_steps(rows), run_dir


@pytest.fixture(scope="module")
def narrow_run(tmp_path_factory):
    return band_run(tmp_path_factory, "narrow", 1e-4, 1e-4)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    return band_run(tmp_path_factory, "wide", 0.999, 1000.0)


def test_every_step_logs_finite_erc_metrics(main_run):
    rows, _ = main_run
    steps = train_steps(rows)
    assert [s for s, _ in steps] == [1, 2]
    for _, d in steps:
        for key in ERC_KEYS:
            assert key in d and math.isfinite(d[key]), key
        for key in ("critic/score/mean", "actor/entropy", "actor/pg_loss", "timing_s/gen"):
            assert key in d


def log_of(run_dir: str) -> str:
    return open(os.path.join(os.path.dirname(run_dir), "train.log")).read()


def test_actor_engine_computes_the_entropy_without_autograd(main_run):
    from erc_verl.core.entropy import ENGINE_MESSAGE

    assert f"{ENGINE_MESSAGE} (chunks of 2048 tokens)" in log_of(main_run[1])


def test_verls_own_console_and_tensorboard_on_request(main_run):
    rows, run_dir = main_run
    log = log_of(run_dir)
    assert "step:1 - " in log and "step:2 - " in log  # verl's console logger, every metric, from the TaskRunner
    assert "(TaskRunnerV1 pid=" in log and "(WorkerDict pid=" in log  # the workers' output reaches the terminal
    assert "[erc-verl] starting Ray" not in log and not re.search(r"^step 1/2 \|", log, re.M)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard")).Reload()
    reward = events.Scalars("critic/score/mean")
    assert [e.step for e in reward] == [1, 2]
    assert [e.value for e in reward] == pytest.approx([d["critic/score/mean"] for _, d in train_steps(rows)])


def test_compact_console_one_line_per_step(narrow_run):
    log = log_of(narrow_run[1])
    lines = log.splitlines()
    assert "[erc-verl] cpu_tiny_erc_dapo: 1 steps of 8 prompts x 4 samples, no validation" in lines
    (step_line,) = [line for line in lines if line.startswith("step ")]
    assert re.fullmatch(
        r"step 1/1 \| \d+\.\d\d s \| reward \d\.\d{3} \| val acc   -   \| erc_clipfrac \d\.\d{4} \| "
        r"H ratio \d\.\d{3}-\d\.\d{3} \| ETA 0s",
        step_line,
    ), step_line
    assert "[erc-verl] training finished in " in log and "[erc-verl] no validation ran" in log
    # verl's metrics dictionary and the Ray workers' output stay off the terminal
    assert "step:1 - " not in log and "pid=" not in log and "target_num_threads" not in log


def test_old_entropy_is_the_old_policys(main_run):
    # One mini-batch, one epoch: the update's first forward is the old policy itself, token for token.
    for _, d in train_steps(main_run[0]):
        assert d["actor/entropy_ratio_min"] == pytest.approx(1.0, abs=1e-4)
        assert d["actor/entropy_ratio_max"] == pytest.approx(1.0, abs=1e-4)
        assert d["actor/erc_clipfrac"] == 0.0


def test_rollout_log_probs_match_the_actor(main_run):
    for _, d in train_steps(main_run[0]):
        assert d["training/rollout_probs_diff_valid"] == 1.0
        assert d["training/rollout_probs_diff_max"] < 1e-4


def test_validation_before_and_after_report_and_checkpoint(main_run):
    rows, run_dir = main_run
    from erc_verl.runs.report import summarize, val_accuracy_key

    key = val_accuracy_key(rows)
    assert key is not None and key.startswith("val-core/erc_verl/cpu_arith/acc/mean@")
    assert rows[0][0] == 0 and key in rows[0][1]  # before training
    assert key in rows[-1][1] and rows[-1][0] == 2  # after the last step
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary == {**summary, **summarize(rows)}
    assert os.path.getsize(summary["plot"]) > 10_000
    assert summary["checkpoints"] and summary["checkpoints"][-1].endswith("global_step_2")
    assert os.listdir(os.path.join(summary["checkpoints"][-1], "actor"))


def test_narrow_band_drops_tokens(narrow_run):
    (_, d), = narrow_run[0]
    assert d["actor/entropy_ratio_max"] - d["actor/entropy_ratio_min"] > 1e-4  # the second mini-batch moved
    assert d["actor/erc_clipfrac"] > 0.0


def test_very_wide_band_drops_nothing(wide_run):
    (_, d), = wide_run[0]
    assert d["actor/entropy_ratio_max"] - d["actor/entropy_ratio_min"] > 1e-4
    assert d["actor/erc_clipfrac"] == 0.0


def test_eval_on_the_runs_checkpoint(main_run, tmp_path):
    """`erc-verl eval` on the CPU run's own checkpoint (its hf_model), next to the warm start it trained from."""
    import torch
    from safetensors.torch import load_file

    _, run_dir = main_run
    checkpoint = os.path.join(run_dir, "checkpoints", "global_step_2")
    warm_start = os.path.join(os.environ.get("ERC_VERL_CACHE", str(REPO_ROOT / ".cache" / "erc_verl")),
                              "cpu_tiny_arith_seed_0", "model")
    trained = load_file(os.path.join(checkpoint, "actor", "huggingface", "model.safetensors"))
    initial = load_file(os.path.join(warm_start, "model.safetensors"))
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # two updates moved the weights

    env = dict(os.environ, ERC_VERL_CACHE=os.path.dirname(os.path.dirname(warm_start)))
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "erc_verl", "eval", "--recipe", "cpu_tiny_erc_dapo",
         "--model", f"warm_start={warm_start}", "--model", f"step2={checkpoint}", "--n", "4", "--k", "1,4",
         "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"] == {"n": 4, "temperature": 2.0, "top_p": 1.0, "max_response_length": 12}
    for run in ("warm_start", "step2"):
        bench = report["results"][run]["val"]
        assert bench["problems"] == 512 and bench["n"] == 4
        assert 0.0 < bench["avg@4"] <= bench["pass@4"] <= 1.0
    lines = (out / "eval.md").read_text().splitlines()
    assert lines[0] == "| avg@4 | val |"
    assert lines[2].startswith("| warm_start | ") and lines[3].startswith("| step2 | ")
