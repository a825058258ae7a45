"""The paper's data as verl parquet: KlearReasoner-MathSub-30K (training), AIME 2024 and AIME 2025 (evaluation).

    python -m erc_verl.data all                              # from the Hugging Face hub
    python -m erc_verl.data aime2024 --input aime2024.jsonl  # from a local file or folder (jsonl/json/parquet)

Writes `<out-dir>/<name>.parquet` (out-dir: $ERC_VERL_DATA_DIR, else `data/`, where the recipes look), in verl's
row layout (`erc_verl.data.rows`) with data_source `math_longcot_math_verify[_aime2024|_aime2025]` (the official
code's training name; the reward accepts any) and the question, unchanged, as the user message: the official data
carries the raw question. `--instruction` appends DeepSeek's recommended instruction (`PROMPT_TEMPLATE`) instead.
Input rows are either verl rows (`prompt` messages and `reward_model.ground_truth`, as the KlearReasoner data
ships) or plain ones (`problem`/`question` and `answer`, as the AIME sets ship).
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from erc_verl.data.rows import verl_row

# Opt-in (`--instruction`): the question, then the instruction DeepSeek recommends for its R1 models. Not in the
# official ERC data, whose prompts are the raw questions.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_TEMPLATE = "{question}\n" + INSTRUCTION.replace("{}", "{{}}")

QUESTION_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "ground_truth")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class Source:
    data_source: str
    split: str  # verl split tag written to extra_info
    hub: tuple[tuple[str, str | None, str], ...]  # (dataset, config, split) parts, concatenated in order


SOURCES = {
    "klear_mathsub_30k": Source("math_longcot_math_verify", "train",
                                (("Suu/KlearReasoner-MathSub-30K", None, "train"),)),
    "aime2024": Source("math_longcot_math_verify_aime2024", "test", (("HuggingFaceH4/aime_2024", None, "train"),)),
    "aime2025": Source("math_longcot_math_verify_aime2025", "test",
                       (("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test"))),
}


class DataError(ValueError):
    """A row that cannot become a verl row; the message names the input, the row and the field."""


def format_prompt(question: str, instruction: bool = False) -> str:
    """The user message for `question`: the question itself (as the official data), or with `instruction` the
    question followed by INSTRUCTION (a question that already ends with it is kept as is)."""
    if not instruction:
        return question
    question = question.strip()
    return question if question.endswith(INSTRUCTION) else PROMPT_TEMPLATE.format(question=question)


def _plain(value: Any) -> Any:
    """numpy arrays (how pandas hands back parquet lists) as Python lists."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _question(row: dict, where: str) -> str:
    prompt = _plain(row.get("prompt"))
    if prompt is not None:
        if isinstance(prompt, str):
            text, field = prompt, "prompt"
        elif isinstance(prompt, list) and prompt:
            users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise DataError(f"{where}: field 'prompt' has no user message")
            text, field = users[-1].get("content"), "prompt[-1].content"
        else:
            raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of chat messages")
    else:
        field = next((f for f in QUESTION_FIELDS if f in row), None)
        if field is None:
            raise DataError(f"{where}: no question: expected field 'prompt', 'problem' or 'question'")
        text = row[field]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: field '{field}' must be a non-empty string, got {text!r:.80}")
    return text


def _answer(row: dict, where: str) -> str:
    reward_model = _plain(row.get("reward_model"))
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        value, field = reward_model["ground_truth"], "reward_model.ground_truth"
    else:
        field = next((f for f in ANSWER_FIELDS if f in row), None)
        if field is None:
            raise DataError(f"{where}: no answer: expected field 'reward_model.ground_truth' or 'answer'")
        value = row[field]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas turns an integer column with gaps into floats: 204.0 is the answer 204
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise DataError(f"{where}: field '{field}' must be a non-empty string or number, got {value!r:.80}")
    return str(value).strip()


def to_verl_rows(rows: Iterable[dict], source: Source, origin: str, instruction: bool = False) -> list[dict]:
    """Validate and convert; raises DataError naming `origin`, the row number and the field."""
    out = []
    for index, row in enumerate(rows):
        where = f"{origin}: row {index}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        out.append(verl_row(source.data_source, format_prompt(_question(row, where), instruction),
                            _answer(row, where), source.split, index))
    if not out:
        raise DataError(f"{origin}: no rows")
    return out


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {number}: not JSON ({error.msg})") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def read_local(path: str | Path) -> list[dict]:
    """Rows of a jsonl/json/parquet file, or of every such file in a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files")
    elif path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})")
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    return [row for file in files for row in _read_file(file)]


def read_hub(source: Source) -> list[dict]:
    """Rows from the Hugging Face hub (needs network access)."""
    from datasets import load_dataset

    return [row for name, config, split in source.hub for row in load_dataset(name, config, split=split)]


def prepare(name: str, input_path: str | Path | None, out_dir: str | Path, instruction: bool = False) -> Path:
    """Write `<out_dir>/<name>.parquet` from `input_path` (file or folder), or from the hub when None; with
    `instruction`, every question is followed by INSTRUCTION."""
    import pandas as pd

    source = SOURCES[name]
    if input_path is not None:
        rows, origin = read_local(input_path), str(input_path)
    else:
        rows, origin = read_hub(source), "+".join(f"{n}:{c or 'default'}:{s}" for n, c, s in source.hub)
    frame = pd.DataFrame(to_verl_rows(rows, source, origin, instruction))
    out = Path(out_dir) / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erc_verl.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*SOURCES, "all"], help="which data set to prepare")
    parser.add_argument("--input", help="local jsonl/json/parquet file or folder instead of the hub "
                                        "(one data set at a time)")
    parser.add_argument("--instruction", action="store_true",
                        help="append 'Please reason step by step, and put your final answer within \\boxed{}.' to "
                        "every question (not in the official data, whose prompts are the raw questions)")
    parser.add_argument("--out-dir", default=os.environ.get("ERC_VERL_DATA_DIR", "data"),
                        help="where to write <name>.parquet (default: $ERC_VERL_DATA_DIR, else data/)")
    args = parser.parse_args(argv)
    if args.name == "all" and args.input:
        parser.error("--input takes one data set: name it instead of 'all'")
    for name in SOURCES if args.name == "all" else [args.name]:
        try:
            out = prepare(name, args.input, args.out_dir, args.instruction)
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{name}: wrote {out}")
    return 0
