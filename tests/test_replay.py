"""erc_verl.platform.replay: verl's replay buffer, built by the trainer as without a custom sampler, polling
TransferQueue at the configured interval."""

import pytest
from omegaconf import OmegaConf

from erc_verl.platform.replay import replay_buffer

CUSTOM = {"path": "pkg://erc_verl.platform.replay", "name": "replay_buffer"}


class Trainer:
    """What the factory uses of verl's trainer: its config and `_build_replay_buffer` (verl 0.9.1's builds its own
    buffer when no custom sampler is set)."""

    def __init__(self):
        self.config = OmegaConf.create({"trainer": {"v1": {"sampler": {"custom_sampler": CUSTOM}}}})
        self.seen_custom_sampler = "unset"

    def _build_replay_buffer(self):
        self.seen_custom_sampler = self.config.trainer.v1.sampler.custom_sampler
        return type("ReplayBuffer", (), {"poll_interval": 2.0})()

    def _add_prompts_to_generate(self):
        pass


def test_verls_buffer_with_the_configured_poll_interval():
    trainer = Trainer()
    buffer = replay_buffer(refill_fn=trainer._add_prompts_to_generate, sampler_kwargs={"poll_interval": 0.05},
                           trainer_mode="sync")
    assert buffer.poll_interval == 0.05
    assert trainer.seen_custom_sampler is None  # the trainer built its own buffer, not this factory again
    assert OmegaConf.to_container(trainer.config.trainer.v1.sampler.custom_sampler) == CUSTOM  # restored


@pytest.mark.parametrize("kwargs", [{}, {"poll_interval": 0}, {"poll_interval": -1}])
def test_a_missing_or_bad_poll_interval_names_the_key(kwargs):
    trainer = Trainer()
    with pytest.raises(ValueError, match=r"trainer\.v1\.sampler\.sampler_kwargs\.poll_interval must be > 0"):
        replay_buffer(refill_fn=trainer._add_prompts_to_generate, sampler_kwargs=kwargs)
