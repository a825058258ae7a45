"""ERC gives the same loss, gradient and metrics on every code path verl takes, for one fixed batch and fixed weights.

The actor is the one a run uses (verl's `ActorRolloutRefWorker` as the ERC trainer modes swap it in, built from the
`cpu_paper_erc_dapo` recipe by `init_model`, in a Ray worker group), driven the way verl's trainer drives it:
`compute_log_prob` (old log-probs and the old entropy), the entropy-aware loss through `set_loss_fn`, then
`update_actor`. Paths:
  (a) padded batches, fp32, one rank;
  (b) packed sequences (remove padding, the flash-attention path), dynamic batch size (several micro-batches per
      mini-batch), two data-parallel ranks;
  (c) (b) with Ulysses sequence parallelism over the two ranks.
All in fp32 with SGD at lr 1, so a parameter's change is minus its gradient. Two updates: the first, from the same
weights on every path and compared across paths, with the old entropy scaled by 0.8 or 1.25 on two thirds of the
tokens (rho 1.25 or 0.8: far outside the 0.05 band, whatever the path's rounding); the second, from the weights the
first left, on the old policy itself (rho must be 1 and ERC drop nothing). The second is not compared across paths:
its weights already differ by the first update's rounding, which lr 1 carries into every later figure.
Tolerances: the paths differ only in the order of floating-point sums (packing, attention per sequence, all-to-all,
gradient reduction over ranks and micro-batches), which costs ~1e-7 relative per operation in fp32; 2e-5 relative
on log-probs and 1e-4 relative on losses, norms and gradients leave room for a few hundred such roundings, and are two
orders of magnitude below what a real difference in attention or masking gives (see test_gpu_path).
"""

import os
from functools import partial

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.e2e

RECIPE = "cpu_paper_erc_dapo"
FP32 = [
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype: fp32, reduce_dtype: fp32, buffer_dtype: fp32}",
    "actor_rollout_ref.actor.optim.optimizer=SGD",
    "actor_rollout_ref.actor.optim.lr=1.0",
    "actor_rollout_ref.actor.optim.weight_decay=0.0",
    "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
    "actor_rollout_ref.actor.grad_clip=1e9",
]
PATHS = {
    "a_padded_fp32_1rank": [
        "actor_rollout_ref.model.use_remove_padding=false",
        "actor_rollout_ref.model.override_config.attn_implementation=eager",
        "trainer.n_gpus_per_node=1",
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1",
        "actor_rollout_ref.actor.use_dynamic_bsz=false",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=false",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    ],
    "b_packed_dynbsz_2ranks": ["actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"],
    "c_packed_dynbsz_2ranks_sp2": [],
}
BATCH, PROMPT_LEN, RESPONSE_LEN = 8, 24, 12
OLD_ENTROPY_SCALE = (1.0, 0.8, 1.25)  # per response token, cycling: rho = 1, 1.25, 0.8


def _batch(vocab: int):
    """A fixed batch in verl's padded layout (left-padded prompts, right-padded responses), then packed."""
    from verl import DataProto
    from verl.utils.model import compute_position_id_with_mask
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(0)
    prompt_lens = torch.randint(8, PROMPT_LEN + 1, (BATCH,), generator=g)
    response_lens = torch.randint(3, RESPONSE_LEN + 1, (BATCH,), generator=g)
    prompts = torch.zeros(BATCH, PROMPT_LEN, dtype=torch.long)
    responses = torch.zeros(BATCH, RESPONSE_LEN, dtype=torch.long)
    prompt_mask = torch.zeros(BATCH, PROMPT_LEN, dtype=torch.long)
    response_mask = torch.zeros(BATCH, RESPONSE_LEN, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens.tolist(), response_lens.tolist(), strict=True)):
        prompts[i, PROMPT_LEN - p :] = torch.randint(3, vocab, (p,), generator=g)
        prompt_mask[i, PROMPT_LEN - p :] = 1
        responses[i, :r] = torch.randint(3, vocab, (r,), generator=g)
        response_mask[i, :r] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    advantages = torch.randn(BATCH, 1, generator=g).expand(BATCH, RESPONSE_LEN) * response_mask
    # the reward at the last response token: +1 makes a response positive for the paper's NLL term
    rm_scores = torch.zeros(BATCH, RESPONSE_LEN)
    rm_scores[torch.arange(BATCH), response_lens - 1] = torch.where(torch.arange(BATCH) % 2 == 0, 1.0, -1.0)
    data = DataProto.from_single_dict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask, "position_ids": compute_position_id_with_mask(attention_mask),
        "response_mask": response_mask, "advantages": advantages.contiguous(), "rm_scores": rm_scores,
    })
    return left_right_2_no_padding(data.to_tensordict())


