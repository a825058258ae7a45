"""verl's agent loop builds a Continuous Token builder for the paper's R1-Distill-Qwen models (model_type qwen2,
DeepSeek's tokenizer without <|im_end|>): DeepSeek's, where verl 0.9.1 alone raises before the first rollout."""

import pytest

DEEPSEEK_BOS, DEEPSEEK_EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
DEEPSEEK_USER, DEEPSEEK_ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"
# DeepSeek-R1-Distill-Qwen's chat template, reduced to the single-turn path
R1_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '" + DEEPSEEK_USER + "' + message['content'] }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '" + DEEPSEEK_ASSISTANT + "<think>\\n' }}{% endif %}")
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                   "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def _tokenizer(special_tokens: list[str], template: str, bos=None, eos=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 1 + 1? <think>\n", "user\n", "assistant\n"], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=special_tokens[0])
    hf.chat_template = template
    return hf


@pytest.fixture(scope="module")
def r1_distill_tokenizer():
    return _tokenizer([DEEPSEEK_EOS, DEEPSEEK_BOS, DEEPSEEK_USER, DEEPSEEK_ASSISTANT], R1_TEMPLATE,
                      bos=DEEPSEEK_BOS, eos=DEEPSEEK_EOS)


def _builder(tokenizer):
    import verl  # noqa: F401  (loads the plugin)
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    return create_continuous_token_builder(tokenizer, hf_model_type="qwen2")  # as verl's agent loop calls it


def test_an_r1_distill_gets_deepseeks_builder_and_renders_its_prompt(r1_distill_tokenizer):
    from verl.utils.tokenizer.continuous_token import DeepSeekContinuousTokenBuilder

    builder = _builder(r1_distill_tokenizer)
    assert type(builder) is DeepSeekContinuousTokenBuilder
    ids = builder.build_initial_tokens([{"role": "user", "content": "What is 1 + 1?"}])
    assert r1_distill_tokenizer.decode(ids) == f"{DEEPSEEK_BOS}{DEEPSEEK_USER}What is 1 + 1?{DEEPSEEK_ASSISTANT}<think>\n"


def test_verls_own_qwen_builder_rejects_the_r1_distill_tokenizer(r1_distill_tokenizer):
    """What the replacement is for: without it, every agent loop fails here."""
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder

    with pytest.raises(ValueError, match="<\\|im_end\\|>"):
        QwenContinuousTokenBuilder(r1_distill_tokenizer)


def test_a_chatml_tokenizer_keeps_qwens_builder():
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder

    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, eos="<|im_end|>")
    builder = _builder(tokenizer)
    assert isinstance(builder, QwenContinuousTokenBuilder)
    # Qwen's boundary rule: a turn that stopped at <|im_end|> gets its newline before the next context
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    merged = builder._merge_context_token_ids([5, im_end], [7])
    assert merged.token_ids == [5, im_end, *tokenizer.encode("\n", add_special_tokens=False), 7]


def test_a_tokenizer_of_neither_family_still_fails_as_verl_does():
    tokenizer = _tokenizer(["<pad>", "<eos>"], CHATML_TEMPLATE, eos="<eos>")
    with pytest.raises(ValueError, match="<\\|im_end\\|>"):
        _builder(tokenizer)
