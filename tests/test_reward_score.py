"""The math reward's verdicts: the paper's long-CoT rules, math-verify equivalence, guards, and AIME answers."""

import json

import pytest

from erc_verl.reward import judge
from erc_verl.reward.judge import PRED_MAX_CHARS, REASONS, MathRewardConfig, score_in_process
from erc_verl.reward.math_verify_score import compute_score
from tests import TEST_DATA
from tests.test_reward_deadline import spin_until_interrupted

KEYS = {"score", "acc", "pred", "reason"}


def answered(answer: str, thinking: str = "Let me work this out step by step.") -> str:
    """An R1-Distill-style response: reasoning, `</think>`, then a final-answer sentence."""
    return f"{thinking}\n</think>\n\nPutting it together, the final answer is ${answer}$."


def boxed(answer: str) -> str:
    return answered(f"\\boxed{{{answer}}}")


@pytest.mark.parametrize(
    "gold, response",
    [
        (r"\frac{1}{2}", boxed(r"\frac{1}{2}")),
        (r"\frac{1}{2}", boxed(r"\dfrac12")),
        (r"\frac{1}{2}", boxed("0.5")),
        (r"\frac{1}{2}", boxed("1/2")),
        ("0.5", boxed(r"\frac12")),
        ("540", boxed("540")),
        ("540", boxed("540.")),  # math-verify alone fails on `\boxed{540.}`: the inline-math retry (extended)
        ("540", answered("540")),  # `$540$`, no box
        ("540", "</think>The answer is \\boxed{540}."),
        ("540", boxed(r"540 \text{ meters}")),
        ("540", boxed(r"\text{540}")),
        ("30", boxed(r"30^\circ")),
        (r"2\sqrt{3}", boxed(r"\sqrt{12}")),
        ("(1,2)", boxed("(1, 2)")),
        ("B", boxed(r"\text{(B)}")),
        (r"x^2+2x+1", boxed("(x+1)^2")),
    ],
)
def test_equivalent_forms_are_correct(gold, response):
    result = score_in_process(response, gold)
    assert result == {"score": 1.0, "acc": True, "pred": result["pred"], "reason": ""}
    assert result["pred"]


@pytest.mark.parametrize(
    "gold, response",
    [
        ("540", boxed("541")),
        ("540", boxed("54")),
        (r"\frac{1}{2}", boxed(r"\frac{1}{3}")),
        (r"\frac{1}{2}", boxed("0.49")),
        (r"2\sqrt{3}", boxed(r"3\sqrt{2}")),
        ("(1,2)", boxed("(2, 1)")),
        ("B", boxed(r"\text{(C)}")),
    ],
)
def test_wrong_answers_are_incorrect(gold, response):
    result = score_in_process(response, gold)
    assert (result["score"], result["acc"], result["reason"]) == (-1.0, False, "")
    assert result["pred"]


def test_long_cot_rules():
    # no </think>: truncated or unfinished reasoning, whatever the text says
    assert score_in_process(r"I think it is \boxed{540}", "540") == {
        "score": -0.5, "acc": False, "pred": "", "reason": "no_think_end",
    }
    # only the text after the last </think> is judged
    assert not score_in_process(r"\boxed{540}</think>so \boxed{7}", "540")["acc"]
    assert score_in_process(r"\boxed{7}</think>a</think>so \boxed{540}", "540")["acc"]
    assert score_in_process(r"</think>no answer here", "540")["reason"] == "no_answer"
    # long_cot=False: the whole text, no </think> needed
    assert score_in_process(r"I think it is \boxed{540}", "540", MathRewardConfig(long_cot=False))["acc"]


def test_scores_are_configurable():
    cfg = MathRewardConfig(correct_score=2.0, incorrect_score=0.0, no_think_end_score=-3.0)
    assert score_in_process(boxed("540"), "540", cfg)["score"] == 2.0
    assert score_in_process(boxed("541"), "540", cfg)["score"] == 0.0
    assert score_in_process("unfinished", "540", cfg)["score"] == -3.0
    assert score_in_process(boxed("9" * 5000), "540", cfg)["score"] == 0.0  # failures score as incorrect


def test_ground_truth_forms():
    assert score_in_process(boxed("204"), 204)["acc"]  # numbers
    assert score_in_process(boxed("7"), ["6", "7"])["acc"]  # any of several acceptable answers
    assert score_in_process(boxed("7"), "")["reason"] == "no_ground_truth"
    assert score_in_process(boxed("7"), None)["reason"] == "no_ground_truth"


