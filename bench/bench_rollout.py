"""Rollout on CPU: generation throughput of the `hf` rollout backend (erc_verl.platform.sampler.sample).

`sample` is what the backend's server runs for every batch of concurrent requests: KV-cached token-by-token
sampling with per-token log-probs. Measured on the CPU recipe's model (its `erc_verl.demo.model` block) and on a
~20M-parameter model of the same architecture, with chat-formatted prompts of the recipe's task, one batch as
verl's agent loop sends it (train_batch_size x rollout.n), EOS disabled so every sequence generates the full
length. Throughput = generated tokens / wall time (prefill included), median over repeats.

    .venv/bin/python bench/bench_rollout.py [--quick]
"""

import random
import time
from dataclasses import replace

import torch
from common import REPO, arg_parser, median, print_table, write_results
from omegaconf import OmegaConf

from erc_verl.platform.hf_rollout import sample
from erc_verl.demo.task import TaskSpec, all_expressions, corpus
from erc_verl.demo.tiny_model import ModelSpec, build_model, build_tokenizer
from erc_verl.demo.warm_start import encode_pair

RECIPE = REPO / "recipes" / "cpu_tiny_erc_dapo.yaml"
# same architecture as the recipe's model, widened and deepened to ~20M parameters
MODEL_20M = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=7, num_attention_heads=8,
                 num_key_value_heads=4)


def recipe_settings() -> dict:
    recipe = OmegaConf.load(RECIPE)
    return {
        "model": OmegaConf.to_container(recipe.erc_verl.demo.model, resolve=True),
        "task": OmegaConf.to_container(recipe.erc_verl.demo.task, resolve=True),
        "batch": recipe.data.train_batch_size * recipe.actor_rollout_ref.rollout.n,
        "response_length": recipe.data.max_response_length,
        "temperature": recipe.actor_rollout_ref.rollout.get("temperature", 1.0),
    }


def prompts(tokenizer, task: TaskSpec, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    exprs = all_expressions(task)
    return [encode_pair(tokenizer, *rng.choice(exprs))[0] for _ in range(n)]


def throughput(model, batch_prompts, new_tokens: int, temperature: float, repeats: int) -> tuple[float, float]:
    """(median seconds, generated tokens per second) for one batch of `new_tokens` tokens per prompt."""
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        ids, _ = sample(model, batch_prompts, new_tokens, temperature, -1, 1.0, [-1], 0, generator)
        times.append(time.perf_counter() - start)
        assert all(len(row) == new_tokens for row in ids)
    seconds = median(times[1:])
    return seconds, len(batch_prompts) * new_tokens / seconds


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0], threads=False)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", help="new tokens per sequence (default: recipe, 64)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: recipe's batch x n)")
    # the backend's server runs with the recipe's OMP_NUM_THREADS=1 (Ray runtime_env): 1 torch thread
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="torch threads to measure")
    args = parser.parse_args()
    settings = recipe_settings()
    batch = args.batch or settings["batch"]
    lengths = args.lengths or [settings["response_length"], 64]
    if args.quick:
        batch, lengths, args.repeats, args.thread_counts = 4, [4], 1, [1]

    task = TaskSpec(**{k: v for k, v in settings["task"].items() if k in TaskSpec.__dataclass_fields__})
    tokenizer = build_tokenizer(corpus(task), settings["model"]["vocab_size"])
    batch_prompts = prompts(tokenizer, task, batch)
    recipe_spec = ModelSpec(**settings["model"])
    models = {"recipe": recipe_spec, "20M": replace(recipe_spec, **MODEL_20M)}
    if args.quick:
        models = {"recipe": recipe_spec}

    rows = []
    for name, spec in models.items():
        longest = max(len(p) for p in batch_prompts) + max(lengths)
        model = build_model(replace(spec, max_position_embeddings=max(spec.max_position_embeddings, longest)),
                            tokenizer).eval()
        params = sum(p.numel() for p in model.parameters())
        for threads in args.thread_counts:
            torch.set_num_threads(threads)
            for new_tokens in lengths:
                seconds, tps = throughput(model, batch_prompts, new_tokens, settings["temperature"], args.repeats)
                rows.append({"model": name, "params_m": params / 1e6, "threads": threads, "batch": batch,
                             "new_tokens": new_tokens, "median_s": seconds, "tokens_per_s": tps})
                print_table(rows[-1:], list(rows[-1]))
    print(f"\nhf rollout backend, {args.repeats} repeats (median)")
    print_table(rows, list(rows[0]))
    write_results(args.out, "rollout_quick" if args.quick else "rollout", vars(args), rows)


if __name__ == "__main__":
    main()
