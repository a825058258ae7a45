"""The current policy's entropy for the ERC mask in the actor update: what each way verl can compute it costs.

One micro-batch of the actor update the way verl's FSDP engine runs it on the remove-padding path
(`FSDPEngineWithLMHead.prepare_model_outputs` + `forward_backward_batch`): logits [T, V] -> the entropy, then
log-probs (`verl_F.logprobs_from_logits`) -> ERC-DAPO loss on the detached entropy -> backward; the graph of the
entropy is dropped before backward, as when the engine's `forward_step` returns. Entropy methods:

    none                         DAPO: no entropy in the update (calculate_entropy=False)
    autograd                     verl's default with calculate_entropy: entropy_from_logits, graph kept
    autograd_compiled            the same, torch.compile'd (verl's fsdp_config.use_torch_compile=True default)
    autograd_chunked             entropy_from_logits_with_chunking=True alone
    checkpoint_chunked           what enable_erc sets: entropy_checkpointing + chunking (torch.utils.checkpoint)
    checkpoint_chunked_compiled  the same with verl's default torch.compile
    nograd_chunked               verl's chunked entropy under torch.no_grad()
    erc_nograd                   what the ERC trainer modes' actor engine runs (erc_verl.core.entropy, with enable_erc's
                                 settings: called through verl's checkpoint branch, engine chunk size)
    erc_nograd_compiled          the same with verl's default torch.compile

Sources: `logits` (a leaf [T, V]: the entropy's own cost) and `hidden` (hidden states through an lm_head
[V, H], so the step also holds the lm_head's activations and gradients; memory only, its matmuls make timed steps
too slow here). Peak memory (common.peak_allocated): of the forward (`fwd_peak`; `fwd_extra` = minus DAPO's) and
of the whole forward + backward (`step_peak`). The entropy call alone is also measured from the same logits: its
transient peak, what it still holds afterwards (its saved graph) and its time.

    .venv/bin/python bench/bench_entropy.py [--quick] [--vocab 32000 152064] [--hidden-vocab 32000] [--name entropy]
"""

import warnings
from functools import partial

import torch
import verl.utils.torch_functional as verl_F
from bench_loss import CONFIG_OVERRIDES
from common import MIB, arg_parser, parse, interleaved_times, median, peak_allocated, print_table, write_results

import erc_verl.core.losses  # noqa: F401  (registers erc_dapo)
from erc_verl.core.entropy import entropy_without_grad
from tests.verl_config import actor_config
from verl.trainer.ppo.core_algos import get_policy_loss_fn

# verl's engine calls torch.utils.checkpoint without use_reentrant (the reentrant variant); keep its warning quiet
warnings.filterwarnings("ignore", message=".*use_reentrant.*")


def entropy_methods(chunk_size: int) -> dict:
    """Entropy from logits, each exactly as verl's engine calls it for that configuration."""
    compiled = torch.compile(verl_F.entropy_from_logits, dynamic=True)
    compiled_chunked = torch.compile(verl_F.entropy_from_logits_with_chunking, dynamic=True)

    def nograd_chunked(logits):
        with torch.no_grad():
            return verl_F.entropy_from_logits_with_chunking(logits, chunk_size=chunk_size)

    # as erc_verl.core.entropy.install_entropy_without_grad sets the engine's entropy function
    erc_eager = partial(entropy_without_grad, chunk_size=chunk_size, compile=False)
    erc_compiled = partial(entropy_without_grad, chunk_size=chunk_size, compile=True)

    # the checkpoint branch calls compute_entropy_from_logits(logits) without chunk_size (its 2048 default)
    return {
        "none": None,
        "autograd": verl_F.entropy_from_logits,
        "autograd_compiled": compiled,
        "autograd_chunked": lambda x: verl_F.entropy_from_logits_with_chunking(x, chunk_size=chunk_size),
        "checkpoint_chunked": lambda x: torch.utils.checkpoint.checkpoint(verl_F.entropy_from_logits_with_chunking, x),
        "checkpoint_chunked_compiled": lambda x: torch.utils.checkpoint.checkpoint(compiled_chunked, x),
        "nograd_chunked": nograd_chunked,
        "erc_nograd": lambda x: torch.utils.checkpoint.checkpoint(erc_eager, x),
        "erc_nograd_compiled": lambda x: torch.utils.checkpoint.checkpoint(erc_compiled, x),
    }


