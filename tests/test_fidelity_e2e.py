"""End to end on CPU: the paper recipes' fidelity options in a real run of the CPU recipe (Ray, verl's V1 trainer,
FSDP2 actor, `hf` rollout, reward worker): the official dynamic sampling (one generation batch per step, no refill)
and the positive-sample NLL term, on top of ERC-DAPO."""

import math

import pytest

from tests.test_cpu_e2e import train, train_steps

pytestmark = pytest.mark.e2e

# Prompts generated, and trained on at most, per step: fewer than TRAIN_BATCH groups survive, so each step trains
# on a smaller batch that verl pads to whole mini-batches (8 prompts x 4) with zero-loss samples.
GEN_BATCH = TRAIN_BATCH = 16


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    rows, _ = train(
        tmp_path_factory,
        "official",
        [
            "trainer.total_training_steps=2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=8",
            f"data.train_batch_size={TRAIN_BATCH}",
            f"data.gen_batch_size={GEN_BATCH}",
            "algorithm.filter_groups.max_num_gen_batches=1",
            "+actor_rollout_ref.actor.policy_loss.positive_nll_coeff=0.1",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
        ],
    )
    return train_steps(rows)


def test_one_generation_batch_per_step_without_refill(official_run):
    assert [step for step, _ in official_run] == [1, 2]
    for _, metrics in official_run:
        kept, trained = metrics["training/filter_groups/kept_groups"], metrics["training/filter_groups/trained_groups"]
        evicted = metrics.get("training/filter_groups/evicted_samples", 0)
        if trained:  # with no survivor at all the sampler generates once more (the official code would fail)
            assert metrics["training/filter_groups/gen_batches"] == 1 and kept + evicted == GEN_BATCH
        assert 0 < trained == min(kept, TRAIN_BATCH)
        assert "training/filter_groups/discarded_surplus_samples" not in metrics  # verl's refilling sampler's


def test_positive_nll_is_logged_and_finite(official_run):
    for _, metrics in official_run:
        # mixed groups always hold a correct response: the term is the mean NLL of their tokens, > 0
        assert math.isfinite(metrics["actor/positive_nll"]) and metrics["actor/positive_nll"] > 0
        assert math.isfinite(metrics["actor/erc_clipfrac"])
