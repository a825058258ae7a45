"""The compact console of `erc-verl train`: its line format, its ETA, and following verl's file logger output."""

import io
import json

import pytest

from omegaconf import OmegaConf

from erc_verl.runs import console
from tests import REPO_ROOT

ACC = "val-core/erc_verl/cpu_arith/acc/mean@1"
ERC_ROW = {
    "timing_s/step": 2.4137,
    "critic/score/mean": 0.61254,
    "actor/erc_clipfrac": 0.01204,
    "actor/entropy_ratio_min": 0.97213,
    "actor/entropy_ratio_max": 1.04291,
    "actor/pg_loss": 0.1,  # one of verl's ~100 other keys: not on the line
}


def test_step_line_with_erc_metrics_and_validation():
    line = console.step_line(7, 40, {**ERC_ROW, ACC: 0.5234, "timing_s/testing": 3.0}, eta_s=82.4)
    assert line == (
        "step  7/40 | 2.41 s | reward 0.613 | val acc 52.3% | erc_clipfrac 0.0120 | H ratio 0.972-1.043 | ETA 1m22s"
    )


def test_step_line_without_validation_or_erc_and_without_eta():
    # a non-ERC loss has no ERC keys: those fields go; an unmeasured validation keeps its column
    line = console.step_line(12, 200, {"timing_s/step": 1.0, "critic/score/mean": 0.25}, eta_s=None)
    assert line == "step  12/200 | 1.00 s | reward 0.250 | val acc   -   | ETA -"
    assert len(console.step_line(3, 40, ERC_ROW, 5.0).split(" | ")) == 7


def test_validation_line_only_when_an_accuracy_was_measured():
    assert console.validation_line({ACC: 0.4531, "val-aux/num_turns/max": 2}) == (
        "[erc-verl] validation before training: val acc 45.3%"
    )
    assert console.validation_line({"val-aux/num_turns/max": 2}) is None


def test_eta_counts_remaining_steps_and_validations():
    history = [{"timing_s/step": 10.0}, {"timing_s/step": 2.0, "timing_s/testing": 4.0}, {"timing_s/step": 4.0}]
    # steps 4..10 left (7) at the mean of the last 2 step times (3 s), validations after steps 5 and 10 at 4 s
    assert console.eta_seconds(history, 3, 10, test_freq=5, window=2) == 7 * 3.0 + 2 * 4.0
    assert console.eta_seconds(history, 3, 10, test_freq=-1, window=2) == 21.0
    assert console.eta_seconds([], 0, 10, test_freq=5) is None
    assert console.validation_steps(0, 40, 10) == 4 and console.validation_steps(38, 40, 15) == 1


def test_progress_follows_the_file_logger_including_a_restart(tmp_path):
    path = tmp_path / "metrics.jsonl.attempt"
    out = io.StringIO()
    progress = console.Progress(str(path), total=2, test_freq=2, out=out)
    progress.poll()  # no file yet
    with open(path, "w") as f:
        f.write(json.dumps({"step": 0, "data": {ACC: 0.5}}) + "\n")
        f.write(json.dumps({"step": 1, "data": ERC_ROW}) + "\n")
        f.write('{"step": 2, "da')  # a row still being written
    progress.poll()
    assert out.getvalue().splitlines() == [
        "[erc-verl] validation before training: val acc 50.0%",
        console.step_line(1, 2, ERC_ROW, 2.4137),
    ]
    with open(path, "a") as f:
        f.write('ta": ' + json.dumps({**ERC_ROW, ACC: 0.75}) + "}\n")
    progress.poll()
    assert out.getvalue().splitlines()[-1].startswith("step 2/2 | 2.41 s | reward 0.613 | val acc 75.0% |")
    path.write_text(json.dumps({"step": 1, "data": ERC_ROW}) + "\n")  # a new attempt starts the file over
    progress.poll()
    assert len(out.getvalue().splitlines()) == 4


def test_wanted_only_with_the_file_logger_and_without_verls_console(tmp_path):
    cfg = OmegaConf.create(
        {
            "erc_verl": {"console": True, "metrics_file": str(tmp_path / "m.jsonl")},
            "trainer": {"logger": ["file"], "total_training_steps": 4, "test_freq": 2, "experiment_name": "x"},
            "data": {"train_batch_size": 16},
            "actor_rollout_ref": {"rollout": {"n": 8}},
            "ray_kwargs": {"ray_init": {"num_cpus": 4}},
        }
    )
    assert console.wanted(cfg)
    for key, value in (("trainer.logger", ["console", "file"]), ("trainer.logger", ["tensorboard"]),
                       ("erc_verl.console", False)):
        other = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        assert not console.wanted(other)
        assert not isinstance(console.follow(other, "unused"), console.Progress)
        assert "log_to_driver" not in other.ray_kwargs.ray_init  # the workers' output stays on

    out = io.StringIO()
    progress = console.follow(cfg, str(tmp_path / "m.jsonl.attempt"))
    progress.out = out
    with pytest.raises(RuntimeError), progress:
        raise RuntimeError("a worker died")
    assert cfg.ray_kwargs.ray_init.log_to_driver is False
    assert "the run failed after 0s; Ray worker logs: /tmp/ray/session_latest/logs" in out.getvalue()
    kept = OmegaConf.merge(cfg, {"ray_kwargs": {"ray_init": {"log_to_driver": True}}})
    with console.follow(kept, str(tmp_path / "m.jsonl.attempt")) as progress:
        progress.out = out
    assert kept.ray_kwargs.ray_init.log_to_driver is True  # a recipe's own setting wins
    assert out.getvalue().splitlines()[-1] == "[erc-verl] training finished in 0s"


def test_lines_for_real_rows_of_verls_file_logger(tmp_path):
    # rows 0, 19 and 20 of a 40-step run of the CPU recipe (test_freq 10), as verl's file logger wrote them
    rows = (REPO_ROOT / "tests" / "data" / "metrics_rows.jsonl").read_text()
    assert len(json.loads(rows.splitlines()[2])["data"]) > 100  # verl's whole dictionary, not a hand-made row
    path = tmp_path / "metrics.jsonl.attempt"
    path.write_text(rows)
    out = io.StringIO()
    console.Progress(str(path), total=40, test_freq=10, out=out).poll()
    # ETA after step 19: 21 steps x 3.554 s; after 20: 20 x mean(3.554, 3.987) + validations at 30 and 40 x 10.53 s
    assert out.getvalue().splitlines() == [
        "[erc-verl] validation before training: val acc 40.4%",
        "step 19/40 | 3.55 s | reward 0.570 | val acc   -   | erc_clipfrac 0.1269 | H ratio 0.311-1.350 | ETA 1m15s",
        "step 20/40 | 3.99 s | reward 0.531 | val acc 39.3% | erc_clipfrac 0.1222 | H ratio 0.773-1.242 | ETA 1m36s",
    ]