class Step:
    """One actor micro-batch: forward (log-probs, entropy, loss) and backward, from logits or hidden states."""

    def __init__(self, source: str, tokens: int, vocab: int, hidden: int, config, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.source, self.config = source, config
        if source == "logits":
            self.leaves = [torch.randn(tokens, vocab, generator=g).requires_grad_(True)]
        else:
            self.leaves = [
                torch.randn(tokens, hidden, generator=g).requires_grad_(True),
                (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_(True),
            ]
        self.labels = torch.randint(vocab, (tokens,), generator=g)
        with torch.no_grad():
            logits = self.logits()
            noise = 0.1 * torch.randn(tokens, generator=g)
            self.old_log_prob = verl_F.logprobs_from_logits(logits, self.labels) + noise
            entropy = verl_F.entropy_from_logits_with_chunking(logits)
            self.old_entropy = entropy * (1 + 0.05 * torch.randn(tokens, generator=g))
        self.advantages = torch.sign(torch.randn(1, generator=g)).expand(tokens)
        self.response_mask = torch.ones(tokens, dtype=torch.bool)

    def logits(self) -> torch.Tensor:
        return self.leaves[0] if self.source == "logits" else self.leaves[0] @ self.leaves[1].T

    def forward(self, entropy_fn) -> torch.Tensor:
        logits = self.logits()
        # the engine's order: entropy, then log-probs
        entropy = entropy_fn(logits) if entropy_fn is not None else None
        log_prob = verl_F.logprobs_from_logits(logits, self.labels)
        kwargs = dict(
            old_log_prob=self.old_log_prob[None],
            log_prob=log_prob[None],
            advantages=self.advantages[None],
            response_mask=self.response_mask[None],
            loss_agg_mode="token-mean",
            config=self.config,
        )
        if entropy is None:
            return get_policy_loss_fn("vanilla")(**kwargs)[0]
        return get_policy_loss_fn("erc_dapo")(
            **kwargs, entropy=entropy.detach()[None], old_entropy=self.old_entropy[None]
        )[0]

    def reset(self) -> None:
        """Drop the gradients of the last step (outside a memory measurement: the profiler does not see frees of
        tensors allocated before it started)."""
        for leaf in self.leaves:
            leaf.grad = None

    def __call__(self, entropy_fn) -> None:
        self.forward(entropy_fn).backward()


def measure(source: str, vocab: int, args, config, methods: dict, step_repeats: int) -> list[dict]:
    step = Step(source, args.tokens, vocab, args.hidden, config)
    cases = {name: (lambda fn=fn: (step.reset(), step(fn))) for name, fn in methods.items()}
    if step_repeats:
        step_times = interleaved_times(cases, step_repeats)
    else:
        step_times = {}
        for case in cases.values():  # warm-up (and compilation) outside the memory measurements
            case()
    fwd_peaks, step_peaks = {}, {}
    for name, fn in methods.items():
        step.reset()
        loss, fwd_peaks[name], _ = peak_allocated(lambda fn=fn: step.forward(fn))
        loss.backward()
        del loss
        step.reset()
        step_peaks[name] = peak_allocated(lambda fn=fn: step(fn))[1]
    logits = step.logits().detach().requires_grad_(True)
    calls = {name: fn for name, fn in methods.items() if fn is not None}
    call_mem = {name: peak_allocated(lambda fn=fn: fn(logits)) for name, fn in calls.items()}
    call_times = interleaved_times({name: (lambda fn=fn: fn(logits)) for name, fn in calls.items()}, args.call_repeats)

    def vs_autograd(values: dict, name: str) -> float:
        base = values["autograd"] - values["none"]
        return (values[name] - values["none"]) / base if base else float("nan")

    rows = []
    for name in methods:
        row = {
            "source": source,
            "vocab": vocab,
            "method": name,
            "fwd_peak_mib": fwd_peaks[name] / MIB,
            "fwd_extra_mib": (fwd_peaks[name] - fwd_peaks["none"]) / MIB,
            "fwd_extra_vs_autograd": vs_autograd(fwd_peaks, name),
            "step_peak_mib": step_peaks[name] / MIB,
            "step_peak_vs_none": step_peaks[name] / step_peaks["none"],
            "call_peak_mib": call_mem[name][1] / MIB if name in calls else 0.0,
            "call_held_mib": call_mem[name][2] / MIB if name in calls else 0.0,
            "call_ms": 1e3 * median(call_times[name]) if name in calls else 0.0,
        }
        if name in calls:
            row["call_peak_vs_autograd"] = call_mem[name][1] / call_mem["autograd"][1]
            row["call_time_vs_autograd"] = median(call_times[name]) / median(call_times["autograd"])
        if step_times:
            row["step_ms"] = 1e3 * median(step_times[name])
            row["step_time_vs_none"] = median(step_times[name]) / median(step_times["none"])
        rows.append(row)
    return rows


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch (T)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064], help="vocabularies, logits source")
    parser.add_argument("--hidden-vocab", type=int, nargs="*", default=[32000], help="vocabularies, hidden source")
    parser.add_argument("--hidden", type=int, default=896, help="H of the lm_head (Qwen2.5-0.5B's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per method, logits source")
    parser.add_argument("--call-repeats", type=int, default=7, help="timed entropy calls per method")
    parser.add_argument("--chunk-size", type=int, default=2048, help="verl's entropy_from_logits_chunk_size")
    parser.add_argument("--name", default="entropy", help="results file <out>/<name>.json")
    parser.add_argument("--methods", nargs="+", help="measure only these methods (none and autograd always)")
    args = parse(parser)
    if args.quick:
        args.tokens, args.vocab, args.hidden_vocab, args.hidden = 64, [1000], [1000], 16
        args.repeats, args.call_repeats, args.chunk_size = 2, 2, 16

    config = actor_config(*CONFIG_OVERRIDES)
    methods = entropy_methods(args.chunk_size)
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            parser.error(f"unknown --methods {sorted(unknown)}; choose from {list(methods)}")
        methods = {k: v for k, v in methods.items() if k in {"none", "autograd", *args.methods}}
    # the hidden source is memory only: its lm_head matmuls make timed steps too slow for this machine
    runs = [("logits", v, args.repeats) for v in args.vocab] + [("hidden", v, 0) for v in args.hidden_vocab]
    rows = []
    for source, vocab, step_repeats in runs:
        rows += measure(source, vocab, args, config, methods, step_repeats)
        print_table(rows[-len(methods) :], list(rows[-1]))
        # after every configuration: a long run that is stopped (or killed for memory) keeps what it measured
        write_results(args.out, args.name + "_quick" if args.quick else args.name, vars(args), rows)


if __name__ == "__main__":
    main()
