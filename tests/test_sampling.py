"""Official dynamic sampling (erc_verl.core.sampling) with verl's own ReplayBuffer machinery and dataloader.

TransferQueue (a Ray service) is replaced by an in-memory store with its kv_list / kv_batch_get / kv_clear
semantics; a fake rollout registers each submitted prompt's group of responses with a chosen `acc` pattern.
"""

import itertools

import pytest
from omegaconf import OmegaConf

from erc_verl.core.sampling import OfficialDapoSampler, OfficialSamplingMixin, groups_to_train

GROUP = 4  # responses per prompt
INFORMATIVE, ALL_WRONG, ALL_RIGHT = [1, 0, 0, 1], [0] * GROUP, [1] * GROUP


class _Store:
    """TransferQueue's key-value interface, in memory: partition -> key -> (tag, fields)."""

    def __init__(self):
        self.partitions = {}

    def put(self, partition, key, tag, fields=None):
        self.partitions.setdefault(partition, {})[key] = (tag, fields or {})

    def kv_list(self, partition_id=None):
        return {p: {k: dict(tag) for k, (tag, _) in items.items()} for p, items in self.partitions.items()}

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        items = self.partitions[partition_id]
        return {field: [items[k][1][field] for k in keys] for field in select_fields}

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.partitions.get(partition_id, {}).pop(key, None)


class _Rollout:
    """Submits prompts the way verl's trainer does (a pending prompt tag), and finishes each on the next poll with
    its responses' `acc` taken from `patterns` in order."""

    def __init__(self, store, patterns):
        self.store, self.patterns, self.submitted, self.counter = store, iter(patterns), [], itertools.count()
        self.running = []

    def submit(self, num_prompts):
        self.submitted.append(num_prompts)
        for _ in range(num_prompts):
            uid = f"p{next(self.counter):04d}"
            self.store.put("train", uid, {"is_prompt": True, "status": "running", "global_steps": 1})
            self.running.append((uid, next(self.patterns)))
        return num_prompts

    def finish_running(self):
        for uid, accs in self.running:
            self.store.put("train", uid, {"is_prompt": True, "status": "finished", "global_steps": 1})
            for session, acc in enumerate(accs):
                self.store.put("train", f"{uid}_{session}_0", {"status": "finished"},
                               {"extra_fields": {"reward_extra_info": {"acc": acc}}})
        self.running = []


@pytest.fixture
def store(monkeypatch):
    store = _Store()
    for name in ("kv_list", "kv_batch_get", "kv_clear"):
        monkeypatch.setattr(f"verl.trainer.ppo.v1.replay_buffer.tq.{name}", getattr(store, name))
    return store


def _sampler(store, patterns, gen_batch_size=8, max_num_gen_batches=1, world_size=1, train_batch_size=4):
    rollout = _Rollout(store, patterns)
    sampler = OfficialDapoSampler(
        trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None, max_off_policy_strategy="drop",
        sampler_kwargs={}, poll_interval=0.0, refill_fn=rollout.submit, filter_groups_metric="acc",
        train_batch_size=train_batch_size, gen_batch_size=gen_batch_size, max_num_gen_batches=max_num_gen_batches,
        group_size=GROUP, world_size=world_size,
    )
    # the rollout finishes whatever is running while the sampler waits between polls
    sampler._wait_for_next_poll = lambda partition_id, last: rollout.finish_running() or last
    return sampler, rollout


def _sample(sampler, rollout, gen_batch_size=8):
    rollout.submit(gen_batch_size)  # the trainer's prepare_step: one generation batch
    batch, metrics = sampler.sample(global_steps=1, partition_id="train", batch_size=sampler.train_batch_size)
    groups = sorted({key.split("_")[0] for key in batch.keys})
    assert len(batch.keys) == len(groups) * GROUP  # whole groups only
    return groups, metrics


@pytest.mark.parametrize(
    "kept, group_size, world_size, expected",
    # paper: 128 prompts, n=8, 64 GPUs: fewer than 128 survivors train in multiples of 8 groups (64 responses)
    [(130, 8, 64, 128), (128, 8, 64, 128), (100, 8, 64, 96), (7, 8, 64, 0),
     (5, 8, 6, 3), (5, 4, 1, 5), (5, 4, 2, 5), (7, 4, 8, 6)],
)
def test_groups_to_train(kept, group_size, world_size, expected):
    assert groups_to_train(kept, 128, group_size, world_size) == expected


