"""erc-verl's trainer modes: verl's V1 trainers, plus what erc-verl's options need on the actor and the sampler.

`erc_sync`, `erc_colocate_async` and `erc_separate_async` behave exactly like verl's `sync`, `colocate_async` and
`separate_async` (verl keys behaviour on the mode name, so each runs under its base name), and additionally:
- install `worker_loss.extended_ppo_loss` on the actor workers through verl's `set_loss_fn`, once the workers are
  up and before the first step: verl's `ppo_loss`, plus both entropies for `erc_*` losses and the positive-sample
  NLL term when `positive_nll_coeff` > 0;
- for `erc_*` losses, make the actor update compute the current policy's entropy (`actor.calculate_entropy=True`)
  and, with `entropy_coeff == 0`, compute it without autograd (ERC only thresholds it);
- with `positive_nll_coeff` > 0, count the positive tokens of each mini-batch over all ranks (`erc_verl.core.workers`);
- with `algorithm.filter_groups.max_num_gen_batches` > 0 (sync only), sample the official way
  (`erc_verl.core.sampling`).
The old policy's entropy needs nothing extra: the V1 trainer already stores it next to `old_log_probs`.
`erc-verl train` (`erc_verl.core.config.enable_erc`) selects these modes whenever an option needs them.
"""

from functools import partial

import ray
from omegaconf import OmegaConf, open_dict
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1 import PPOTrainerColocateAsync, PPOTrainerSeparateAsync, PPOTrainerSync, register_trainer
from verl.utils.config import omega_conf_to_dataclass

from erc_verl.core.config import (
    ERC_BASE_TRAINER_MODES,
    ERC_PREFIX,
    POLICY_LOSS_KEY,
    check_erc_config,
    is_erc_mode,
    positive_nll_coeff,
)
from erc_verl.core.sampling import OfficialSamplingMixin
from erc_verl.core.worker_loss import extended_ppo_loss
from erc_verl.core.workers import actor_worker


def erc_actor_worker(config, base: type) -> type:
    """The actor worker class an ERC trainer mode runs for `config`: `base` (verl's ActorRolloutRefWorker or a
    subclass) with the engine changes the configured options need, or `base` itself when they need none."""
    actor = config.actor_rollout_ref.actor
    # the entropy bonus needs the entropy's gradient: verl's own computation then
    entropy_without_grad = is_erc_mode(actor.policy_loss.get("loss_mode", "vanilla")) and actor.entropy_coeff == 0
    positive_reward = None
    if positive_nll_coeff(config):
        positive_reward = float(OmegaConf.select(config, f"{POLICY_LOSS_KEY}.positive_nll_reward", default=1.0))
    if not entropy_without_grad and positive_reward is None:
        return base
    return actor_worker(base, entropy_without_grad, positive_reward)


class ErcTrainerMixin:
    """Mixed in front of a verl V1 trainer class; `base_mode` is that class's registered name."""

    base_mode: str

    def __init__(self, config):
        check_erc_config(config)
        with open_dict(config):
            config.trainer.v1.trainer_mode = self.base_mode
            if is_erc_mode(config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")):
                config.actor_rollout_ref.actor.calculate_entropy = True
        super().__init__(config)

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef):
            if role in self.role_worker_mapping:
                base = self.role_worker_mapping[role].__ray_actor_class__
                self.role_worker_mapping[role] = ray.remote(erc_actor_worker(self.config, base))

    def on_init_end(self):
        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        self.actor_rollout_wg.set_loss_fn(partial(extended_ppo_loss, config=actor_config))
        super().on_init_end()


def _erc_trainer(base_mode: str, base_cls: type) -> type:
    mixins = (ErcTrainerMixin, OfficialSamplingMixin) if base_mode == "sync" else (ErcTrainerMixin,)
    cls = type(f"Erc{base_cls.__name__}", (*mixins, base_cls), {"base_mode": base_mode})
    cls.__module__ = __name__
    cls.__doc__ = f"verl's `{base_mode}` trainer with erc-verl's options (module docstring)."
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
