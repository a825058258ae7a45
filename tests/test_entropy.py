"""erc_verl.core.entropy: the current policy's entropy for the ERC mask without autograd, and its swap into an
engine (the worker classes that do it: tests/test_workers.py)."""

import math
import warnings

import pytest
import torch

from erc_verl.core import entropy as erc_entropy
from erc_verl.core.entropy import entropy_without_grad, install_entropy_without_grad


def hand_entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def test_hand_computed_values():
    # rows: uniform over 2; p = (1/4, 3/4); uniform over 4 (constant shift of the logits changes nothing);
    # one token certain (a logit of -inf elsewhere is not needed: a gap of 200 nats underflows to 0)
    logits = torch.tensor(
        [[0.0, 0.0, -1e4, -1e4], [0.0, math.log(3.0), -1e4, -1e4], [7.0, 7.0, 7.0, 7.0], [200.0, 0.0, 0.0, 0.0]]
    )
    expected = [math.log(2), hand_entropy([0.25, 0.75]), math.log(4), 0.0]
    got = entropy_without_grad(logits)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunking_and_shapes_do_not_change_the_result(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 7, 50, generator=g)
    reference = torch.tensor(
        [[hand_entropy(torch.softmax(row.double(), -1).tolist()) for row in seq] for seq in logits]
    )
    got = entropy_without_grad(logits, chunk_size=chunk_size)
    assert got.shape == (2, 7)
    torch.testing.assert_close(got, reference.float(), atol=1e-5, rtol=1e-5)


def test_low_precision_logits_are_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(5, 300, generator=g)).bfloat16()
    got = entropy_without_grad(logits, chunk_size=2)
    reference = torch.tensor([hand_entropy(torch.softmax(r.double(), -1).tolist()) for r in logits])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.float(), atol=1e-5, rtol=1e-5)


def test_no_graph_even_when_the_logits_require_grad():
    logits = torch.randn(6, 20, requires_grad=True)
    assert entropy_without_grad(logits).grad_fn is None
    assert not entropy_without_grad(logits).requires_grad
    # verl's checkpointed branch (not used with it: see enable_erc) would still compute the same values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = torch.utils.checkpoint.checkpoint(entropy_without_grad, logits)
    reference = torch.tensor([hand_entropy(torch.softmax(r.double(), -1).tolist()) for r in logits.detach()])
    torch.testing.assert_close(wrapped.detach(), reference.float(), atol=1e-5, rtol=1e-5)


def test_bad_chunk_size_is_named():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        entropy_without_grad(torch.zeros(2, 3), chunk_size=0)


def test_compiled_path_values():
    g = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(9, 33, generator=g)
    reference = torch.tensor([hand_entropy(torch.softmax(r.double(), -1).tolist()) for r in logits])
    got = entropy_without_grad(logits, chunk_size=4, compile=True)
    torch.testing.assert_close(got, reference.float(), atol=1e-5, rtol=1e-5)
    assert got.grad_fn is None


def _peaked_and_flat_logits(tokens=192, vocab=32768, seed=3) -> torch.Tensor:
    """Half the rows sharply peaked (one logit 16-32 nats above N(0, 1) noise: low entropy, where ERC drops most
    tokens), half flat (N(0, 1): entropy near log V)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=g)
    peaked = logits[: tokens // 2]
    heights = torch.tensor([16.0, 20.0, 24.0, 28.0, 32.0]).repeat(tokens)[: tokens // 2]
    peaked[torch.arange(tokens // 2), torch.randint(vocab, (tokens // 2,), generator=g)] += heights
    return logits


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("autocast", sorted(AUTOCAST))
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=["fp32_logits", "bf16_logits"])
def test_exact_under_verls_autocast(compile, autocast, logits_dtype):
    """verl calls the engine's entropy function inside its bf16 autocast region: the result must stay within 1e-3
    nats of float64 on the same logits (a 0.05 band on the ratio needs far better than 0.05 * H)."""
    logits = _peaked_and_flat_logits().to(logits_dtype)
    reference = -(torch.log_softmax(logits.double(), -1).exp() * torch.log_softmax(logits.double(), -1)).sum(-1)
    dtype = AUTOCAST[autocast]
    context = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with context:
        got = entropy_without_grad(logits, chunk_size=64, compile=compile)
    assert got.dtype == torch.float32
    error = (got.double() - reference).abs().max().item()
    assert error <= 1e-3, f"max abs error {error:.2e} nats"
    assert reference[: len(reference) // 2].max() < 1.0 < reference[len(reference) // 2 :].min()  # both kinds


class _EngineConfig:
    entropy_from_logits_chunk_size = 3
    use_torch_compile = False


class _Engine:
    """The attributes of verl's FSDP engine that the swap touches."""

    def __init__(self, config):
        self.engine_config = _EngineConfig()
        self.compute_entropy_from_logits = "verl's"


