"""Any input whatsoever gets a result with a reason within the deadline, and nothing raises."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erc_verl.reward.judge import REASONS, MathRewardConfig
from erc_verl.reward.math_verify_score import compute_score

# Tight soft deadlines keep the suite fast; the mechanism is the same as with the defaults.
FAST = {"parse_timeout_s": 0.5, "verify_timeout_s": 0.5, "hard_timeout_s": 3.0}
HARD_S = MathRewardConfig(**FAST).hard_deadline_s
# The deadline counts from when a ready worker takes the item; after a kill, the replacement's start-up (about
# a second, more on a loaded machine) comes on top. What must never happen is an unbounded wait.
BOUND_S = HARD_S + 10.0

T = "</think>"
CORPUS = {
    # name: (input, expected reason or None when several are reasonable)
    "empty": ("", "no_think_end"),
    "none": (None, "no_think_end"),
    "think_end_only": (T, "no_answer"),
    "1MB": (T + "a" * 2**20, "too_long"),
    "1MB_no_think_end": ("7" * 2**20, "no_think_end"),
    "unclosed_boxed": (T + "\\boxed{", "no_answer"),
    "unclosed_boxed_long": (T + "\\boxed{" + "x+" * 20000, None),
    "nested_braces": (T + "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "too_deep"),
    "open_braces": (T + "{" * 50000, "too_deep"),
    "close_braces": (T + "}" * 50000, None),
    "deep_parens": (T + "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}", "too_deep"),
    "left_parens": (T + "\\boxed{" + "\\left(" * 2000 + "}", "too_deep"),
    "tower": (T + "\\boxed{10^{10^{10^{10}}}}", "huge_number"),
    "tower_plain_text": (T + "The answer is 10**10**10**10", "huge_number"),
    "power_chain": (T + "\\boxed{" + "^".join(["2"] * 50) + "}", "huge_number"),
    "factorials": (T + "\\boxed{10!!!!!!!!!!}", "huge_number"),
    "huge_float": (T + "\\boxed{1.5\\times10^{999999999}}", "huge_number"),
    "digits_200k": (T + "\\boxed{" + "9" * 200_000 + "}", "too_long"),
    "digits_20k": (T + "\\boxed{" + "9" * 20_000 + "}", "too_many_digits"),
    "binary": (bytes(range(256)) * 100, "no_think_end"),
    "binary_with_think_end": (bytes(range(256)) * 10 + b"</think>" + bytes(range(255, -1, -1)) * 10, None),
    "non_utf8": (b"\xff\xfe\xfd</think>\\boxed{\xc3\x28}", None),
    "lone_surrogates": (T + "\\boxed{\udcff\ud800}", None),
    "nul_bytes": (T + "\x00" * 1000 + "\\boxed{5}", ""),
    "backslashes": (T + "\\" * 100_000, None),
    "dollars": (T + "$" * 50_000, None),
    "many_boxed": (T + "\\boxed{1} " * 9000, None),
    "matrix": (T + "\\boxed{\\begin{pmatrix}" + "&".join(["1"] * 500) + "\\end{pmatrix}}", None),
    "long_sum": (T + "\\boxed{" + "+".join(f"x_{i}" for i in range(3000)) + "}", None),
    "huge_symbolic_power": (T + "\\boxed{(x+1)^{100000}}", None),
    "newlines": (T + "\n" * 100_000, "no_answer"),
    "emoji": (T + "\\boxed{٣٤٥}" + "\U0001f600" * 10000, None),
    "object": (object(), "no_think_end"),
}


def check(result: dict) -> None:
    assert set(result) == {"score", "acc", "pred", "reason"}
    assert isinstance(result["score"], float) and isinstance(result["acc"], bool)
    assert isinstance(result["pred"], str) and isinstance(result["reason"], str)
    assert result["reason"] == "" or result["reason"] in REASONS
    assert result["acc"] == (result["score"] == 1.0 and result["reason"] == "")
    assert result["score"] in (1.0, -1.0, -0.5)


@pytest.mark.parametrize("name", CORPUS)
def test_nasty_inputs(name):
    solution, reason = CORPUS[name]
    start = time.monotonic()
    result = compute_score("math_longcot_math_verify", solution, "5", **FAST)
    assert time.monotonic() - start < BOUND_S
    check(result)
    if reason is not None:
        assert result["reason"] == reason, result


def test_the_hard_deadline_kills_what_nothing_else_stops():
    # No magnitude guard, no soft deadlines: verify evaluates 9^(9^9) (370M digits, minutes); only killing the
    # worker process ends it (as it would a computation stuck in one C call, which no signal interrupts).
    unguarded = {"max_number_digits": None, "parse_timeout_s": None, "verify_timeout_s": None, "hard_timeout_s": 1.0}
    start = time.monotonic()
    result = compute_score("math", T + "\\boxed{9^{9^{9}}}", "5", **unguarded)
    assert result == {"score": -1.0, "acc": False, "pred": "", "reason": "timeout"}
    assert 1.0 <= time.monotonic() - start < BOUND_S
    assert compute_score("math", T + "\\boxed{5}", "5", **unguarded)["acc"]  # the pool has recovered


PIECES = st.sampled_from([
    "\\boxed{", "{", "}", "^{", "^", "10", "9" * 40, "\\frac{", "\\sqrt{", "\\dfrac", "</think>", "$", "$$",
    "\\left(", "\\right)", "(", ")", "[", "]", "!", "\\text{", "\\infty", "x", "=", ",", ".", "\\\\", "\\cup",
    "\\begin{pmatrix}", "&", "\\end{pmatrix}", "final answer is ", "Answer: ", "\n", " ", "\x00", "\udcff",
])
SOLUTIONS = st.one_of(
    st.text(max_size=3000),
    st.binary(max_size=3000),
    st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=300).map("".join),
    st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=60).map(lambda parts: "</think>" + "".join(parts)),
)
GROUND_TRUTHS = st.one_of(st.text(max_size=30), st.integers(), st.sampled_from(["540", "\\frac{1}{2}", "(1,2)"]),
                          st.lists(st.text(max_size=10), max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(solution=SOLUTIONS, ground_truth=GROUND_TRUTHS)
def test_fuzz(solution, ground_truth):
    start = time.monotonic()
    result = compute_score("math_longcot_math_verify", solution, ground_truth, **FAST)
    assert time.monotonic() - start < BOUND_S
    check(result)
