"""A killed run resumes from its last checkpoint: same data order, no step lost or repeated in the metrics.

The CPU recipe is started, and its whole process group (driver and the Ray cluster it owns) is SIGKILLed at the
worst point: verl has saved step 2's checkpoint but not yet logged step 2's metrics (`StopAfterSave`, verl's
checkpoint callback, holds the trainer there). The same command is then run again: it resumes from step 1's
checkpoint, the newest with its metrics row, and trains step 2 again. An uninterrupted run of the same command is
the reference for which prompts each step trains on (dynamic sampling off, so step k trains on dataloader batch k).
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback

from erc_verl.runs import metrics as metrics_log
from tests import REPO_ROOT

pytestmark = pytest.mark.e2e

STEPS = 3
KILL_AT_STEP = 2
# Only a guard against a hung run: a run takes about a minute on an idle machine and may take many times that
# with both cores busy.
RUN_TIMEOUT_S = 3600
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


class StopAfterSave(CheckpointCallback):
    """Holds the trainer right after step KILL_AT_STEP's checkpoint (tracker file written), before that step is
    validated and logged, and says so with a file next to the checkpoints: the test kills the run there."""

    def on_save(self, trainer, global_step, checkpoint_dir, async_save=False, **kwargs):
        if global_step == KILL_AT_STEP:
            with open(_stopped_marker(self.config.trainer.default_local_dir), "w") as f:
                f.write(str(global_step))
            time.sleep(3600)


def _stopped_marker(checkpoints_dir):
    return os.path.join(os.path.dirname(os.path.abspath(checkpoints_dir)), "stopped_after_save")


def _command(work, name, *extra):
    ray_tmp = f"/tmp/ray_erc_{os.getpid()}_{name}"  # own Ray session dir: found again to clean up after a kill
    env = dict(
        os.environ,
        ERC_VERL_CACHE=os.environ.get("ERC_VERL_CACHE", str(REPO_ROOT / ".cache" / "erc_verl")),
        ERC_VERL_RUN_DIR=str(work / "run"),
        PYTHONUNBUFFERED="1",
        # the trainer (a Ray actor) imports StopAfterSave from this module
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, "-m", "erc_verl", "train", "cpu_tiny_erc_dapo", *OVERRIDES, *extra,
           f"trainer.rollout_data_dir={work / 'run' / 'rollouts'}", f"+ray_kwargs.ray_init._temp_dir={ray_tmp}"]
    return cmd, env, ray_tmp


def _run(work, name):
    cmd, env, _ = _command(work, name)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def _kill_between_save_and_log(work, name):
    cmd, env, ray_tmp = _command(work, name, f"trainer.checkpoint_callback_class={__name__}.StopAfterSave")
    marker = _stopped_marker(work / "run" / "checkpoints")
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + RUN_TIMEOUT_S
        while not os.path.exists(marker):
            assert proc.poll() is None, f"run ended before step {KILL_AT_STEP}'s checkpoint: " \
                f"{(work / f'{name}.log').read_text()[-4000:]}"
            assert time.time() < deadline, f"no checkpoint of step {KILL_AT_STEP} within {RUN_TIMEOUT_S} s"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray daemons that left the process group die too, as on a lost node
    for p in psutil.process_iter(["cmdline"]):
        if ray_tmp in " ".join(p.info["cmdline"] or []):
            p.kill()
    tracker = work / "run" / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text())


def _saved_at(run_dir, step):
    """When step `step`'s checkpoint was written (a rerun that trains the step again rewrites it)."""
    return os.stat(run_dir / "checkpoints" / f"global_step_{step}" / "data.pt").st_mtime_ns


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
    killed_at = _kill_between_save_and_log(resumed, "killed")
    run_dir = resumed / "run"
    attempt = metrics_log.attempt_path(str(run_dir / "metrics.jsonl"))
    killed = {
        "checkpoint": killed_at,
        "logged": [row["step"] for row in metrics_log.read_rows(attempt)],
        "saved_at": {step: _saved_at(run_dir, step) for step in (killed_at - 1, killed_at)},
    }
    _run(resumed, "rerun")
    return reference / "run", run_dir, killed


def test_rerun_resumes_from_the_newest_checkpoint_with_its_metrics(runs):
    _, resumed, killed = runs
    assert killed["checkpoint"] == KILL_AT_STEP and killed["logged"] == list(range(1, KILL_AT_STEP))
    log = (resumed.parent / "rerun.log").read_text()
    assert f"global_step_{KILL_AT_STEP} has no metrics row" in log
    assert f"resuming from global_step_{KILL_AT_STEP - 1}" in log
    # step KILL_AT_STEP - 1 was not trained again, step KILL_AT_STEP was
    assert _saved_at(resumed, KILL_AT_STEP - 1) == killed["saved_at"][KILL_AT_STEP - 1]
    assert _saved_at(resumed, KILL_AT_STEP) != killed["saved_at"][KILL_AT_STEP]
    assert os.path.isdir(resumed / "checkpoints" / f"global_step_{STEPS}")


def test_metrics_have_every_step_once(runs):
    _, resumed, _ = runs
    rows = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("actor/erc_clipfrac" in r["data"] for r in rows)


def test_same_data_order_as_an_uninterrupted_run(runs):
    reference, resumed, _ = runs
    expected, got = _prompts_per_step(reference), _prompts_per_step(resumed)
    assert sorted(expected) == list(range(1, STEPS + 1))
    # the steps trained after the resume (earlier ones may have been killed before their dump was written)
    for step in range(KILL_AT_STEP, STEPS + 1):
        assert got[step] == expected[step], step
