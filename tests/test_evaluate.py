"""`erc-verl eval`: pass@k / avg@n arithmetic, the paper-style table, prompts tokenised as training tokenises them,
one engine per model (vLLM replaced by a stand-in that records what it is given), and a real run on a tiny model."""

import json
import math
import sys
import types

import pandas as pd
import pytest

from erc_verl.runs import evaluate
from erc_verl.cli import main as cli_main
from tests import TEST_DATA


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
         "--reward", "pkg://erc_verl.demo.task:compute_score", "--n", "4", "--k", "1,2,4",
         "--max-response-length", "6", "--temperature", "1.0", "--out", str(out)]
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


def test_scores_generated_text_with_the_reward(tiny_model, monkeypatch):
    """The whole evaluate() path with generation replaced by known responses (2 problems x 4 samples)."""
    data = tiny_model / "bench.parquet"
    pd.DataFrame(
        [
            {"data_source": "math", "prompt": [{"role": "user", "content": "1+1?"}],
             "reward_model": {"ground_truth": "2"}},
            {"data_source": "math", "prompt": [{"role": "user", "content": "2+2?"}],
             "reward_model": {"ground_truth": "4"}},
        ]
    ).to_parquet(data)
    canned = [[r"\boxed{2}", r"\boxed{3}", r"\boxed{2}", "no answer"], [r"\boxed{5}"] * 4]

    class CannedEngine:
        def __init__(self, model_path, seed, max_model_len):
            pass

        def generate(self, prompts, *args):
            return canned

        def close(self):
            pass

    monkeypatch.setattr(evaluate, "pick_backend", lambda name: CannedEngine)
    from verl.utils.reward_score import default_compute_score

    results = evaluate.evaluate(
        {"run": str(tiny_model / "model")}, {"bench": str(data)}, default_compute_score, n=4, temperature=1.0,
        top_p=1.0, max_tokens=8, ks=(1, 4),
    )
    assert results["run"]["bench"]["avg@4"] == pytest.approx(2 / 8)
    assert results["run"]["bench"]["pass@4"] == pytest.approx(0.5)


# ---- vLLM: token ids as training builds them, one engine per model -------------------------------------------

BOS, EOS, USER, ASSISTANT = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>", \
    "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"


@pytest.fixture(scope="module")
def r1_style_model(tmp_path_factory, tiny_model):
    """A model directory whose tokenizer behaves like R1-Distill-Qwen's: its chat template starts with the BOS and
    encoding text adds a BOS too (add_bos_token), so a text prompt tokenised again carries two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    questions = [row["prompt"][0]["content"] for row in _rows("aime2024")]
    tok.train_from_iterator(questions + ["<think>\n"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS, USER, ASSISTANT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "<think>\n{% endif %}"
    )
    path = tmp_path_factory.mktemp("r1_style") / "model"
    tokenizer.save_pretrained(path)
    AutoConfig.from_pretrained(tiny_model / "model").save_pretrained(path)  # model_type qwen2, as R1-Distill-Qwen
    return path


def _rows(name):
    return [json.loads(line) for line in (TEST_DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]


class _StandInLLM:
    """Records what vLLM's offline `LLM` is given and when its engine is shut down."""

    events: list = []

    def __init__(self, model, seed, max_model_len):
        self.model = model
        self.events.append(("load", model, max_model_len))
        self.llm_engine = types.SimpleNamespace(
            engine_core=types.SimpleNamespace(shutdown=lambda: self.events.append(("shutdown", model)))
        )

    def generate(self, prompts, params):
        self.events.append(("generate", self.model, [p["prompt_token_ids"] for p in prompts], params.n))
        output = types.SimpleNamespace(text="</think> \\boxed{204}")
        return [types.SimpleNamespace(outputs=[output] * params.n) for _ in prompts]


@pytest.fixture
def stand_in_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = _StandInLLM
    vllm.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    vllm.inputs = types.ModuleType("vllm.inputs")
    vllm.inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", vllm.inputs)
    _StandInLLM.events = []
    return _StandInLLM.events