def test_install_uses_the_engines_chunk_size(monkeypatch):
    engine = _Engine(None)
    assert install_entropy_without_grad(engine)
    seen = []
    monkeypatch.setattr(erc_entropy, "_chunk_entropy", lambda chunk: seen.append(len(chunk)) or chunk[:, 0].float())
    # verl's checkpointed branch passes no chunk_size, its chunked branch passes the engine's
    engine.compute_entropy_from_logits(torch.zeros(7, 4))
    engine.compute_entropy_from_logits(torch.zeros(7, 4), chunk_size=3)
    assert seen == [3, 3, 1] * 2
    assert not install_entropy_without_grad(object())  # engines without an entropy function are left alone


def _packed_micro_batch(lengths=(5, 3), vocab=11, seed=4):
    """A remove-padding micro-batch as verl's FSDP engine sees it, and the model output for it."""
    from types import SimpleNamespace

    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(vocab, (n,), generator=g) for n in lengths]
    input_ids = torch.nested.nested_tensor(ids, layout=torch.jagged)
    micro_batch = TensorDict({"input_ids": input_ids}, batch_size=[len(lengths)])
    tu.assign_non_tensor(micro_batch, use_remove_padding=True, calculate_entropy=True)
    total = sum(lengths)
    logits = (3 * torch.randn(1, total, vocab, generator=g)).requires_grad_(True)
    output_args = {
        "input_ids_rmpad_rolled": torch.roll(input_ids.values(), -1),
        "temperature_rmpad": torch.full((total,), 0.7),
        "temperature_is_one": False,
        "pad_size": 0,
    }
    return micro_batch, SimpleNamespace(logits=logits), output_args


def test_erc_engine_keeps_verls_in_place_log_prob_backward(monkeypatch):
    """verl computes log-probs with flash-attn's in-place cross-entropy backward unless `calculate_entropy` is
    set; the ERC engine adds its graph-free entropy beside them, so the flag stays True on the ERC path."""
    from functools import partial

    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    seen = []
    real = transformer_impl.logprobs_from_logits
    monkeypatch.setattr(transformer_impl, "logprobs_from_logits",
                        lambda logits, labels, inplace_backward=True: seen.append(inplace_backward) or real(logits, labels))

    def engine(cls, entropy_fn):
        engine = object.__new__(cls)  # the attributes prepare_model_outputs reads, without a model or a process group
        engine.engine_config = type("Config", (), {"entropy_checkpointing": False,
                                                   "entropy_from_logits_with_chunking": False})()
        engine.use_ulysses_sp = False
        engine.compute_entropy_from_logits = entropy_fn
        return engine

    stock = engine(FSDPEngineWithLMHead, verl_F.entropy_from_logits)
    erc = engine(FSDPEngineWithLMHead, None)
    erc.engine_config.entropy_from_logits_chunk_size, erc.engine_config.use_torch_compile = 3, False
    assert install_entropy_without_grad(erc) and type(erc).__mro__[1].__name__ == "_EntropyBesideLogProbs"

    outputs = {}
    for name, eng in (("stock", stock), ("erc", erc)):
        micro_batch, output, output_args = _packed_micro_batch()
        outputs[name] = eng.prepare_model_outputs(output, output_args, micro_batch, None)
        assert tu.get_non_tensor_data(micro_batch, "calculate_entropy", None) is True  # restored for the loss
    assert seen == [False, True]  # verl's own path turns the in-place backward off; the ERC engine keeps it on

    stock_out, erc_out = outputs["stock"], outputs["erc"]
    torch.testing.assert_close(erc_out["log_probs"].values(), stock_out["log_probs"].values())
    torch.testing.assert_close(erc_out["entropy"].values(), stock_out["entropy"].values().detach(), atol=1e-5, rtol=0)
    assert erc_out["entropy"].offsets().tolist() == stock_out["entropy"].offsets().tolist() == [0, 5, 8]
    assert erc_out["log_probs"].values().requires_grad and not erc_out["entropy"].values().requires_grad
