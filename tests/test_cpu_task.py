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
    WarmStartSpec(max_steps=30, check_every=10, n_calibration=32, batch_size=16, lr=3e-3),
)


def test_split_is_disjoint_and_seeded():
    spec = sm.TaskSpec()
    train, val = sm.split(spec)
    assert len(val) == spec.n_val and len(train) + len(val) == len(sm.all_expressions(spec))
    assert not {e for e, _ in train} & {e for e, _ in val}
    assert sm.split(spec) == (train, val)
    assert sm.split(sm.TaskSpec(seed=1))[1] != val
    assert all(eval(e) == v for e, v in train + val)  # noqa: S307  (our own arithmetic strings)
    assert {e for e, _ in train + val} >= {"10+9", "99+0", "10-9", "99-0"} and len(train + val) == 2 * 90 * 10
    assert len(sm.all_expressions(sm.TaskSpec(ops="+"))) == 900


@pytest.mark.parametrize("bad", [{"ops": "*"}, {"ops": ""}, {"n_val": 0}, {"n_val": 1800}])
def test_bad_task_spec_names_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        sm.split(sm.TaskSpec(**bad))


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
    assert spec["warm_start_result"]["steps"] == 30 and 0.0 <= spec["warm_start_result"]["accuracy"] <= 1.0


def test_cache_is_reused_and_rebuilt_when_the_spec_changes(artifacts):
    root, paths = artifacts
    mtime = os.path.getmtime(paths["spec"])
    prepare.ensure_artifacts(root, *TINY)
    assert os.path.getmtime(paths["spec"]) == mtime
    changed = (TINY[0], TINY[1], WarmStartSpec(max_steps=31, check_every=10, n_calibration=32, batch_size=16, lr=3e-3))
    prepare.ensure_artifacts(root, *changed)
    assert json.load(open(paths["spec"]))["warm_start"]["max_steps"] == 31
    assert not [d for d in os.listdir(os.path.dirname(root)) if d.startswith(".building-")]


def test_warm_start_stops_at_the_sampled_accuracy(monkeypatch):
    """It trains until the calibration prompts, never trained on, are answered right at the target rate."""
    import torch

    from erc_verl.demo import warm_start as ws
    from erc_verl.demo.tiny_model import build_model, build_tokenizer

    task, model_spec, _ = TINY
    tok = build_tokenizer(sm.corpus(task), model_spec.vocab_size)
    train = sm.split(task)[0]
    seen, measured = set(), []
    real_encode, real_accuracy = ws.encode_pair, ws.sampled_accuracy

    def encode(tokenizer, expr, value):
        seen.add(expr)
        return real_encode(tokenizer, expr, value)

    def accuracy(model, tokenizer, exprs, temperature, seed):
        measured.append((tuple(exprs), temperature))
        return [0.1, 0.3, 0.6, 0.9][len(measured) - 1]

    monkeypatch.setattr(ws, "encode_pair", encode)
    monkeypatch.setattr(ws, "sampled_accuracy", accuracy)
    spec = WarmStartSpec(stop_accuracy=0.5, temperature=1.3, n_calibration=32, check_every=5, batch_size=8)
    result = ws.warm_start(build_model(model_spec, tok), tok, train, spec, verbose=False)
    assert result["steps"] == 15 and result["accuracy"] == 0.6  # the third check reaches 50%
    assert all(m == (tuple(train[:32]), 1.3) for m in measured)
    assert not seen & {e for e, _ in train[:32]}  # calibration prompts are never trained on
    with pytest.raises(ValueError, match="n_calibration"):
        ws.warm_start(build_model(model_spec, tok), tok, train[:10], spec, verbose=False)
    assert torch.get_num_threads() >= 1


def test_warm_start_learns_and_accuracy_is_measured_by_sampling():
    from erc_verl.demo.tiny_model import build_model, build_tokenizer
    from erc_verl.demo.warm_start import sampled_accuracy, warm_start

    task = sm.TaskSpec(min_a=10, max_a=60, max_b=1, ops="+", n_val=5)  # a+0: copying digits generalises quickly
    model_spec = ModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1)
    tok = build_tokenizer(sm.corpus(task), model_spec.vocab_size)
    model = build_model(model_spec, tok)
    train = sm.split(task)[0]
    assert sampled_accuracy(model, tok, train, 1.0, 0) == 0.0  # an untrained model never writes \boxed{answer}
    spec = WarmStartSpec(stop_accuracy=0.9, temperature=0.5, n_calibration=8, check_every=25, max_steps=600,
                         batch_size=16, lr=3e-3)
    result = warm_start(model, tok, train, spec, verbose=False)
    assert result["accuracy"] >= 0.9 and result["steps"] < 600 and not model.training
    assert sampled_accuracy(model, tok, train[:8], 0.5, 0) == result["accuracy"]  # seeded: the same measurement


def test_recipe_sections_become_specs_and_an_unknown_key_is_named():
    from omegaconf import OmegaConf

    from erc_verl.runs.recipes import compose

    cfg = compose("cpu_tiny_erc_dapo", ["actor_rollout_ref.rollout.temperature=1.7"])
    task, model_spec, ws = prepare.specs_from_config(cfg.erc_verl.demo)
    assert (task.n_val, task.ops, ws.temperature, ws.seed) == (512, "+-", 1.7, 0)  # the rollout's temperature
    old = OmegaConf.create({"warm_start": {"stop_loss": 0.12}})
    with pytest.raises(ValueError, match=r"erc_verl\.demo\.warm_start\.stop_loss: no such setting"):
        prepare.specs_from_config(old)
