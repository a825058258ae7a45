"""Smoke tests of the benchmarks: each script runs with --quick and writes well-formed results.

Only that they run and what they write: the figures themselves (and their targets) live in bench/RESULTS.md.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path, *extra: str, name: str = "") -> dict:
    name = name or script.removeprefix("bench_")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick", "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / f"{name}_quick.json").read_text())
    assert result["benchmark"] == f"{name}_quick"
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1
    assert result["rows"]
    return result


def numbers(row: dict) -> list[float]:
    return [v for v in row.values() if isinstance(v, float)]


def test_bench_loss(tmp_path):
    rows = run_quick("bench_loss", tmp_path)["rows"]
    assert [r["loss_mode"] for r in rows] == ["vanilla", "erc_dapo", "gppo", "erc_gppo"]
    for row in rows:
        assert row["median_ms"] > 0 and row["peak_mib"] > 0
        assert all(math.isfinite(v) for v in numbers(row))
    assert rows[0]["time_ratio"] == rows[2]["time_ratio"] == 1.0


def test_bench_entropy(tmp_path):
    rows = run_quick("bench_entropy", tmp_path)["rows"]
    methods = {r["method"] for r in rows}
    assert {"none", "autograd", "checkpoint_chunked", "nograd_chunked"} <= methods
    assert {r["source"] for r in rows} == {"logits", "hidden"}
    for row in rows:
        assert row["step_peak_mib"] > 0 and all(math.isfinite(v) for v in numbers(row))
        assert row["source"] == "hidden" or row["step_ms"] > 0  # the hidden source is memory only
    # the autograd entropy keeps its graph after the call; under no_grad nothing is kept
    by_method = {r["method"]: r for r in rows if r["source"] == "logits"}
    assert by_method["autograd"]["call_held_mib"] > by_method["nograd_chunked"]["call_held_mib"]


def test_bench_rollout(tmp_path):
    rows = run_quick("bench_rollout", tmp_path)["rows"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["params_m"] > 0


@pytest.mark.e2e
def test_bench_e2e(tmp_path):
    # validation off: only the training steps are timed, and the smoke test stays short
    result = run_quick("bench_e2e", tmp_path, "--", "trainer.val_before_train=false", "trainer.test_freq=-1")
    assert {r["mode"] for r in result["rows"]} == {"dapo", "erc_dapo"}
    for run in result["runs"]:
        assert run["step_s"] > 0 and run["worker_peak_mib"] > 0 and run["processes"] > 1


@pytest.mark.e2e
def test_bench_e2e_pipeline(tmp_path):
    # one 2-step run of the recipe (dynamic sampling off, validation before and after), then `sample` alone
    result = run_quick("bench_e2e", tmp_path, "--pipeline", name="pipeline")
    (row,) = result["rows"]
    assert row["steps"] == 2 and 0 < row["first_row_s"] < row["wall_s"]
    assert row["validation_s"] > 0 and row["gen_s"] > 0 and row["gen_tokens_per_s"] > 0
    assert len(result["runs"][0]["validation_s"]) == 1  # after the last step (verl times none before training)
    assert result["sample_alone"]["batch"] == 128 and result["sample_alone"]["tokens_per_s"] > 0
    assert result["alone_over_pipeline"] == pytest.approx(
        result["sample_alone"]["tokens_per_s"] / row["gen_tokens_per_s"])


def test_fuzz_reward(tmp_path):
    from erc_verl.reward.judge import REASONS

    result = run_quick("fuzz_reward", tmp_path)  # exits non-zero on a crash or a response past its deadline
    total = result["rows"][-1]
    assert total["category"] == "all" and total["n"] == 200
    assert total["crashes"] == 0 and total["past_deadline"] == 0
    assert {r["category"] for r in result["rows"][:-1]} >= {"brackets", "one_megabyte", "tower", "empty_like"}
    assert set(result["reasons"]) <= set(REASONS) | {"verdict"} and sum(result["reasons"].values()) == 200
    assert result["replacements"] >= 0 and total["max_ms"] > 0
