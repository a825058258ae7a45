"""DAPO dynamic sampling as the official ERC/DAPO code does it, in verl 0.9.1's V1 sync trainer.

Official (Kwai-Klear/ERC `recipe/dapo/dapo_ray_trainer.py:214-277`, verl's DAPO recipe): a step generates one
batch of `data.gen_batch_size` prompts (the dataloader's batch, `drop_last`) x n responses, drops the groups whose
filter metric is the same for every response, and, while fewer than `data.train_batch_size` groups survive and
fewer than `algorithm.filter_groups.max_num_gen_batches` batches were generated, generates another. Then it trains
on the first `train_batch_size` surviving groups, or, when the cap is reached with fewer, on all of them truncated
to a multiple of the actor's world size in responses. An epoch is `len(dataset) // gen_batch_size` steps.

verl 0.9.1's V1 trainer instead fetches prompts one at a time (it forces `data.gen_batch_size=1` whenever
`filter_groups` is on), submits `train_batch_size` prompts per step and refills two prompts per dropped group until
exactly `train_batch_size` groups survive; it ignores `max_num_gen_batches` (with a warning), and counts an epoch
as `len(dataset) // train_batch_size` steps.

`max_num_gen_batches > 0` selects the official behaviour in erc-verl's sync trainer mode (`erc_sync`), through
verl's extension points: the trainer builds `OfficialDapoSampler` as its replay buffer (verl's
`_build_replay_buffer`), keeps the dataloader at `gen_batch_size` prompts, submits one such batch per step
(`_next_train_batch`), and counts epochs in generation batches. `max_num_gen_batches=0` keeps verl's sampler.
"""

import math
import time

from omegaconf import OmegaConf, open_dict
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, _accumulate_eviction_metrics

from erc_verl.core.config import uses_official_sampling

METRICS_PREFIX = "training/filter_groups"


def groups_to_train(kept: int, train_batch_size: int, group_size: int, world_size: int) -> int:
    """How many of `kept` surviving groups the official code trains on: the first `train_batch_size`, or with fewer
    all of them, truncated so their responses are a multiple of the actor's world size (official: whole responses;
    here whole groups, the same whenever world_size is a multiple of group_size, as 64 GPUs and n=8 are)."""
    if kept >= train_batch_size:
        return train_batch_size
    step = world_size // math.gcd(world_size, group_size)  # groups whose responses fill the world size
    return kept - kept % step


class OfficialDapoSampler(ReplayBuffer):
    """verl's sync `ReplayBuffer` with the official code's dynamic sampling (module docstring): no refill beyond
    `max_num_gen_batches` generation batches per step, and a smaller, truncated batch when too few groups survive.

    Only the training partition changes; validation samples as verl's does. Uses verl's own group bookkeeping
    (filtering on `filter_groups_metric`, eviction, selection, materialisation)."""

    def __init__(self, *, gen_batch_size: int, max_num_gen_batches: int, group_size: int, world_size: int, **kwargs):
        super().__init__(**kwargs, gen_batch_size=gen_batch_size)
        self.max_num_gen_batches = max_num_gen_batches
        self.group_size = group_size
        self.world_size = world_size

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        if partition_id == "val":
            return super().sample(global_steps, partition_id, batch_size)
        metrics: dict = {}
        gen_batches = 1  # the trainer submitted the step's first generation batch
        last_debug_time = time.time()
        while True:
            self._sync_metadata_from_transfer_queue()
            if self.pending_keys[partition_id] or self.running_keys[partition_id]:
                last_debug_time = self._wait_for_next_poll(partition_id, last_debug_time)
                continue
            reasons = self._terminal_eviction_reasons(global_steps, partition_id)
            evicted, stale_count, _, eviction_metrics = self._evict_terminal_groups(global_steps, partition_id, reasons)
            if evicted:
                _accumulate_eviction_metrics(metrics, eviction_metrics, stale_count)
            kept = self._sampleable_terminal_keys(partition_id, reasons)
            count = groups_to_train(len(kept), batch_size, self.group_size, self.world_size)
            capped = gen_batches >= self.max_num_gen_batches
            # With nothing to train on the official code has no batch at all: generate once more instead.
            if count == batch_size or (capped and count > 0):
                break
            self.refill_fn(self.gen_batch_size)
            gen_batches += 1
        selected, snapshot, _ = self._select_prompt_uids(partition_id, kept, count)
        self._clear_groups(partition_id, kept - set(selected))
        metrics.update(
            {
                f"{METRICS_PREFIX}/gen_batches": gen_batches,
                f"{METRICS_PREFIX}/kept_groups": len(kept),
                f"{METRICS_PREFIX}/trained_groups": count,
            }
        )
        return self._materialize_batch(partition_id, selected, snapshot), metrics


class OfficialSamplingMixin:
    """Mixed in front of verl's sync V1 trainer: with `max_num_gen_batches > 0`, its dynamic sampling is the
    official code's (module docstring); otherwise verl's own, unchanged."""

    def _build_replay_buffer(self):
        # a custom sampler (only erc-verl's poll-interval one passes the start-up check) builds through verl's
        # factory, which calls back here without it
        custom_sampler = self.config.trainer.v1.sampler.get("custom_sampler") or {}
        if not uses_official_sampling(self.config) or custom_sampler.get("path"):  # verl's own test for one
            return super()._build_replay_buffer()
        sampler_config = self.config.trainer.v1.sampler
        filter_groups = self.config.algorithm.filter_groups
        return OfficialDapoSampler(
            trainer_mode=self.trainer_mode,
            trainer_config=self.config.trainer.v1.get(self.trainer_mode, {}),
            max_off_policy_threshold=sampler_config.max_off_policy_threshold,
            max_off_policy_strategy=sampler_config.max_off_policy_strategy,
            sampler_kwargs=sampler_config.sampler_kwargs,
            refill_fn=self._add_prompts_to_generate,
            filter_groups_metric=str(filter_groups.metric),
            train_batch_size=self.config.data.train_batch_size,
            gen_batch_size=self.config.data.gen_batch_size,
            max_num_gen_batches=filter_groups.max_num_gen_batches,
            group_size=self.config.actor_rollout_ref.rollout.n,
            world_size=self.config.trainer.nnodes * self.config.trainer.n_gpus_per_node,
        )

    def _init_dataloader(self):
        if not uses_official_sampling(self.config):
            return super()._init_dataloader()
        # verl reads filter_groups.enable here only to force single-prompt fetches for its refilling sampler; the
        # official sampler fetches whole generation batches, as the official dataloader does.
        filter_groups = self.config.algorithm.filter_groups
        with open_dict(self.config):
            filter_groups.enable = False
            try:
                super()._init_dataloader()
            finally:
                filter_groups.enable = True
        # one generation batch per step: an epoch is len(train_dataloader) steps, as in the official trainer
        self.steps_per_epoch = len(self.train_dataloader)
        if self.config.trainer.total_training_steps is None:
            self.total_training_steps = self.steps_per_epoch * self.config.trainer.total_epochs
            with open_dict(self.config):
                for key in ("actor_rollout_ref.actor.optim", "critic.optim"):
                    optim = OmegaConf.select(self.config, key)
                    if optim is not None:
                        optim.total_training_steps = self.total_training_steps * self.parameter_sync_step

    def _next_train_batch(self, num_prompts: int | None = None):
        # a step's submission (verl's prepare_step) is one generation batch, not train_batch_size prompts
        if num_prompts is None and uses_official_sampling(self.config):
            num_prompts = self.config.data.gen_batch_size
        return super()._next_train_batch(num_prompts)