def test_enough_survivors_train_on_train_batch_size_groups(store):
    patterns = [INFORMATIVE] * 6 + [ALL_WRONG, ALL_RIGHT]
    sampler, rollout = _sampler(store, patterns)
    groups, metrics = _sample(sampler, rollout)
    assert len(groups) == 4 and rollout.submitted == [8]  # one generation batch, no refill
    assert metrics["training/filter_groups/evicted_samples"] == 2
    assert (metrics["training/filter_groups/kept_groups"], metrics["training/filter_groups/trained_groups"]) == (6, 4)
    assert metrics["training/filter_groups/gen_batches"] == 1
    # the surplus survivors are discarded, as the official batch[:train_batch_size] does; the trained ones remain
    left = {key.split("_")[0] for key in store.partitions["train"]}
    assert left == set(groups)


def test_too_few_survivors_train_on_fewer_without_refill(store):
    patterns = [INFORMATIVE] * 3 + [ALL_WRONG] * 5
    sampler, rollout = _sampler(store, patterns, world_size=8)  # 8 GPUs / 4 responses: multiples of 2 groups
    groups, metrics = _sample(sampler, rollout)
    assert len(groups) == 2 and rollout.submitted == [8]
    assert (metrics["training/filter_groups/kept_groups"], metrics["training/filter_groups/trained_groups"]) == (3, 2)


def test_more_generation_batches_when_allowed(store):
    patterns = [INFORMATIVE] * 2 + [ALL_WRONG] * 6 + [INFORMATIVE] * 3 + [ALL_RIGHT] * 5
    sampler, rollout = _sampler(store, patterns, max_num_gen_batches=2)
    groups, metrics = _sample(sampler, rollout)
    assert rollout.submitted == [8, 8] and len(groups) == 4  # 2 + 3 survivors over two batches: first 4 of 5
    assert metrics["training/filter_groups/gen_batches"] == 2


def test_nothing_to_train_on_generates_once_more(store):
    patterns = [ALL_WRONG] * 8 + [INFORMATIVE] + [ALL_RIGHT] * 7
    sampler, rollout = _sampler(store, patterns)
    groups, metrics = _sample(sampler, rollout)
    assert rollout.submitted == [8, 8] and len(groups) == 1


def test_validation_samples_as_verl_does(store):
    sampler, rollout = _sampler(store, [])
    for uid in ("v0", "v1"):
        store.put("val", uid, {"is_prompt": True, "status": "finished", "global_steps": 0})
        for session, acc in enumerate(ALL_RIGHT):
            store.put("val", f"{uid}_{session}_0", {"status": "finished"})
    batch, metrics = sampler.sample(global_steps=0, partition_id="val", batch_size=2)
    assert len(batch.keys) == 2 * GROUP and not metrics  # nothing filtered in validation


# ---- the trainer side: verl's dataloader and step counting, on the CPU recipe's data ---------------------------


@pytest.fixture(scope="module")
def cpu_recipe_data():
    import os

    from erc_verl.demo import build
    from erc_verl.runs.recipes import compose
    from tests import REPO_ROOT

    cache = os.environ.get("ERC_VERL_CACHE", str(REPO_ROOT / ".cache" / "erc_verl"))
    cfg = compose("cpu_tiny_erc_dapo", [f"erc_verl.cache_dir={cache}"])
    build.setup(cfg)  # the recipe's artifacts, built once and cached
    return cfg.erc_verl.demo.artifacts


def _trainer(data_dir, official: bool, total_training_steps=None):
    from transformers import AutoTokenizer
    from verl.trainer.ppo.v1 import PPOTrainerSync

    from tests.verl_config import verl_config

    config = verl_config(
        f"data.train_files={data_dir}/data/train.parquet",
        f"data.val_files={data_dir}/data/val.parquet",
        "data.train_batch_size=16",
        "data.gen_batch_size=32",
        "data.dataloader_num_workers=0",
        "trainer.total_epochs=3",
        f"trainer.total_training_steps={total_training_steps or 'null'}",
        "algorithm.filter_groups.enable=true",
        "algorithm.filter_groups.metric=acc",
        f"algorithm.filter_groups.max_num_gen_batches={1 if official else 0}",
    )
    trainer = object.__new__(type("Trainer", (OfficialSamplingMixin, PPOTrainerSync), {}))
    trainer.config, trainer.trainer_mode, trainer.parameter_sync_step = config, "sync", 1
    trainer.tokenizer, trainer.processor, trainer.global_steps = AutoTokenizer.from_pretrained(
        f"{data_dir}/model"
    ), None, 1
    trainer._init_dataloader()
    return trainer


