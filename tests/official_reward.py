# Test oracle, ported from the official ERC training code; used only by tests/test_reward_official.py.
#
# Source: github.com/Kwai-Klear/ERC at f1885c534f8d0dde9764ecbb6a9f259b0dd785cf (a fork of verl), Apache License 2.0:
#   Copyright 2024 Bytedance Ltd. and/or its affiliates
#   Copyright 2022 EleutherAI and the HuggingFace Inc. team. All rights reserved.
#   Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0)
# - verl/utils/reward_score/reward_config.py: ScoringConfig (verbatim)
# - verl/utils/reward_score/math_dapo.py:261-291 math_verify_from_sky (verbatim)
# - verl/utils/reward_score/math_dapo.py:293-339 compute_score, the branch the training data takes
#   (is_longcot=True, is_use_math_verify=True; the other branches left out)
# - verl/utils/reward_score/__init__.py:128-131 dapo_wi_rllm_compute_score's dispatch for data sources containing
#   'math_longcot_math_verify' (training rows, AIME 2024/2025), and verl/workers/reward_manager/dapo.py:120-123,
#   acc = int(score == correct_score): the DAPO filter metric.
"""The official ERC reward: verdicts the paper recipes' reward mode (`rules: official`) must reproduce."""

from dataclasses import dataclass

from math_verify import parse
from math_verify import verify as m_verify


@dataclass
class ScoringConfig:
    correct_score: float = 1.0
    incorrect_score: float = -1.0
    format_error_score: float = -1.0
    wo_bos_think: float = -2.0
    wo_eos_think: float = -0.5


scoring_config = ScoringConfig()


def math_verify_from_sky(solution_str: str, ground_truth: str):
    ground_truth = [ground_truth] if isinstance(ground_truth, str) else ground_truth

    # 0 in case parsing cannot be completed
    try:
        math_verify_parsed = parse(solution_str, parsing_timeout=5)
    except Exception:
        return scoring_config.incorrect_score

    # 0 if parsing is problematic
    if len(math_verify_parsed) < 2:
        return scoring_config.incorrect_score

    # We perform a quick string match first
    if math_verify_parsed[1] in ground_truth:
        return scoring_config.correct_score

    # We now fallback to semantic verification
    for gt in ground_truth:
        try:
            if m_verify(
                parse(f"\\boxed{{{gt}}}", parsing_timeout=5),
                math_verify_parsed,
                timeout_seconds=5,
            ):
                return scoring_config.correct_score
        except Exception:
            continue

    # Very unlikely to be correct after the above matches
    return scoring_config.incorrect_score


def compute_score(solution_str: str, ground_truth: str, is_longcot: bool = True) -> float:
    if is_longcot:
        if ("</think>" not in solution_str):
            reward = scoring_config.wo_eos_think
            return reward

    solution_str = solution_str.split("</think>")[-1]

    reward = math_verify_from_sky(solution_str, ground_truth)
    return reward


def official_verdict(data_source: str, solution_str: str, ground_truth) -> dict:
    """What the official DAPO reward manager records for one decoded response: the score and `acc`."""
    assert "math_longcot_math_verify" in data_source, data_source
    score = float(compute_score(solution_str, ground_truth, is_longcot=True))
    return {"score": score, "acc": int(score == scoring_config.correct_score)}
