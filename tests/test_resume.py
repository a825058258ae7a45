"""A killed run resumes from its last checkpoint: same data order, no step lost or repeated in the metrics.

The CPU recipe is started, its whole process group (driver and the Ray cluster it owns) is SIGKILLed right
after the first checkpoint, and the same command is run again. An uninterrupted run of the same command is the
reference for which prompts each step trains on (dynamic sampling off, so step k trains on dataloader batch k).
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from erc_verl.runs import metrics as metrics_log
from tests import REPO_ROOT

pytestmark = pytest.mark.e2e

STEPS = 3
OVERRIDES = [
    "data.train_batch_size=4",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
    "algorithm.filter_groups.enable=false",
    "trainer.val_before_train=false",
    "trainer.test_freq=-1",
    f"trainer.total_training_steps={STEPS}",
    "trainer.save_freq=1",
    "trainer.resume_mode=auto",
]


def _command(work, name):
    ray_tmp = f"/tmp/ray_erc_{os.getpid()}_{name}"  # own Ray session dir: found again to clean up after a kill
    env = dict(
        os.environ,
        ERC_VERL_CACHE=os.environ.get("ERC_VERL_CACHE", str(REPO_ROOT / ".cache" / "erc_verl")),
        ERC_VERL_RUN_DIR=str(work / "run"),
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, "-m", "erc_verl", "train", "cpu_tiny_erc_dapo", *OVERRIDES,
           f"trainer.rollout_data_dir={work / 'run' / 'rollouts'}", f"+ray_kwargs.ray_init._temp_dir={ray_tmp}"]
    return cmd, env, ray_tmp


def _run(work, name):
    cmd, env, _ = _command(work, name)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def _checkpointed_and_logged(tracker, attempt_metrics):
    """The latest checkpoint's step once its metrics row is written too (verl logs a step after saving it)."""
    if not (tracker.exists() and tracker.read_text().strip()):
        return None
    step = int(tracker.read_text())
    logged = any(row["step"] == step for row in metrics_log.read_rows(str(attempt_metrics)))
    return step if logged else None


def _kill_after_first_checkpoint(work, name):
    cmd, env, ray_tmp = _command(work, name)
    tracker = work / "run" / "checkpoints" / "latest_checkpointed_iteration.txt"
    attempt_metrics = work / "run" / "metrics.jsonl.attempt"
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 900
        while _checkpointed_and_logged(tracker, attempt_metrics) is None:
            assert proc.poll() is None, f"run ended before its first checkpoint: {(work / f'{name}.log').read_text()[-4000:]}"
            assert time.time() < deadline, "no checkpoint within 15 minutes"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray daemons that left the process group die too, as on a lost node
    for p in psutil.process_iter(["cmdline"]):
        if ray_tmp in " ".join(p.info["cmdline"] or []):
            p.kill()
    return int(tracker.read_text())


def _prompts_per_step(run_dir):
    steps = {}
    for name in os.listdir(run_dir / "rollouts"):
        with open(run_dir / "rollouts" / name) as f:
            steps[int(name.split(".")[0])] = sorted(json.loads(line)["input"] for line in f)
    return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reference = tmp_path_factory.mktemp("reference")
    _run(reference, "reference")
    resumed = tmp_path_factory.mktemp("resumed")
    killed_at = _kill_after_first_checkpoint(resumed, "killed")
    _run(resumed, "rerun")
    return reference / "run", resumed / "run", killed_at


def test_rerun_resumes_from_the_checkpoint(runs):
    _, resumed, killed_at = runs
    assert 1 <= killed_at < STEPS
    log = (resumed.parent / "rerun.log").read_text()
    assert f"global_step_{killed_at}" in log  # verl: "Resuming from .../global_step_<k>"
    assert os.path.isdir(resumed / "checkpoints" / f"global_step_{STEPS}")


def test_metrics_have_every_step_once(runs):
    _, resumed, _ = runs
    rows = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("actor/erc_clipfrac" in r["data"] for r in rows)


def test_same_data_order_as_an_uninterrupted_run(runs):
    reference, resumed, killed_at = runs
    expected, got = _prompts_per_step(reference), _prompts_per_step(resumed)
    assert sorted(expected) == list(range(1, STEPS + 1))
    # the steps trained after the resume (earlier ones may have been killed before their dump was written)
    for step in range(killed_at + 1, STEPS + 1):
        assert got[step] == expected[step], step
