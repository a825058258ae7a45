"""The math reward configured the way a user does, run by verl 0.9.1's own reward-loop managers."""

import asyncio

import numpy as np
import pytest
import torch
from verl import DataProto
from verl.trainer.ppo.reward import load_reward_manager

from tests.verl_config import verl_config

REWARD_FN = (
    "reward.custom_reward_function.path=pkg://erc_verl.reward.math_verify_score",
    "+reward.custom_reward_function.reward_kwargs.num_processes=1",
    "+reward.custom_reward_function.reward_kwargs.no_think_end_score=-0.25",
)
DAPO_OVERLONG = (
    "reward.reward_manager.name=dapo",
    "+reward.reward_kwargs.overlong_buffer_cfg.enable=true",
    "+reward.reward_kwargs.overlong_buffer_cfg.len=8",
    "+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
    "+reward.reward_kwargs.overlong_buffer_cfg.log=true",
    "+reward.reward_kwargs.max_resp_len=48",
)
RESPONSES = [  # (response, ground truth, expected score, acc, reason)
    ("ok</think>\\boxed{540}", "540", 1.0, True, ""),
    ("ok</think>\\boxed{541}", "540", -1.0, False, ""),
    ("cut off before the end of thinking", "540", -0.25, False, "no_think_end"),
    ("ok</think>\\boxed{10^{10^{10}}}", "7", -1.0, False, "huge_number"),
    ("a long think ..........</think>\\boxed{1/2}", "\\frac{1}{2}", 1.0, True, ""),  # 44 tokens: overlong
]


class CharTokenizer:
    """One token per character: all verl's managers ask of a tokenizer is `decode`."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids.tolist()))


def make_batch() -> DataProto:
    prompt_len, response_len = 3, max(len(r) for r, *_ in RESPONSES) + 2  # right padding, as verl's rollout
    responses = torch.zeros(len(RESPONSES), response_len, dtype=torch.long)
    mask = torch.zeros(len(RESPONSES), prompt_len + response_len, dtype=torch.long)
    mask[:, :prompt_len] = 1
    for i, (text, *_) in enumerate(RESPONSES):
        responses[i, : len(text)] = torch.tensor([ord(c) for c in text])
        mask[i, prompt_len : prompt_len + len(text)] = 1
    return DataProto.from_dict(
        tensors={"prompts": torch.ones(len(RESPONSES), prompt_len, dtype=torch.long), "responses": responses,
                 "attention_mask": mask},
        non_tensors={"data_source": np.array(["math_longcot_math_verify"] * len(RESPONSES), dtype=object),
                     "reward_model": np.array([{"ground_truth": g} for _, g, *_ in RESPONSES], dtype=object)},
    )


def score_batch(overrides: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Score the batch as verl's RewardLoopWorker does (one run_single task per item, all in flight at once), then
    stack reward_extra_info like RewardLoopManager.compute_rm_score (from the first item's keys)."""
    manager = load_reward_manager(verl_config(*overrides), CharTokenizer())
    data = make_batch()

    async def run_all():
        return await asyncio.gather(*(manager.run_single(data[i : i + 1]) for i in range(len(data))))

    outputs = manager.loop.run_until_complete(run_all())
    infos = [out["reward_extra_info"] for out in outputs]
    stacked = {key: np.array([info[key] for info in infos]) for key in infos[0]}
    return outputs, stacked


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_naive_manager(name):
    outputs, stacked = score_batch((*REWARD_FN, f"reward.custom_reward_function.name={name}"))
    assert [out["reward_score"] for out in outputs] == [expected for _, _, expected, _, _ in RESPONSES]
    assert stacked["acc"].tolist() == [acc for *_, acc, _ in RESPONSES]
    assert stacked["reason"].tolist() == [reason for *_, reason in RESPONSES]
    # DAPO dynamic sampling (algorithm.filter_groups.metric=acc) reads float(reward_extra_info["acc"])
    assert [float(a) for a in stacked["acc"]] == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_dapo_manager_adds_the_overlong_penalty():
    outputs, stacked = score_batch((*REWARD_FN, "reward.custom_reward_function.name=compute_score", *DAPO_OVERLONG))
    lengths = [len(text) for text, *_ in RESPONSES]
    # verl's DAPO rule: past max_resp_len - len tokens, -penalty_factor * excess / len (here 40 tokens are free)
    penalties = [min(-(n - 40) / 8, 0.0) for n in lengths]
    assert penalties[-1] < 0 and penalties[:-1] == [0.0] * 4
    assert stacked["overlong_reward"].tolist() == pytest.approx(penalties)
    assert [out["reward_score"] for out in outputs] == pytest.approx(
        [expected + p for (_, _, expected, _, _), p in zip(RESPONSES, penalties)])
    assert stacked["score"].tolist() == [expected for _, _, expected, _, _ in RESPONSES]