def test_dataloader_and_steps_follow_generation_batches(cpu_recipe_data):
    official = _trainer(cpu_recipe_data, official=True)
    size = len(official.train_dataset)
    assert len(official.train_dataloader) == official.steps_per_epoch == size // 32  # drop_last, as the official
    assert official.total_training_steps == 3 * (size // 32)
    assert official.config.actor_rollout_ref.actor.optim.total_training_steps == 3 * (size // 32)
    assert official.config.data.gen_batch_size == 32 and official.config.algorithm.filter_groups.enable is True
    assert len(official._next_train_batch()) == 32  # one step's submission: one generation batch
    assert len(official._next_train_batch(64)) == 64  # refills ask for whole generation batches

    verl = _trainer(cpu_recipe_data, official=False)  # verl's own: single-prompt fetches, train_batch_size a step
    assert verl.config.data.gen_batch_size == 1 and verl.steps_per_epoch == size // 16
    assert len(verl._next_train_batch()) == 16
    assert _trainer(cpu_recipe_data, official=True, total_training_steps=5).total_training_steps == 5


def test_the_trainer_builds_the_official_sampler():
    trainer = object.__new__(type("Trainer", (OfficialSamplingMixin, _StockTrainer), {}))
    trainer.trainer_mode = "sync"
    trainer.config = OmegaConf.create({
        "algorithm": {"filter_groups": {"enable": True, "metric": "acc", "max_num_gen_batches": 1}},
        "data": {"train_batch_size": 128, "gen_batch_size": 256},
        "actor_rollout_ref": {"rollout": {"n": 8}},
        "trainer": {"nnodes": 8, "n_gpus_per_node": 8, "v1": {"sync": {}, "sampler": {
            "max_off_policy_threshold": None, "max_off_policy_strategy": "drop", "sampler_kwargs": {},
            "custom_sampler": {"path": None, "name": None}}}},  # verl's default: no custom sampler
    })
    sampler = trainer._build_replay_buffer()
    assert isinstance(sampler, OfficialDapoSampler)
    assert (sampler.gen_batch_size, sampler.train_batch_size, sampler.max_num_gen_batches) == (256, 128, 1)
    assert (sampler.group_size, sampler.world_size, sampler.filter_groups_metric) == (8, 64, "acc")
    trainer.config.algorithm.filter_groups.max_num_gen_batches = 0
    assert trainer._build_replay_buffer() == "verl's"


def test_the_official_sampling_takes_only_the_poll_interval_sampler():
    """erc-verl's poll-interval sampler wraps the buffer the trainer builds (the official one here); any other
    custom sampler would replace the official sampling, so it stops at start-up."""
    from erc_verl.core.config import ErcConfigError
    from erc_verl.runs.recipes import compose

    poll = "trainer.v1.sampler.custom_sampler={path: 'pkg://erc_verl.platform.replay', name: replay_buffer}"
    cfg = compose("erc_dapo_r1_distill_1p5b", [poll, "+trainer.v1.sampler.sampler_kwargs.poll_interval=0.05"])
    assert cfg.algorithm.filter_groups.max_num_gen_batches == 1
    other = "trainer.v1.sampler.custom_sampler={path: 'pkg://my_samplers', name: mine}"
    with pytest.raises(ErcConfigError, match=r"custom_sampler.path='pkg://my_samplers': .*brings its own sampler"):
        compose("erc_dapo_r1_distill_1p5b", [other])


def test_the_poll_interval_sampler_gets_the_official_sampler_with_its_poll():
    """verl calls the custom sampler's factory (tests/test_replay.py); the factory asks the trainer for its own
    buffer without the custom sampler, which with the official sampling is the official sampler."""
    from erc_verl.platform.replay import replay_buffer

    trainer = object.__new__(type("Trainer", (OfficialSamplingMixin, _StockTrainer), {}))
    trainer.trainer_mode = "sync"
    trainer.config = OmegaConf.create({
        "algorithm": {"filter_groups": {"enable": True, "metric": "acc", "max_num_gen_batches": 1}},
        "data": {"train_batch_size": 128, "gen_batch_size": 256},
        "actor_rollout_ref": {"rollout": {"n": 8}},
        "trainer": {"nnodes": 8, "n_gpus_per_node": 8, "v1": {"sync": {}, "sampler": {
            "max_off_policy_threshold": None, "max_off_policy_strategy": "drop", "sampler_kwargs": {},
            "custom_sampler": {"path": "pkg://erc_verl.platform.replay", "name": "replay_buffer"}}}},
    })
    assert trainer._build_replay_buffer() == "verl's"  # a custom sampler is verl's to dispatch
    sampler = replay_buffer(refill_fn=trainer._add_prompts_to_generate, sampler_kwargs={"poll_interval": 0.05})
    assert isinstance(sampler, OfficialDapoSampler) and sampler.poll_interval == 0.05
    assert trainer.config.trainer.v1.sampler.custom_sampler.path == "pkg://erc_verl.platform.replay"  # restored


class _StockTrainer:
    def _build_replay_buffer(self):
        return "verl's"

    def _add_prompts_to_generate(self, count):
        pass
