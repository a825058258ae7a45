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
