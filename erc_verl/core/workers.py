"""erc-verl's actor worker: verl's, with the engine changes erc-verl's options need.

- ERC with `entropy_coeff == 0`: the engine computes the current policy's entropy without autograd
  (`erc_verl.core.entropy`);
- the positive-sample NLL term: before verl splits a mini-batch into micro-batches, the engine counts the
  positive response tokens and responses of the whole mini-batch over every data-parallel rank and sets them on
  it, as verl itself sets `batch_num_tokens` (`erc_verl.core.worker_loss.positive_nll` divides by them).

The swap goes through verl's extension points: the trainer's `_init_resource_pool_mgr` picks the worker class (as
verl's own separate-async trainer does), the worker's `actor_worker_cls` picks the training worker, whose engine
is changed once it is built.
"""

from functools import lru_cache
from typing import Optional

import torch
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id

from erc_verl.core.entropy import ENGINE_MESSAGE, install_entropy_without_grad
from erc_verl.core.worker_loss import POSITIVE_NUM_SEQUENCES, POSITIVE_NUM_TOKENS, positive_counts


def install_positive_counts(engine, positive_reward: float) -> None:
    """Make `engine` set the mini-batch's positive-token and positive-response counts (summed over the
    data-parallel group) on every batch it trains on."""
    forward_backward_batch = engine.forward_backward_batch

    def counting_forward_backward_batch(data, loss_function, forward_only=False):
        if not forward_only:
            counts = torch.tensor(positive_counts(data, positive_reward), dtype=torch.int64, device=get_device_id())
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts, group=engine.get_data_parallel_group())
            tu.assign_non_tensor(data, **{POSITIVE_NUM_TOKENS: int(counts[0]), POSITIVE_NUM_SEQUENCES: int(counts[1])})
        return forward_backward_batch(data, loss_function, forward_only)

    engine.forward_backward_batch = counting_forward_backward_batch


@lru_cache(maxsize=None)
def training_worker(base: type, entropy_without_grad: bool, positive_reward: Optional[float]) -> type:
    """A subclass of verl's `TrainingWorker` (or a subclass) whose engine has the requested changes."""

    def __init__(self, config):
        base.__init__(self, config)
        if entropy_without_grad and install_entropy_without_grad(self.engine):
            chunk = self.engine.compute_entropy_from_logits.keywords["chunk_size"]
            print(f"{ENGINE_MESSAGE} (chunks of {chunk} tokens)", flush=True)
        if positive_reward is not None:
            install_positive_counts(self.engine, positive_reward)

    return type(f"Erc{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


@lru_cache(maxsize=None)
def actor_worker(base: type, entropy_without_grad: bool, positive_reward: Optional[float]) -> type:
    """A subclass of verl's `ActorRolloutRefWorker` (or a subclass) whose actor runs on `training_worker`.

    `entropy_without_grad`: the current entropy without autograd (ERC, entropy_coeff == 0); `positive_reward`: count
    the positive tokens of each mini-batch for the NLL term (None: no NLL term)."""
    return type(
        f"Erc{base.__name__}",
        (base,),
        {
            "actor_worker_cls": training_worker(base.actor_worker_cls, entropy_without_grad, positive_reward),
            "__module__": __name__,
        },
    )