def test_vllm_gets_training_token_ids_and_one_engine_per_model(tiny_model, r1_style_model, stand_in_vllm):
    from transformers import AutoConfig, AutoTokenizer
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    models = {"tiny": str(tiny_model / "model"), "r1": str(r1_style_model)}
    benchmarks = {name: str(TEST_DATA / f"{name}.jsonl") for name in ("aime2024", "aime2025")}
    results = evaluate.evaluate(models, benchmarks, lambda **kw: 1.0, n=2, temperature=0.6, top_p=0.95,
                                max_tokens=16, backend="vllm")
    assert set(results) == {"tiny", "r1"} and set(results["r1"]) == {"aime2024", "aime2025"}

    # one engine per model, loaded once for both benchmarks and shut down before the next model loads
    assert [event[:2] for event in stand_in_vllm] == [
        *[(event, models["tiny"]) for event in ("load", "generate", "generate", "shutdown")],
        *[(event, models["r1"]) for event in ("load", "generate", "generate", "shutdown")],
    ]
    sent = {(event[1], bench): event[2] for event, bench in zip(
        [e for e in stand_in_vllm if e[0] == "generate"], ["aime2024", "aime2025"] * 2)}
    for run, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        if run == "tiny":  # the Qwen builder verl's agent loop picks for model_type qwen2
            training = create_continuous_token_builder(
                tokenizer, hf_model_type=AutoConfig.from_pretrained(path).model_type)
        for bench in benchmarks:
            rows = _rows(bench)
            ids = sent[(path, bench)]
            assert len(ids) == len(rows) == 30
            for row, prompt_ids in zip(rows, ids):
                if run == "tiny":
                    assert prompt_ids == training.build_initial_tokens(row["prompt"])
                    continue
                text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
                assert tokenizer.decode(prompt_ids) == text  # exactly the template, nothing added
                assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
                # what vLLM would have made of the text prompt: a second BOS
                assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2
        load = next(e for e in stand_in_vllm if e[:2] == ("load", path))
        assert load[2] == max(len(p) for bench in benchmarks for p in sent[(path, bench)]) + 16


def test_prompts_are_cut_from_the_left_like_training(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model / "model")
    rows = _rows("aime2024")[:2]
    full = evaluate.prompt_token_ids(tokenizer, rows)
    cut = evaluate.prompt_token_ids(tokenizer, rows, max_prompt_length=10)
    assert [ids[-10:] for ids in full] == cut


def test_pick_backend():
    assert evaluate.pick_backend("vllm") is evaluate.VllmEngine
    assert evaluate.pick_backend("hf") is evaluate.HfEngine


def test_a_paper_recipe_supplies_the_training_prompt_settings(tiny_model, tmp_path, monkeypatch):
    """`--recipe`: the benchmarks, the reward with the recipe's options, the prompt length and template options."""
    from erc_verl.data.prepare import prepare

    for name in ("aime2024", "aime2025"):
        prepare(name, TEST_DATA / f"{name}.jsonl", tmp_path)
    monkeypatch.setenv("ERC_VERL_DATA_DIR", str(tmp_path))
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda models, benchmarks, score_fn, **kw: seen.update(
        benchmarks=benchmarks, score_fn=score_fn, **kw) or {"run": {}})
    assert cli_main(["eval", "--recipe", "erc_dapo_r1_distill_1p5b", "--model", f"run={tiny_model / 'model'}",
                     "--out", str(tmp_path / "out")]) == 0
    assert set(seen["benchmarks"]) == {"aime2024", "aime2025"}
    assert (seen["max_prompt_length"], seen["chat_template_kwargs"], seen["max_tokens"]) == (4096, {}, 32768)
    assert seen["score_fn"].args[1] == {"rules": "official"}  # verl's wrapper around the reward, with its kwargs
