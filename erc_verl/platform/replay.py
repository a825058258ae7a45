"""verl's V1 replay buffer with a configurable TransferQueue poll interval (verl 0.9.1 fixes it at 2 s).

While it waits for rollouts, the trainer's replay buffer sleeps ``poll_interval`` between looks at TransferQueue
(`verl/trainer/ppo/v1/replay_buffer.py`: `ReplayBuffer._wait_for_next_poll`), and verl's trainer builds it with
the 2 s default. A step whose rollout takes well under a second (the CPU recipe's) then waits 2-4 s per
generation round and per validation. Selected through verl's custom-sampler extension point:

    trainer.v1.sampler.custom_sampler.path: pkg://erc_verl.platform.replay
    trainer.v1.sampler.custom_sampler.name: replay_buffer
    trainer.v1.sampler.sampler_kwargs.poll_interval: 0.05

The buffer itself is verl's own, built by the trainer exactly as without a custom sampler (sync or async class,
DAPO group filtering, refill settings); only its poll interval changes.
"""

from omegaconf import open_dict

POLL_INTERVAL_KEY = "poll_interval"


def replay_buffer(*, refill_fn, sampler_kwargs, **_):
    """verl's custom-sampler factory signature; `refill_fn` is the trainer's bound `_add_prompts_to_generate`."""
    poll_interval = float((sampler_kwargs or {}).get(POLL_INTERVAL_KEY, 0))
    if poll_interval <= 0:
        raise ValueError(
            f"trainer.v1.sampler.sampler_kwargs.{POLL_INTERVAL_KEY} must be > 0 seconds (got {poll_interval})"
        )
    trainer = refill_fn.__self__
    sampler_config = trainer.config.trainer.v1.sampler
    custom_sampler = sampler_config.custom_sampler
    with open_dict(sampler_config):
        sampler_config.custom_sampler = None  # the trainer then builds verl's own buffer
        try:
            buffer = trainer._build_replay_buffer()
        finally:
            sampler_config.custom_sampler = custom_sampler
    buffer.poll_interval = poll_interval
    return buffer
