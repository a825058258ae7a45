"""The paper recipes' reward (`rules: official`) gives the official ERC code's verdicts: checked against the official
reward function itself (tests/official_reward.py, ported from its source), through the entry point verl calls."""

import logging

import pytest

from erc_verl.reward.judge import MathRewardConfig, score_in_process
from erc_verl.reward.math_verify_score import compute_score
from erc_verl.runs.recipes import compose
from tests.official_reward import official_verdict

T = "<think>\nreasoning...\n</think>\n\n"  # a finished reasoning block
DATA_SOURCE = "math_longcot_math_verify"

# Where the extended rules (the default of MathRewardConfig) and the official code disagree: the inline-math retry
# (the first three, the differences the issue found) and the structural guards, which look at the whole answer text.
KNOWN_DIFFERENCES = [
    ("boxed with a trailing period", T + "So the answer is \\boxed{540.}", "540"),
    ("boxed percent vs integer", T + "The rate is \\boxed{10\\%}", "10"),
    ("boxed percent vs percent", T + "\\boxed{10\\%}", "10\\%"),
    ("deep brackets before the answer", T + "Note " + "(" * 22 + "x" + ")" * 22 + " so $\\boxed{540}$.", "540"),
    ("a long digit run before the answer", T + "We had " + "7" * 5000 + " steps; $\\boxed{540}$.", "540"),
    ("a long text before the answer", T + "word " * 25_000 + "the answer is $\\boxed{540}$.", "540"),
]
AGREEING = [
    ("plain boxed", T + "The answer is $\\boxed{540}$.", "540"),
    ("boxed 540.0", T + "\\boxed{540.0}", "540"),
    ("boxed percent vs fraction", T + "\\boxed{50\\%}", "\\frac{1}{2}"),
    ("no </think> (truncated)", "<think>\nlong reasoning ... \\boxed{540}", "540"),
    ("answer only inside think", "<think>\nmaybe \\boxed{540}\n</think>\n\nI could not decide.", "540"),
    ("two </think>, answer after the last", "<think>a</think> \\boxed{1} </think> \\boxed{540}", "540"),
    ("multiple boxed, last right", T + "First \\boxed{541}, corrected: \\boxed{540}", "540"),
    ("no box, 'answer is N'", T + "The final answer is 540.", "540"),
    ("no box, inline math", T + "Therefore $x = 540$.", "540"),
    ("empty after </think>", T, "540"),
    ("boxed text choice (B)", T + "\\boxed{\\text{(B)}}", "B"),
    ("boxed (A) vs A", T + "\\boxed{(A)}", "A"),
    ("number word", T + "\\boxed{five}", "5"),
    ("fraction vs decimal", T + "\\boxed{\\frac{1}{2}}", "0.5"),
    ("dfrac vs frac", T + "\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
    ("slash fraction vs frac shorthand", T + "\\boxed{3/4}", "\\frac34"),
    ("rounded decimal vs 1/3", T + "\\boxed{0.333}", "\\frac{1}{3}"),
    ("interval open vs closed", T + "\\boxed{(0,1)}", "[0,1]"),
    ("set order", T + "\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("tuple order", T + "\\boxed{(2, 1)}", "(1,2)"),
    ("sqrt equivalence", T + "\\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
    ("equation vs expression", T + "\\boxed{y = 2x + 1}", "2x+1"),
    ("degrees", T + "\\boxed{540^\\circ}", "540"),
    ("unit text", T + "\\boxed{540 \\text{ dollars}}", "540"),
    ("thousands comma", T + "\\boxed{1,000}", "1000"),
    ("negative", T + "\\boxed{-540}", "540"),
    ("power vs value", T + "\\boxed{2^{10}}", "1024"),
    ("gt with spaces", T + "\\boxed{540}", " 540 "),
    ("gt list of answers", T + "\\boxed{12}", ["10", "12"]),
    ("empty gt", T + "\\boxed{540}", ""),
    ("boxed empty", T + "\\boxed{}", "540"),
    ("unclosed box", T + "\\boxed{540", "540"),
    ("5000-digit answer", T + "\\boxed{" + "1" * 5000 + "}", "1"),
    ("period outside the box", T + "\\boxed{540}.", "540"),
    ("boxed fraction with period", T + "\\boxed{\\frac{1}{2}.}", "\\frac{1}{2}"),
    ("boxed wrong with period", T + "\\boxed{541.}", "540"),
]
CASES = KNOWN_DIFFERENCES + AGREEING


@pytest.fixture(scope="module")
def official():
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # every failed parse is logged
    return {name: official_verdict(DATA_SOURCE, response, gold) for name, response, gold in CASES}


@pytest.fixture(scope="module")
def recipe_kwargs():
    kwargs = compose("erc_dapo_r1_distill_1p5b").reward.custom_reward_function.reward_kwargs
    assert dict(kwargs) == {"rules": "official"}
    return dict(kwargs)


@pytest.mark.parametrize("name, response, gold", CASES, ids=[name for name, _, _ in CASES])
def test_paper_recipes_reward_gives_the_official_verdict(name, response, gold, official, recipe_kwargs):
    ours = compute_score(DATA_SOURCE, response, gold, **recipe_kwargs)  # what verl calls, worker pool included
    assert (ours["score"], int(ours["acc"])) == (official[name]["score"], official[name]["acc"])


def test_the_extended_rules_differ_only_where_documented(official):
    extended = {name: score_in_process(response, gold)["score"] for name, response, gold in CASES}
    differing = {name for name in extended if extended[name] != official[name]["score"]}
    assert differing == {name for name, _, _ in KNOWN_DIFFERENCES}


def test_official_rules_keep_the_guard_against_answers_verify_cannot_finish():
    """The official code spends its 5 s timeout on `10^{10^{10}}` and scores it wrong: rejected before verify."""
    answer = T + "\\boxed{10^{10^{10}}}"
    ours = score_in_process(answer, "540", MathRewardConfig(rules="official"))
    assert (ours["score"], ours["reason"]) == (-1.0, "huge_number")
    assert official_verdict(DATA_SOURCE, answer, "540")["score"] == -1.0


def test_official_rules_take_no_extended_option():
    with pytest.raises(TypeError, match=r"\['max_nesting_depth'\] apply to rules='extended' only"):
        MathRewardConfig.from_kwargs({"rules": "official", "max_nesting_depth": 20})
    with pytest.raises(ValueError, match="rules='strict'"):
        MathRewardConfig(rules="strict")
