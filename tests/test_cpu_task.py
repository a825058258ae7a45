"""The CPU run's local artifacts: synthetic task, verifier, tokenizer/model in HF format, warm start, cache."""

import json
import os

import pandas as pd
import pytest

from erc_verl.demo import build as prepare, task as sm
from erc_verl.demo.tiny_model import ModelSpec
from erc_verl.demo.warm_start import WarmStartSpec

TINY = (
    sm.TaskSpec(min_a=10, max_a=30, n_val=40),
    ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
    WarmStartSpec(max_steps=30, batch_size=16, lr=3e-3),
)


def test_split_is_disjoint_and_seeded():
    spec = sm.TaskSpec()
    train, val = sm.split(spec)
    assert len(val) == spec.n_val and len(train) + len(val) == len(sm.all_expressions(spec))
    assert not {e for e, _ in train} & {e for e, _ in val}
    assert sm.split(spec) == (train, val)
    assert sm.split(sm.TaskSpec(seed=1))[1] != val
    assert all(eval(e) == v for e, v in train + val)  # noqa: S307  (our own arithmetic strings)


@pytest.mark.parametrize(
    "solution, acc",
    [
        ("\\boxed{52}", True),
        ("so \\boxed{5} then \\boxed{52}", True),
        ("\\boxed{53}", False),
        ("52", False),
        ("", False),
    ],
)
def test_compute_score(solution, acc):
    out = sm.compute_score(sm.DATA_SOURCE, solution, "52")
    assert out["acc"] is acc and out["score"] == float(acc)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache") / "tiny")
    return root, prepare.ensure_artifacts(root, *TINY)


def test_artifacts_load_like_any_checkpoint_and_dataset(artifacts):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    root, paths = artifacts
    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert tok.decode(tok.encode("\\boxed{52}", add_special_tokens=False)) == "\\boxed{52}"
    assert tok.eos_token == "<|im_end|>"

    rows = pd.read_parquet(paths["val"])
    assert set(rows.columns) >= {"data_source", "prompt", "reward_model", "extra_info"}
    assert len(rows) == TINY[0].n_val
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.create({"max_prompt_length": 32, "return_raw_chat": True, "filter_overlong_prompts": False})
    ds = RLHFDataset(data_files=paths["train"], tokenizer=tok, config=data_cfg)
    item = ds[0]
    assert item["raw_prompt"][0]["role"] == "user" and "What is" in item["raw_prompt"][0]["content"]

    spec = json.load(open(paths["spec"]))
    assert spec["warm_start_result"]["final_loss"] < 3.0


def test_cache_is_reused_and_rebuilt_when_the_spec_changes(artifacts):
    root, paths = artifacts
    mtime = os.path.getmtime(paths["spec"])
    prepare.ensure_artifacts(root, *TINY)
    assert os.path.getmtime(paths["spec"]) == mtime
    changed = (TINY[0], TINY[1], WarmStartSpec(max_steps=31, batch_size=16, lr=3e-3))
    prepare.ensure_artifacts(root, *changed)
    assert json.load(open(paths["spec"]))["warm_start"]["max_steps"] == 31
    assert not [d for d in os.listdir(os.path.dirname(root)) if d.startswith(".building-")]


def test_warm_start_learns(artifacts):
    import torch

    from erc_verl.demo.tiny_model import build_model, build_tokenizer
    from erc_verl.demo.warm_start import warm_start

    task, model_spec, _ = TINY
    tok = build_tokenizer(sm.corpus(task), model_spec.vocab_size)
    model = build_model(model_spec, tok)
    losses = warm_start(model, tok, sm.split(task)[0], WarmStartSpec(max_steps=40, stop_loss=0.0, batch_size=16), 0)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    stopped = warm_start(build_model(model_spec, tok), tok, sm.split(task)[0], WarmStartSpec(stop_loss=2.0), 0)
    assert 20 < len(stopped) < 1500  # stops once the smoothed loss is below stop_loss
    assert not model.training and torch.get_num_threads() >= 1
