"""The row layout of verl's RL datasets, written by every data source of this project (paper data, demo task).

    data_source   which reward/metric family the row belongs to (verl groups validation metrics by it)
    prompt        [{"role": "user", "content": <question>}]: chat messages, templated by the tokenizer
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": "<answer>"}
    extra_info    {"split": "train"|"test"|..., "index": <row number>, ...}
"""

PROMPT_KEY = "prompt"
REQUIRED_COLUMNS = (PROMPT_KEY, "data_source", "reward_model")  # and reward_model.ground_truth


def verl_row(data_source: str, question: str, ground_truth: str, split: str, index: int, **extra_info) -> dict:
    return {
        "data_source": data_source,
        PROMPT_KEY: [{"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(ground_truth)},
        "extra_info": {"split": split, "index": index, **extra_info},
    }