@pytest.mark.parametrize(
    "response, reason",
    [
        ("</think>" + "x" * 100_001, "too_long"),
        (boxed("{" * 40 + "1" + "}" * 40), "too_deep"),
        (boxed("7" * 5000), "too_many_digits"),
        (boxed("10^{10^{10}}"), "huge_number"),
        (boxed(r"2 \cdot 10^{3 \cdot 10^{9}}"), "huge_number"),
        (boxed(r"\frac{1}{9^{9^{9}}}"), "huge_number"),
        (boxed("100000000!"), "huge_number"),
        (boxed(r"\binom{10^{10}}{10^{6}}"), "huge_number"),
    ],
)
def test_guards_give_up_on_hopeless_answers(response, reason):
    result = score_in_process(response, "5")
    assert (result["score"], result["acc"], result["reason"]) == (-1.0, False, reason)


def test_guards_leave_big_but_real_answers_alone():
    assert score_in_process(boxed("2^{100}"), "1267650600228229401496703205376")["acc"]
    assert score_in_process(boxed("2^{2^{5}}"), "4294967296")["acc"]
    assert score_in_process(boxed(r"\left\{ \frac{1}{\sqrt{2^{3}}} \right\}"), r"\{\frac{\sqrt{2}}{4}\}")["acc"]


def test_soft_deadline_reports_timeout(monkeypatch):
    # math-verify's parse replaced by Python code that only the deadline can end: the outcome does not depend on
    # how fast the machine is or where the timer's signal lands
    monkeypatch.setattr(judge, "parse", lambda *args, **kwargs: [spin_until_interrupted()])
    cfg = MathRewardConfig(parse_timeout_s=0.01)
    assert score_in_process(boxed("17"), "5", cfg)["reason"] == "timeout"


def test_soft_deadline_interrupts_math_verify():
    # bare braces nested 10 deep (under the depth guard) cost math-verify ~0.5 s of parsing, 50x the deadline (a
    # busy machine only makes it slower). Used by no other test: math-verify caches parses within a process.
    cfg = MathRewardConfig(parse_timeout_s=0.01)
    assert score_in_process(boxed("{" * 10 + "17" + "}" * 10), "5", cfg)["reason"] == "timeout"


def test_pred_is_capped():
    result = score_in_process(boxed("x+" * 500 + "1"), "5")
    assert result["reason"] == "" and len(result["pred"]) == PRED_MAX_CHARS


def test_every_result_has_the_same_keys():
    """verl stacks each key over the batch from the first item's keys: a missing key fails the batch."""
    responses = ["unfinished", boxed("5"), boxed("6"), "</think>", boxed("10^{10^{10}}"), b"\xff</think>\x00"]
    for response in responses:
        result = score_in_process(response, "5")
        assert set(result) == KEYS and (result["reason"] in REASONS or result["reason"] == "")


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="correct_scor"):
        compute_score("math", boxed("5"), "5", correct_scor=2.0)


def _aime_rows():
    rows = []
    for name in ("aime2024", "aime2025"):
        path = TEST_DATA / f"{name}.jsonl"
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def test_every_aime_ground_truth_scores_correct():
    rows = _aime_rows()
    assert len(rows) == 60
    for row in rows:
        gold = row["reward_model"]["ground_truth"]
        right = compute_score(row["data_source"], boxed(gold), gold)
        wrong = compute_score(row["data_source"], boxed(str(int(gold) + 1)), gold)
        assert (right["score"], right["acc"], right["reason"]) == (1.0, True, ""), (gold, right)
        assert (wrong["score"], wrong["acc"], wrong["reason"]) == (-1.0, False, ""), (gold, wrong)


def test_hard_deadline_follows_the_soft_ones():
    assert MathRewardConfig().hard_deadline_s == 2.0 + 5.0 + 2.0
    assert MathRewardConfig(rules="official").hard_deadline_s == 5.0 + 5.0 + 5.0 + 2.0  # parse, gold parse, verify
    assert MathRewardConfig(parse_timeout_s=None, verify_timeout_s=None).hard_deadline_s == 12.0  # math-verify's 5 s
    assert MathRewardConfig(hard_timeout_s=1.5).hard_deadline_s == 1.5


def test_inline_math_retry_is_an_extended_rule():
    assert score_in_process(boxed("540."), "540", MathRewardConfig(inline_math_retry=False))["reason"] == "parse_error"
    assert score_in_process(boxed("540."), "540", MathRewardConfig(rules="official"))["reason"] == "parse_error"


def test_every_option_is_documented():
    """TRL-style per-field help: what each option does, and the official code's value where it has one."""
    import dataclasses

    for f in dataclasses.fields(MathRewardConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name
