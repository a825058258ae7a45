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
    _write(metrics, [(0, {"val": 0.1}), _trained(1, loss=1.0), _trained(2, loss=0.9)])
    (ckpt / "global_step_1").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    metrics_log.start(cfg, metrics)
    assert [s for s, _ in _steps(metrics)] == [0, 1]
    # resume_mode=disable trains from scratch whatever is on disk
    metrics_log.start(verl_config(f"trainer.default_local_dir={ckpt}", "trainer.resume_mode=disable"), metrics)
    assert _steps(metrics) == []


def _checkpoints(ckpt, steps, latest, pruned=()):
    """verl's checkpoint folder: global_step_<s>/ (with actor/ unless pruned) and the tracker file."""
    for step in steps:
        (ckpt / f"global_step_{step}").mkdir(parents=True)
        if step not in pruned:
            (ckpt / f"global_step_{step}" / "actor").mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text(str(latest))


def _trained(step, **data):
    return step, {metrics_log.TRAINING_ROW_KEY: step, **data}


def _killed_between_save_and_log(tmp_path, saved, pruned=()):
    """Attempt 1 logged steps 1 and 2, saved checkpoints `saved` (the last one: step 3) and was killed before
    logging step 3. Returns the config and the metrics file a rerun starts with."""
    metrics, ckpt = str(tmp_path / "metrics.jsonl"), tmp_path / "ckpt"
    _checkpoints(ckpt, saved, latest=3, pruned=pruned)
    _write(metrics_log.attempt_path(metrics), [(0, {"val": 0.1}), _trained(1), _trained(2)])
    return verl_config(f"trainer.default_local_dir={ckpt}", "trainer.resume_mode=auto"), metrics, ckpt


def test_a_checkpoint_without_its_row_resumes_from_the_one_before(tmp_path, capsys):
    cfg, metrics, ckpt = _killed_between_save_and_log(tmp_path, saved=[1, 2, 3])
    metrics_log.start(cfg, metrics)
    assert (cfg.trainer.resume_mode, cfg.trainer.resume_from_path) == ("resume_path", str(ckpt / "global_step_2"))
    assert [s for s, _ in _steps(metrics)] == [0, 1, 2]
    assert "global_step_3 has no metrics row" in capsys.readouterr().err
    # the rerun trains step 3 again and logs it: every step once
    _write(metrics_log.attempt_path(metrics), [(2, {"val": 0.2}), _trained(3)])
    metrics_log.fold(metrics)
    assert [s for s, _ in _steps(metrics)] == [0, 1, 2, 3]


def test_a_first_checkpoint_without_its_row_trains_from_scratch(tmp_path):
    cfg, metrics, _ = _killed_between_save_and_log(tmp_path, saved=[3])
    metrics_log.start(cfg, metrics)
    assert cfg.trainer.resume_mode == "disable"
    assert _steps(metrics) == []


def test_pruned_checkpoints_cannot_be_resumed_from(tmp_path, capsys):
    # max_actor_ckpt_to_keep=1 removed the earlier checkpoints' weights: resume where verl would
    cfg, metrics, _ = _killed_between_save_and_log(tmp_path, saved=[1, 2, 3], pruned=[1, 2])
    metrics_log.start(cfg, metrics)
    assert cfg.trainer.resume_mode == "auto"
    assert [s for s, _ in _steps(metrics)] == [0, 1, 2]
    assert "without step 3's training metrics" in capsys.readouterr().err


def test_a_checkpoint_with_its_row_is_resumed_from(tmp_path):
    cfg, metrics, _ = _killed_between_save_and_log(tmp_path, saved=[1, 2])
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    metrics_log.start(cfg, metrics)
    assert cfg.trainer.resume_mode == "auto"
    assert [s for s, _ in _steps(metrics)] == [0, 1, 2]
    # a row with only validation metrics (logged at a resume) does not count as the step's row
    _write(metrics, [(0, {"val": 0.1}), _trained(1), (2, {"val": 0.3})])
    metrics_log.start(cfg, metrics)
    assert cfg.trainer.resume_from_path.endswith("global_step_1")