def _run_path(overrides: list[str]) -> dict:
    """Build the actor of one path, run two updates on the fixed batch, return what the paths must agree on."""
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.trainer.ppo.metric_utils import reduce_metrics
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.py_functional import rename_dict
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import no_padding_2_padding

    import ray
    from erc_verl.core.trainer_modes import erc_actor_worker
    from erc_verl.core.worker_loss import extended_ppo_loss
    from erc_verl.runs.recipes import compose
    from erc_verl.runs.train import call_hook

    cfg = compose(RECIPE, FP32 + overrides)
    call_hook(cfg, "setup")  # the demo model and data (cached)
    ranks = cfg.trainer.n_gpus_per_node
    worker = ray.remote(erc_actor_worker(cfg, ActorRolloutRefWorker))  # as the ERC trainer modes swap it in
    pool = RayResourcePool(process_on_nodes=[ranks], max_colocate_count=1)
    group = RayWorkerGroup(
        resource_pool=pool,
        ray_cls_with_init=RayClassWithInitArgs(cls=worker, config=cfg.actor_rollout_ref, role="actor"),
    )
    group.init_model()
    group.set_loss_fn(partial(extended_ppo_loss, config=omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)))

    def parameters():
        def full(w):
            return {name: t.detach().float().cpu().clone() for name, t in w.actor.engine.get_per_tensor_param()[0]}

        return ray.get([w.__ray_call__.remote(full) for w in group.workers])[0]

    from transformers import AutoConfig

    data = _batch(AutoConfig.from_pretrained(cfg.actor_rollout_ref.model.path).vocab_size)
    response_mask = data["response_mask"]
    scale = torch.tensor(OLD_ENTROPY_SCALE * RESPONSE_LEN)[:RESPONSE_LEN].expand(BATCH, -1)
    result, before = {}, parameters()
    for update, old_entropy_scale in (("scaled", scale), ("unscaled", torch.ones_like(scale))):
        old = data.clone()
        tu.assign_non_tensor(old, calculate_entropy=True, compute_loss=False, temperature=1.0)
        out = group.compute_log_prob(old)
        batch = data.clone()
        batch["old_log_probs"] = no_padding_2_padding(out["log_probs"], data)
        batch["entropy"] = no_padding_2_padding(out["entropy"], data) * old_entropy_scale
        tu.assign_non_tensor(batch, calculate_entropy=True, global_batch_size=BATCH, mini_batch_size=BATCH, epochs=1,
                             seed=0, dataloader_kwargs={"shuffle": False}, temperature=1.0)
        metrics = reduce_metrics(rename_dict(tu.get(group.update_actor(batch), "metrics"), "actor/"))  # as the trainer
        after = parameters()
        result[update] = {
            "old_log_probs": batch["old_log_probs"] * response_mask,
            "metrics": metrics,
            "grads": {name: before[name] - after[name] for name in after},  # SGD, lr 1
        }
        before = after
    for w in group.workers:
        ray.kill(w)
    for pg in pool.pgs:  # the pool's placement groups hold the logical GPUs the next path needs
        ray.util.remove_placement_group(pg)
    return result


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    import ray

    os.environ.setdefault("ERC_VERL_CACHE", str(__import__("tests").REPO_ROOT / ".cache" / "erc_verl"))
    os.environ["ERC_VERL_RUN_DIR"] = str(tmp_path_factory.mktemp("equivalence"))
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, _temp_dir=f"/tmp/ray_erc_{os.getpid()}_eq",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield {name: _run_path(overrides) for name, overrides in PATHS.items()}
    finally:
        ray.shutdown()


METRICS = ("actor/pg_loss", "actor/positive_nll", "actor/grad_norm", "actor/erc_clipfrac", "actor/erc_clipfrac_low",
           "actor/erc_clipfrac_high", "actor/entropy_ratio_mean", "actor/entropy_ratio_min", "actor/entropy_ratio_max")


def test_an_update_on_the_old_policy_sees_rho_one_on_every_path(paths):
    for name, result in paths.items():
        metrics = result["unscaled"]["metrics"]
        assert metrics["actor/entropy_ratio_min"] == pytest.approx(1.0, abs=1e-5), name
        assert metrics["actor/entropy_ratio_max"] == pytest.approx(1.0, abs=1e-5), name
        assert metrics["actor/erc_clipfrac"] == 0.0, name


def test_erc_drops_the_scaled_tokens_on_every_path(paths):
    for name, result in paths.items():
        metrics = result["scaled"]["metrics"]
        assert 0.5 < metrics["actor/erc_clipfrac"] < 0.8, name  # two thirds of the tokens, by construction
        assert metrics["actor/erc_clipfrac_low"] > 0.2 and metrics["actor/erc_clipfrac_high"] > 0.2, name


@pytest.mark.parametrize("path", [p for p in PATHS if not p.startswith("a_")])
def test_paths_agree_with_the_padded_single_rank_one(paths, path):
    reference, other = paths["a_padded_fp32_1rank"]["scaled"], paths[path]["scaled"]
    # relative: a log-prob of -15 carries fp32 rounding ~15x that of a log-prob of -1
    log_prob_error = ((other["old_log_probs"] - reference["old_log_probs"]).abs()
                      / reference["old_log_probs"].abs().clamp(min=1.0)).max().item()
    metric_errors = {key: abs(other["metrics"][key] - reference["metrics"][key])
                     / max(abs(reference["metrics"][key]), 1e-6) for key in METRICS}
    scale = max(g.abs().max().item() for g in reference["grads"].values())
    grad_error = max((other["grads"][name] - grad).abs().max().item() for name, grad in reference["grads"].items())
    print(f"{path}: old log-prob rel {log_prob_error:.1e}, metrics rel {max(metric_errors.values()):.1e}, "
          f"|d grad| / max|grad| {grad_error / scale:.1e}")  # the measured tolerances (pytest -s)
    assert log_prob_error <= 2e-5
    assert all(error <= 1e-4 for error in metric_errors.values()), metric_errors
    assert scale > 1e-4  # the update moved the weights
    assert grad_error <= 1e-4 * scale, (grad_error, scale)
    assert np.isfinite([other["metrics"][k] for k in METRICS]).all()
