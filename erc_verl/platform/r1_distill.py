"""The paper's models in verl 0.9.1's agent loop: DeepSeek-R1-Distill-Qwen tokenizers get DeepSeek's Continuous
Token builder.

verl picks the builder that splices multi-turn context into a rollout by the exact ``config.json`` model_type
(`verl/utils/tokenizer/continuous_token_wiring.py`). The R1 distills have ``model_type: qwen2`` but DeepSeek's
tokenizer, which has no ``<|im_end|>``: verl's Qwen builder then raises ``Tokenizer does not define required token
'<|im_end|>'`` in every agent loop before the first rollout (verl issue #7637). Qwen's registry entries are
replaced with a class that hands such tokenizers to DeepSeek's builder, by the same exact special-token key as
verl's own fix (PR #7639): DeepSeek's end-of-sentence and assistant tokens present, ``<|im_end|>`` absent. Every
other tokenizer gets Qwen's builder as before, and its errors.
"""

from verl.utils.tokenizer import continuous_token_wiring as wiring
from verl.utils.tokenizer.continuous_token import DeepSeekContinuousTokenBuilder, QwenContinuousTokenBuilder

QWEN_FAMILIES = (wiring.ContinuousTokenModelFamily.QWEN, wiring.ContinuousTokenModelFamily.QWEN25,
                 wiring.ContinuousTokenModelFamily.QWEN3, wiring.ContinuousTokenModelFamily.QWEN35)


def _defines(tokenizer, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return isinstance(token_id, int) and token_id >= 0 and token_id != getattr(tokenizer, "unk_token_id", None)


def has_deepseek_chat_tokens(tokenizer) -> bool:
    """DeepSeek's end-of-sentence and assistant tokens and no ChatML ``<|im_end|>``: an R1 distill's tokenizer."""
    return (_defines(tokenizer, DeepSeekContinuousTokenBuilder._EOS_TOKEN)
            and _defines(tokenizer, DeepSeekContinuousTokenBuilder._ASSISTANT_TOKEN)
            and not _defines(tokenizer, "<|im_end|>"))


class QwenOrR1DistillBuilder(QwenContinuousTokenBuilder):
    """Qwen's builder, or DeepSeek's for a Qwen-architecture model with DeepSeek's tokenizer."""

    def __new__(cls, tokenizer, *args, **kwargs):
        if has_deepseek_chat_tokens(tokenizer):
            return DeepSeekContinuousTokenBuilder(tokenizer, *args, **kwargs)  # not a cls: __init__ is not rerun
        return super().__new__(cls)


def register() -> None:
    for family in QWEN_FAMILIES:
        wiring._CONTINUOUS_TOKEN_BUILDER_REGISTRY[family] = QwenOrR1DistillBuilder
