"""Synthetic verifiable math: small-integer arithmetic answered in ``\\boxed{}``, written as verl RL parquet.

Every question is one sum ``a+b`` or difference ``a-b`` of a two-digit ``a`` and a one-digit ``b``: a tiny
transformer can learn it compositionally (units digit from a 10x10 table, tens digit with carry or borrow), so a
held-out expression is answerable without having been seen. The held-out split holds expressions that appear neither
in the RL training split nor in the warm-start data (which is drawn from the training split). With both operations
there are 1800 expressions: 512 held out still leave 1288 to train on. Rows follow verl's RL dataset layout
(`erc_verl.data.rows`).
"""

import random
from dataclasses import dataclass

from erc_verl.data.rows import verl_row
from erc_verl.reward.guards import last_boxed

DATA_SOURCE = "erc_verl/cpu_arith"
QUESTION_TEMPLATE = "What is {expr}?"


@dataclass(frozen=True)
class TaskSpec:
    min_a: int = 10
    max_a: int = 100
    max_b: int = 10
    ops: str = "+-"
    n_val: int = 512
    seed: int = 0


def question(expr: str) -> str:
    return QUESTION_TEMPLATE.format(expr=expr)


def answer_text(value: int) -> str:
    return f"\\boxed{{{value}}}"


_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


def all_expressions(spec: TaskSpec) -> list[tuple[str, int]]:
    unknown = set(spec.ops) - set(_APPLY)
    if unknown or not spec.ops:
        raise ValueError(f"erc_verl.demo.task.ops={spec.ops!r}: use one or more of {sorted(_APPLY)}")
    return [
        (f"{a}{op}{b}", _APPLY[op](a, b))
        for op in spec.ops
        for a in range(spec.min_a, spec.max_a)
        for b in range(spec.max_b)
    ]


def split(spec: TaskSpec) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, val): a seeded, disjoint split of every expression."""
    exprs = all_expressions(spec)
    if not 0 < spec.n_val < len(exprs):
        raise ValueError(f"erc_verl.demo.task.n_val={spec.n_val}: must be in [1, {len(exprs) - 1}] for this task")
    random.Random(spec.seed).shuffle(exprs)
    return exprs[spec.n_val :], exprs[: spec.n_val]


def to_rows(exprs: list[tuple[str, int]], split_name: str) -> list[dict]:
    return [
        verl_row(DATA_SOURCE, question(expr), str(value), split_name, i, expression=expr)
        for i, (expr, value) in enumerate(exprs)
    ]


def write_parquet(spec: TaskSpec, train_path: str, val_path: str) -> None:
    import pandas as pd

    train, val = split(spec)
    pd.DataFrame(to_rows(train, "train")).to_parquet(train_path)
    pd.DataFrame(to_rows(val, "val")).to_parquet(val_path)


def corpus(spec: TaskSpec) -> list[str]:
    """All task text (questions and answers), for training the tokenizer."""
    return [f"{question(e)} {answer_text(v)}" for e, v in all_expressions(spec)]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl custom reward: 1 for the right integer in the last ``\\boxed{}``, else 0; ``acc`` feeds DAPO's filter."""
    boxed = last_boxed(solution_str)
    pred = boxed.strip() if boxed is not None else ""
    correct = pred == str(ground_truth).strip()
    return {"score": 1.0 if correct else 0.0, "acc": correct, "pred": pred}
