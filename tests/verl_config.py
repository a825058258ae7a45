"""verl's own config tree, composed the way its trainer does, for tests that need real config objects."""

import os
from functools import lru_cache

import verl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from verl.utils.config import omega_conf_to_dataclass

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
# the minimum verl's actor dataclass needs to instantiate without a model
BASE_OVERRIDES = (
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
)


@lru_cache(maxsize=32)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(BASE_OVERRIDES + overrides))


def verl_config(*overrides: str) -> DictConfig:
    """A fresh copy of verl's ppo_trainer config with Hydra overrides applied."""
    return _compose(tuple(overrides)).copy()


def actor_config(*overrides: str):
    """The actor dataclass (FSDPActorConfig) exactly as verl's workers build it."""
    return omega_conf_to_dataclass(verl_config(*overrides).actor_rollout_ref.actor)
