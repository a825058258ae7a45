"""ERC trainer modes: verl's V1 trainers, with the entropy-aware loss installed on the actor workers.

`erc_sync`, `erc_colocate_async` and `erc_separate_async` behave exactly like verl's `sync`, `colocate_async` and
`separate_async` (verl keys behaviour on the mode name, so each runs under its base name), and additionally:
- make the actor update compute the current policy's entropy (`actor.calculate_entropy=True`);
- replace the actor workers' loss function with `worker_loss.entropy_aware_ppo_loss` through verl's
  `set_loss_fn`, once the workers are up and before the first step;
- with `entropy_coeff == 0`, run the actor workers as `erc_verl.core.entropy`'s subclass, whose engine computes
  the current entropy without autograd (ERC only thresholds it).
The old policy's entropy needs nothing extra: the V1 trainer already stores it next to `old_log_probs`.
"""

from functools import partial

import ray
from omegaconf import open_dict
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1 import PPOTrainerColocateAsync, PPOTrainerSeparateAsync, PPOTrainerSync, register_trainer
from verl.utils.config import omega_conf_to_dataclass

from erc_verl.core.config import ERC_BASE_TRAINER_MODES, ERC_PREFIX, check_erc_config
from erc_verl.core.entropy import actor_worker_without_entropy_grad
from erc_verl.core.worker_loss import entropy_aware_ppo_loss


class ErcTrainerMixin:
    """Mixed in front of a verl V1 trainer class; `base_mode` is that class's registered name."""

    base_mode: str

    def __init__(self, config):
        check_erc_config(config)
        with open_dict(config):
            config.trainer.v1.trainer_mode = self.base_mode
            config.actor_rollout_ref.actor.calculate_entropy = True
        super().__init__(config)

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if self.config.actor_rollout_ref.actor.entropy_coeff != 0:
            return  # the entropy bonus needs the entropy's gradient: verl's own computation
        for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef):
            if role in self.role_worker_mapping:
                base = self.role_worker_mapping[role].__ray_actor_class__
                self.role_worker_mapping[role] = ray.remote(actor_worker_without_entropy_grad(base))

    def on_init_end(self):
        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        self.actor_rollout_wg.set_loss_fn(partial(entropy_aware_ppo_loss, config=actor_config))
        super().on_init_end()


def _erc_trainer(base_mode: str, base_cls: type) -> type:
    cls = type(f"Erc{base_cls.__name__}", (ErcTrainerMixin, base_cls), {"base_mode": base_mode})
    cls.__module__ = __name__
    cls.__doc__ = f"verl's `{base_mode}` trainer with both entropies delivered to ERC losses."
    return cls


_BASE_TRAINERS = {
    "sync": PPOTrainerSync,
    "colocate_async": PPOTrainerColocateAsync,
    "separate_async": PPOTrainerSeparateAsync,
}
ERC_TRAINERS = {ERC_PREFIX + mode: _erc_trainer(mode, _BASE_TRAINERS[mode]) for mode in ERC_BASE_TRAINER_MODES}


def register() -> None:
    """Add `erc_sync`, `erc_colocate_async` and `erc_separate_async` to verl's trainer registry (the plugin)."""
    for name, cls in ERC_TRAINERS.items():
        register_trainer(name)(cls)
