"""The current policy's entropy for the ERC mask, computed without autograd.

ERC only compares H(pi_theta) / H(pi_old) with a band: no gradient flows through the entropy. verl's engine
computes it with autograd whenever the update asks for entropies (full-vocabulary softmax kept for a backward
that never comes, or recomputed under checkpointing). When `entropy_coeff == 0` the ERC trainer modes give the
actor workers an engine whose entropy function runs under `torch.no_grad()`, chunked over tokens (verl's
`entropy_from_logits_chunk_size`), with one [chunk, V] float32 temporary per chunk; with `entropy_coeff != 0` the
entropy bonus needs the gradient and verl's own path stays.

The swap goes through verl's extension points: the trainer's `_init_resource_pool_mgr` picks the worker class
(as verl's own separate-async trainer does), and the worker's `actor_worker_cls` picks the training worker whose
engine computes the entropy (`engine.compute_entropy_from_logits`, set by verl's FSDP, automodel, veomni and
torchtitan engines).
"""

from functools import lru_cache, partial

import torch


def _chunk_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(x) - sum(softmax(x) * x) over the last dim of a [C, V] chunk, in float32."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    probs = (x - lse).exp_()  # the chunk's one [C, V] temporary (two when the logits are not float32)
    expected = torch.bmm(probs.unsqueeze(1), x.unsqueeze(2)).view(-1)  # row-wise dot: no product tensor
    return lse.view(-1) - expected


ENGINE_MESSAGE = "erc_verl: the actor engine computes the current entropy without autograd"


@lru_cache(maxsize=1)
def _compiled_chunk_entropy():
    return torch.compile(_chunk_entropy, dynamic=True)


def entropy_without_grad(logits: torch.Tensor, chunk_size: int = 2048, compile: bool = False) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, shape logits.shape[:-1], float32, no autograd graph.

    Drop-in for verl's `entropy_from_logits[_with_chunking]` (also when verl passes its own `chunk_size`).
    """
    if chunk_size < 1:
        raise ValueError(f"entropy chunk_size must be >= 1, got {chunk_size}")
    chunk_entropy = _compiled_chunk_entropy() if compile else _chunk_entropy
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, flat.shape[0], chunk_size):
            entropy[start : start + chunk_size] = chunk_entropy(flat[start : start + chunk_size])
    return entropy.view(logits.shape[:-1])


def install_entropy_without_grad(engine) -> bool:
    """Make `engine` compute entropies with `entropy_without_grad`; False if it has no entropy function to swap.

    verl's chunked branch passes its `chunk_size`, its checkpointed branch none: the engine's holds on both.
    """
    if not hasattr(engine, "compute_entropy_from_logits"):
        return False
    config = engine.engine_config
    engine.compute_entropy_from_logits = partial(
        entropy_without_grad,
        chunk_size=getattr(config, "entropy_from_logits_chunk_size", 2048),
        compile=bool(getattr(config, "use_torch_compile", False)),
    )
    return True


@lru_cache(maxsize=None)
def training_worker_without_entropy_grad(base: type) -> type:
    """A subclass of verl's `TrainingWorker` (or a subclass) whose engine computes entropies without autograd."""

    def __init__(self, config):
        base.__init__(self, config)
        if install_entropy_without_grad(self.engine):
            chunk = self.engine.compute_entropy_from_logits.keywords["chunk_size"]
            print(f"{ENGINE_MESSAGE} (chunks of {chunk} tokens)", flush=True)

    return type(f"EntropyWithoutGrad{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


@lru_cache(maxsize=None)
def actor_worker_without_entropy_grad(base: type) -> type:
    """A subclass of verl's `ActorRolloutRefWorker` (or a subclass) whose actor uses the no-grad entropy."""
    return type(
        f"Erc{base.__name__}",
        (base,),
        {"actor_worker_cls": training_worker_without_entropy_grad(base.actor_worker_cls), "__module__": __name__},
    )
