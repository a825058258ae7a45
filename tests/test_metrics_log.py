"""The run's metrics file across attempts: every step once, nothing lost, nothing repeated."""

import json

from erc_verl.runs import metrics as metrics_log
from tests.verl_config import verl_config


def _write(path, rows, tail=""):
    with open(path, "w") as f:
        for step, data in rows:
            f.write(json.dumps({"step": step, "data": data}) + "\n")
        f.write(tail)


def _steps(path):
    return [(r["step"], r["data"]) for r in metrics_log.read_rows(path)]


def test_resume_keeps_steps_up_to_the_checkpoint_and_merges_the_revalidation(tmp_path):
    metrics = str(tmp_path / "metrics.jsonl")
    # attempt 1 was killed during step 4, after the checkpoint of step 2; its last line is cut short
    _write(
        metrics_log.attempt_path(metrics),
        [(0, {"val": 0.1}), (1, {"loss": 1.0}), (2, {"loss": 0.9}), (3, {"loss": 0.8})],
        tail='{"step": 4, "da',
    )
    metrics_log.fold(metrics, keep_through_step=2)
    assert _steps(metrics) == [(0, {"val": 0.1}), (1, {"loss": 1.0}), (2, {"loss": 0.9})]
    # attempt 2 resumes at step 2: validates again at step 2, then trains steps 3 and 4
    _write(metrics_log.attempt_path(metrics), [(2, {"val": 0.3}), (3, {"loss": 0.7}), (4, {"loss": 0.6})])
    metrics_log.fold(metrics)
    assert _steps(metrics) == [
        (0, {"val": 0.1}), (1, {"loss": 1.0}), (2, {"loss": 0.9, "val": 0.3}), (3, {"loss": 0.7}), (4, {"loss": 0.6}),
    ]
    assert not (tmp_path / "metrics.jsonl.attempt").exists()


def test_start_follows_verls_checkpoints(tmp_path):
    metrics = str(tmp_path / "run" / "metrics.jsonl")
    ckpt = tmp_path / "ckpt"
    cfg = verl_config(f"trainer.default_local_dir={ckpt}", "trainer.resume_mode=auto")
    # no checkpoint: a run from scratch starts an empty file
    (tmp_path / "run").mkdir()
    _write(metrics, [(0, {"val": 0.1}), (1, {"loss": 1.0})])
    assert metrics_log.start(cfg, metrics) == metrics + ".attempt"
    assert _steps(metrics) == []
    # a checkpoint at step 1 (verl's tracker file): keep steps <= 1
    _write(metrics, [(0, {"val": 0.1}), (1, {"loss": 1.0}), (2, {"loss": 0.9})])
    (ckpt / "global_step_1").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    metrics_log.start(cfg, metrics)
    assert [s for s, _ in _steps(metrics)] == [0, 1]
    # resume_mode=disable trains from scratch whatever is on disk
    metrics_log.start(verl_config(f"trainer.default_local_dir={ckpt}", "trainer.resume_mode=disable"), metrics)
    assert _steps(metrics) == []
