"""`erc-verl eval`: pass@k / avg@n arithmetic, the paper-style table, and a real run on a tiny local model."""

import json
import math

import pandas as pd
import pytest

from erc_verl.runs import evaluate
from erc_verl.cli import main as cli_main


def test_pass_at_k_hand_computed():
    # n=4, c=1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6, pass@4 = 1
    assert evaluate.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert evaluate.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert evaluate.pass_at_k(4, 1, 4) == 1.0
    assert evaluate.pass_at_k(4, 0, 4) == 0.0


def test_summary_and_table_layout():
    summary = evaluate.summarize([[True, False, False, False], [True, True, False, False]], ks=(1, 2, 8))
    assert summary["avg@4"] == pytest.approx(3 / 8)
    assert summary["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert "pass@8" not in summary  # k > n is not estimable
    table = evaluate.markdown_table(
        {"dapo": {"aime2024": summary, "aime2025": summary}, "erc_dapo": {"aime2024": summary}}
    )
    lines = table.splitlines()
    assert lines[0] == "| avg@4 | aime2024 | aime2025 |"
    assert lines[2] == "| dapo | 37.5 | 37.5 |"
    assert lines[3] == "| erc_dapo | 37.5 | - |"
    assert "| pass@1 | aime2024 | aime2025 |" in lines


def test_scores_generated_text_with_the_reward(monkeypatch, tmp_path):
    """The whole evaluate() path with generation replaced by known responses (2 problems x 4 samples)."""
    data = tmp_path / "bench.parquet"
    pd.DataFrame(
        [
            {"data_source": "math", "prompt": [{"role": "user", "content": "1+1?"}],
             "reward_model": {"ground_truth": "2"}},
            {"data_source": "math", "prompt": [{"role": "user", "content": "2+2?"}],
             "reward_model": {"ground_truth": "4"}},
        ]
    ).to_parquet(data)
    canned = [[r"\boxed{2}", r"\boxed{3}", r"\boxed{2}", "no answer"], [r"\boxed{5}"] * 4]
    monkeypatch.setattr(evaluate, "pick_backend", lambda name: lambda *a, **k: canned)

    class _Tokenizer:
        def apply_chat_template(self, messages, **kwargs):
            return messages[0]["content"]

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda path: _Tokenizer())
    from verl.utils.reward_score import default_compute_score

    results = evaluate.evaluate(
        {"run": "unused"}, {"bench": str(data)}, default_compute_score, n=4, temperature=1.0, top_p=1.0,
        max_tokens=8, ks=(1, 4),
    )
    assert results["run"]["bench"]["avg@4"] == pytest.approx(2 / 8)
    assert results["run"]["bench"]["pass@4"] == pytest.approx(0.5)


def test_malformed_benchmark_names_the_problem(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame([{"prompt": [{"role": "user", "content": "x"}], "reward_model": {"style": "rule"}}]).to_parquet(bad)
    with pytest.raises(ValueError, match="row 0: reward_model.ground_truth"):
        evaluate.load_benchmark(str(bad))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny Qwen2 model and the synthetic arithmetic split, built locally like the CPU recipe's."""
    from erc_verl.demo import task as synthetic_math, tiny_model

    root = tmp_path_factory.mktemp("eval")
    spec = synthetic_math.TaskSpec(n_val=6)
    tokenizer = tiny_model.build_tokenizer(synthetic_math.corpus(spec), tiny_model.ModelSpec().vocab_size)
    model = tiny_model.build_model(tiny_model.ModelSpec(), tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    synthetic_math.write_parquet(spec, str(root / "train.parquet"), str(root / "arith_val.parquet"))
    return root


def test_cli_on_a_tiny_local_model(tiny_model, capsys):
    out = tiny_model / "out"
    code = cli_main(
        ["eval", "--model", f"tiny={tiny_model / 'model'}", "--data", str(tiny_model / "arith_val.parquet"),
         "--reward", "pkg://erc_verl.demo.task:compute_score", "--n", "4", "--k", "1,2,4", "--max-response-length", "6", "--temperature", "1.0", "--out", str(out)]
    )
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    bench = report["results"]["tiny"]["arith_val"]
    assert bench["problems"] == 6 and bench["n"] == 4
    assert 0.0 <= bench["avg@4"] <= bench["pass@2"] <= bench["pass@4"] <= 1.0
    assert all(math.isfinite(v) for v in bench.values())
    table = (out / "eval.md").read_text()
    assert table.splitlines()[0] == "| avg@4 | arith_val |"
    assert table.splitlines()[2].startswith("| tiny | ")
    assert "eval.md" in capsys.readouterr().out


def test_cli_rejects_missing_paths(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["eval", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "x.parquet")])


def test_checkpoint_without_hf_weights_says_how_to_save_them(tmp_path):
    hf = tmp_path / "global_step_10" / "actor" / "huggingface"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")  # verl always saves the config and tokenizer, weights only with hf_model
    with pytest.raises(SystemExit, match="save_contents including hf_model"):
        evaluate.model_dir(str(tmp_path / "global_step_10"))
    (hf / "model.safetensors").write_bytes(b"")
    assert evaluate.model_dir(str(tmp_path / "global_step_10")) == str(hf)
    assert evaluate.model_dir(str(hf)) == str(hf)
    with pytest.raises(SystemExit, match="neither an HF model directory nor a verl checkpoint"):
        evaluate.model_dir(str(tmp_path))
