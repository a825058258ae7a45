"""erc_verl.core.workers: the actor worker classes erc-verl's trainer modes swap in, and what their engines do."""

import math

import pytest
import torch
import torch.distributed as dist
from verl.utils import tensordict_utils as tu

from erc_verl.core import workers
from erc_verl.core.worker_loss import POSITIVE_NUM_SEQUENCES, POSITIVE_NUM_TOKENS


class _EngineConfig:
    entropy_from_logits_chunk_size = 3
    use_torch_compile = False


class _Engine:
    """The attributes of verl's FSDP engine that the swaps touch."""

    def __init__(self, config=None):
        self.engine_config = _EngineConfig()
        self.compute_entropy_from_logits = "verl's"
        self.seen = []

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        self.seen.append((tu.get(data, POSITIVE_NUM_TOKENS), tu.get(data, POSITIVE_NUM_SEQUENCES), forward_only))
        return "output"

    def get_data_parallel_group(self):
        return None  # the default group


class _TrainingWorker:
    def __init__(self, config):
        self.engine = _Engine(config)


class _ActorWorker:
    actor_worker_cls = _TrainingWorker
    ref_worker_cls = _TrainingWorker


def _batch(rewards, lengths):
    """A mini-batch with per-response rm_scores (score at the last token) and response masks."""
    def jagged(rows):
        return torch.nested.as_nested_tensor(rows, layout=torch.jagged)

    scores = [torch.zeros(n) for n in lengths]
    for row, reward in zip(scores, rewards):
        row[-1] = reward
    return tu.get_tensordict(
        {"rm_scores": jagged(scores), "response_mask": jagged([torch.ones(n, dtype=torch.long) for n in lengths])}
    )


def test_entropy_swap_only():
    worker_cls = workers.actor_worker(_ActorWorker, True, None)
    assert issubclass(worker_cls, _ActorWorker) and worker_cls.ref_worker_cls is _TrainingWorker
    training = worker_cls.actor_worker_cls(config=None)
    assert isinstance(training, _TrainingWorker)
    assert training.engine.compute_entropy_from_logits(torch.tensor([[0.0, 0.0]])).tolist() == pytest.approx(
        [math.log(2)]
    )
    assert training.engine.forward_backward_batch.__func__ is _Engine.forward_backward_batch  # not counting
    assert workers.actor_worker(_ActorWorker, True, None) is worker_cls  # one class per base and options


def test_positive_counts_on_each_trained_mini_batch():
    training = workers.actor_worker(_ActorWorker, False, 1.0).actor_worker_cls(config=None)
    engine = training.engine
    assert engine.compute_entropy_from_logits == "verl's"  # no ERC: verl's entropy stays
    data = _batch([1.0, -1.0, 1.0, 0.0], [3, 5, 2, 4])
    assert engine.forward_backward_batch(data, loss_function=None) == "output"
    engine.forward_backward_batch(_batch([1.0], [6]), loss_function=None, forward_only=True)  # log-probs: no count
    assert engine.seen == [(5, 2, False), (None, None, True)]


def test_counts_are_summed_over_the_data_parallel_group(monkeypatch):
    """verl splits each rank's mini-batch into micro-batches after this count, as after its batch_num_tokens; the
    other rank here holds 4 positive tokens in 1 positive response."""
    reduced = []

    def all_reduce(tensor, group=None):
        reduced.append(group)
        tensor += torch.tensor([4, 1])

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    engine = _Engine()
    engine.get_data_parallel_group = lambda: "dp group"
    workers.install_positive_counts(engine, 1.0)
    engine.forward_backward_batch(_batch([1.0, -1.0, 1.0], [3, 4, 2]), loss_function=None)
    assert reduced == ["dp group"] and engine.seen == [(3 + 2 + 4, 2 + 1, False)]


@pytest.mark.parametrize(
    "loss_mode, entropy_coeff, nll_coeff, entropy_without_grad, positive_reward",
    [
        ("erc_dapo", 0.0, 0.0, True, None),
        ("erc_dapo", 0.01, 0.0, None, None),  # the entropy bonus needs verl's own, differentiable entropy
        ("vanilla", 0.0, 0.1, False, 1.0),
        ("erc_gppo", 0.0, 0.1, True, 1.0),
        ("vanilla", 0.0, 0.0, None, None),  # nothing to change: verl's worker
    ],
)
def test_trainer_mode_swaps_the_actor_worker(loss_mode, entropy_coeff, nll_coeff, entropy_without_grad,
                                             positive_reward, monkeypatch):
    """ErcTrainerMixin swaps the actor's worker class the way verl's separate-async trainer swaps in its own."""
    import ray
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import Role
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from erc_verl.core.trainer_modes import ErcTrainerMixin

    class StockTrainer:
        def _init_resource_pool_mgr(self):
            self.role_worker_mapping = {
                Role.ActorRollout: ray.remote(ActorRolloutRefWorker),
                Role.RefPolicy: ray.remote(ActorRolloutRefWorker),
            }

    calls = []
    real_actor_worker = workers.actor_worker
    monkeypatch.setattr(
        "erc_verl.core.trainer_modes.actor_worker",
        lambda base, *options: calls.append(options) or real_actor_worker(base, *options),
    )
    self = object.__new__(type("Trainer", (ErcTrainerMixin, StockTrainer), {}))
    self.config = OmegaConf.create({"actor_rollout_ref": {"actor": {
        "entropy_coeff": entropy_coeff,
        "policy_loss": {"loss_mode": loss_mode, "positive_nll_coeff": nll_coeff, "positive_nll_reward": 1.0},
    }}})
    self._init_resource_pool_mgr()
    actor_cls = self.role_worker_mapping[Role.ActorRollout].__ray_actor_class__
    assert issubclass(actor_cls, ActorRolloutRefWorker)
    if entropy_without_grad is None:
        assert actor_cls is ActorRolloutRefWorker and not calls
    else:
        assert calls == [(entropy_without_grad, positive_reward)]
        assert actor_cls.actor_worker_cls is not ActorRolloutRefWorker.actor_worker_cls
    assert self.role_worker_mapping[Role.RefPolicy].__ray_actor_class__ is ActorRolloutRefWorker
