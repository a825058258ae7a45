"""Data preparation from local files (the hub path needs network access, which tests don't have)."""

import json

import pandas as pd
import pytest

from erc_verl.data import INSTRUCTION, PROMPT_TEMPLATE, SOURCES, DataError, format_prompt, prepare
from erc_verl.data.prepare import main
from erc_verl.reward.judge import score_in_process

from tests import TEST_DATA


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_prompt_is_the_raw_question_unless_asked():
    # the official data's prompts are the questions themselves
    assert format_prompt("  What is 1+1? ") == "  What is 1+1? "
    assert PROMPT_TEMPLATE.format(question="What is 1+1?") == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    once = format_prompt("  What is 1+1? ", instruction=True)
    assert once == PROMPT_TEMPLATE.format(question="What is 1+1?")
    assert format_prompt(once, instruction=True) == once  # preparing prepared data changes nothing


@pytest.mark.parametrize("name", ["aime2024", "aime2025"])
def test_aime_files(tmp_path, name):
    """tests/data holds the official ERC code's AIME rows: prepared, their prompts stay exactly as they are."""
    path = TEST_DATA / f"{name}.jsonl"
    source_rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = prepare(name, path, tmp_path)
    frame = pd.read_parquet(out)
    assert out.name == f"{name}.parquet" and len(frame) == len(source_rows) == 30
    assert set(frame.data_source) == {SOURCES[name].data_source}
    for i, (row, source) in enumerate(zip(frame.to_dict(orient="records"), source_rows)):
        (message,) = row["prompt"]
        assert message["role"] == "user"
        assert message["content"] == source["prompt"][0]["content"]
        assert "boxed" not in message["content"] and "step by step" not in message["content"]
        assert row["reward_model"]["ground_truth"] == source["reward_model"]["ground_truth"]
        assert row["ability"] == "math" and row["extra_info"] == {"split": "test", "index": i}


def test_plain_rows_from_a_folder_of_mixed_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"problem": "What is 2+2?", "answer": 4}])
    (folder / "b.json").write_text(json.dumps([{"question": "Half of 1?", "answer": "\\frac{1}{2}"}]))
    pd.DataFrame([{"problem": "Three?", "answer": 3.0}]).to_parquet(folder / "c.parquet")
    (folder / "notes.txt").write_text("ignored")
    frame = pd.read_parquet(prepare("klear_mathsub_30k", folder, tmp_path / "out"))
    assert frame.reward_model.map(lambda r: r["ground_truth"]).tolist() == ["4", "\\frac{1}{2}", "3"]
    assert frame.prompt.map(lambda p: p[0]["content"]).tolist() == ["What is 2+2?", "Half of 1?", "Three?"]
    assert set(frame.data_source) == {"math_longcot_math_verify"}
    assert frame.extra_info.map(lambda e: e["split"]).tolist() == ["train"] * 3


def test_prepared_ground_truths_score_with_the_reward(tmp_path):
    rows = [{"problem": "q", "answer": a} for a in ("204", "\\frac{3}{4}", "(1, 2)", "2\\sqrt{3}")]
    frame = pd.read_parquet(prepare("aime2024", write_jsonl(tmp_path / "x.jsonl", rows), tmp_path))
    for gold in frame.reward_model.map(lambda r: r["ground_truth"]):
        assert score_in_process(f"</think>The final answer is $\\boxed{{{gold}}}$.", gold)["acc"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"answer": "1"}, "row 1: no question"),
        ({"problem": "  ", "answer": "1"}, "row 1: field 'problem' must be a non-empty string"),
        ({"problem": "q"}, "row 1: no answer"),
        ({"problem": "q", "answer": ""}, "row 1: field 'answer' must be a non-empty"),
        ({"problem": "q", "answer": None}, "row 1: field 'answer' must be a non-empty"),
        ({"prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": "1"}},
         "row 1: field 'prompt' has no user message"),
        ({"prompt": [{"role": "user", "content": 3}], "reward_model": {"ground_truth": "1"}},
         "row 1: field 'prompt[-1].content' must be a non-empty string"),
        ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": []}},
         "row 1: field 'reward_model.ground_truth' must be a non-empty string or number"),
    ],
)
def test_invalid_rows_name_the_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "fine", "answer": "1"}, row])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        prepare("aime2025", path, tmp_path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "aime2025.parquet").exists()


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "line 1: not JSON"), ("", "no rows")],
)
def test_unreadable_inputs(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        prepare("aime2024", path, tmp_path)


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare("aime2024", tmp_path / "missing.jsonl", tmp_path)
    (tmp_path / "x.csv").write_text("problem,answer\nq,1\n")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare("aime2024", tmp_path / "x.csv", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl/.json/.parquet files"):
        prepare("aime2024", tmp_path / "empty", tmp_path)


def test_cli(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"problem": "q", "answer": "1"}])
    assert main(["aime2024", "--input", str(path), "--out-dir", str(tmp_path / "out")]) == 0
    assert pd.read_parquet(tmp_path / "out" / "aime2024.parquet").prompt[0][0]["content"] == "q"
    assert main(["aime2024", "--input", str(path), "--out-dir", str(tmp_path / "with"), "--instruction"]) == 0
    assert pd.read_parquet(tmp_path / "with" / "aime2024.parquet").prompt[0][0]["content"] == (
        "q\n" + INSTRUCTION)
    assert "aime2024: wrote" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "q"}])
    assert main(["aime2024", "--input", str(bad), "--out-dir", str(tmp_path)]) == 1
    assert "bad.jsonl: row 0: no answer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["all", "--input", str(path)])


def test_hub_path_loads_every_part(tmp_path, monkeypatch):
    """Without network access: the hub loader is replaced, what is asked of it and done with its rows is checked."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": f"{config} problem", "answer": str(len(calls))}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    frame = pd.read_parquet(prepare("aime2025", None, tmp_path))
    assert calls == [("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")]
    assert frame.reward_model.map(lambda r: r["ground_truth"]).tolist() == ["1", "2"]
    assert frame.prompt.map(lambda p: p[0]["content"]).tolist() == ["AIME2025-I problem", "AIME2025-II problem"]
