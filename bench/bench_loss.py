"""Loss level: ERC's cost over its base loss (erc_dapo vs vanilla, erc_gppo vs gppo), forward + backward.

Every loss is called the way verl's actor calls it (registered fn, real actor config, token-mean), on the same
inputs; timings are interleaved and the ratio is ERC / base from medians of the same run. Peak memory is what
torch allocates during one forward + backward, above the inputs (see common.peak_allocated).

    .venv/bin/python bench/bench_loss.py [--quick]
"""

import torch
from common import MIB, arg_parser, parse, interleaved_times, median, peak_allocated, print_table, write_results

import erc_verl.core.losses  # noqa: F401  (registers erc_dapo, erc_gppo, gppo)
from tests.verl_config import actor_config
from verl.trainer.ppo.core_algos import get_policy_loss_fn

PAIRS = [("vanilla", "erc_dapo"), ("gppo", "erc_gppo")]
# DAPO's clip-higher, the ERC band of the paper
CONFIG_OVERRIDES = (
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.policy_loss._target_=erc_verl.core.config.ErcPolicyLossConfig",
    "+actor_rollout_ref.actor.policy_loss.erc_beta_low=0.05",
    "+actor_rollout_ref.actor.policy_loss.erc_beta_high=0.05",
)


def make_inputs(batch: int, length: int, seed: int = 0) -> dict:
    """Response tensors shaped like one actor micro-batch, with entropy ratios that clip roughly a third of the
    tokens outside the 0.05 band (an active ERC mask)."""
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(batch, length, generator=g) * 3
    lengths = torch.randint(length // 4, length + 1, (batch, 1), generator=g)
    old_entropy = 0.1 + 3 * torch.rand(batch, length, generator=g)
    return dict(
        log_prob=log_prob,
        old_log_prob=log_prob + 0.1 * torch.randn(batch, length, generator=g),
        advantages=torch.sign(torch.randn(batch, 1, generator=g)).expand(batch, length).contiguous(),
        response_mask=torch.arange(length)[None, :] < lengths,
        old_entropy=old_entropy,
        entropy=old_entropy * (1 + 0.05 * torch.randn(batch, length, generator=g)),
    )


def forward_backward(mode: str, inputs: dict, config) -> None:
    log_prob = inputs["log_prob"].clone().requires_grad_(True)
    extra = {"entropy": inputs["entropy"], "old_entropy": inputs["old_entropy"]} if mode.startswith("erc_") else {}
    loss, _ = get_policy_loss_fn(mode)(
        old_log_prob=inputs["old_log_prob"],
        log_prob=log_prob,
        advantages=inputs["advantages"],
        response_mask=inputs["response_mask"],
        loss_agg_mode="token-mean",
        config=config,
        **extra,
    )
    loss.backward()


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=101)
    args = parse(parser)
    if args.quick:
        args.batch, args.length, args.repeats = 2, 64, 3

    config = actor_config(*CONFIG_OVERRIDES)
    inputs = make_inputs(args.batch, args.length)
    modes = [mode for pair in PAIRS for mode in pair]
    times = interleaved_times(
        {mode: (lambda mode=mode: forward_backward(mode, inputs, config)) for mode in modes}, args.repeats
    )
    peaks = {mode: peak_allocated(lambda mode=mode: forward_backward(mode, inputs, config))[1] for mode in modes}

    rows = []
    for base, erc in PAIRS:
        for mode in (base, erc):
            rows.append(
                {
                    "loss_mode": mode,
                    "median_ms": 1e3 * median(times[mode]),
                    "peak_mib": peaks[mode] / MIB,
                    "time_ratio": median(times[mode]) / median(times[base]),
                    "mem_ratio": peaks[mode] / peaks[base],
                }
            )
    print(f"forward+backward of the loss, {args.batch} x {args.length} tokens, {args.repeats} interleaved repeats")
    print_table(rows, ["loss_mode", "median_ms", "peak_mib", "time_ratio", "mem_ratio"])
    write_results(args.out, "loss_quick" if args.quick else "loss", vars(args), rows, times_s=times)


if __name__ == "__main__":
    main()
