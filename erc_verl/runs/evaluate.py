"""`erc-verl eval`: avg@n and pass@k per benchmark, as JSON and as a Markdown table laid out like the paper's.

    erc-verl eval --model erc_dapo=/ckpt/erc_dapo --model dapo=/ckpt/dapo --recipe erc_dapo_r1_distill_1p5b

Sampling settings (n, temperature, top_p, response length: the recipe's `erc_verl.eval`, else the paper's in
`recipes/common/eval.yaml`), the benchmarks (the recipe's `data.val_files`) and the reward (the recipe's
`reward.custom_reward_function`) come from the recipe; flags override them. Prompts are tokenised as training
tokenises them (`prompt_token_ids`) and handed to the engine as token ids. Generation runs on vLLM where a GPU and
vLLM are present, otherwise on the CPU rollout's sampler; each model is loaded once for all benchmarks and
released before the next.
"""

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_K = (1, 8, 32)
EVAL_FRAGMENT = "eval.yaml"  # the recipes' common/eval.yaml: the evaluation settings' one home


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def summarize(correct_per_problem: list[list[bool]], ks) -> dict:
    """avg@n and pass@k over problems, each with n sampled responses."""
    n = len(correct_per_problem[0])
    if any(len(c) != n for c in correct_per_problem):
        raise ValueError("every problem needs the same number of samples")
    summary = {
        "problems": len(correct_per_problem),
        "n": n,
        f"avg@{n}": sum(sum(c) for c in correct_per_problem) / (n * len(correct_per_problem)),
    }
    for k in ks:
        if k <= n:
            summary[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct_per_problem) / len(correct_per_problem)
    return summary


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """Runs as rows, benchmarks as columns (avg@n, in %), then the same layout for each pass@k."""
    benchmarks = sorted({b for run in results.values() for b in run})
    metrics = sorted(
        {m for run in results.values() for b in run.values() for m in b if m.startswith(("avg@", "pass@"))},
        key=lambda m: (not m.startswith("avg@"), int(m.split("@")[1])),
    )
    blocks = []
    for metric in metrics:
        lines = [f"| {metric} | " + " | ".join(benchmarks) + " |", "|---" * (len(benchmarks) + 1) + "|"]
        for run, per_bench in results.items():
            cells = [
                f"{100 * per_bench[b][metric]:.1f}" if metric in per_bench.get(b, {}) else "-" for b in benchmarks
            ]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def load_benchmark(path: str) -> list[dict]:
    import pandas as pd

    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_json(path, lines=True)
    missing = {"prompt", "reward_model"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)} (verl format: prompt, reward_model, ...)")
    rows = frame.to_dict("records")
    for i, row in enumerate(rows):
        if not isinstance(row["reward_model"], dict) or "ground_truth" not in row["reward_model"]:
            raise ValueError(f"{path}: row {i}: reward_model.ground_truth is missing")
    return rows


def prompt_token_ids(tokenizer, rows: list[dict], chat_template_kwargs: dict | None = None,
                     max_prompt_length: int | None = None) -> list[list[int]]:
    """Each row's prompt tokenised exactly as training tokenises it.

    verl's agent loop builds a rollout prompt with a Continuous Token builder (`build_initial_tokens`): every
    text-only builder renders the first prompt with the base class's `_render_tokens`, the chat template applied
    with `tokenize=True` (so no special token beyond the template's own: one BOS for R1-Distill), with
    `data.apply_chat_template_kwargs`; the agent loop then keeps the last `rollout.prompt_length` tokens
    (`verl/experimental/agent_loop/agent_loop.py`, verl 0.9.1). The base builder is used here: the model-specific
    ones differ only in later turns, and verl 0.9.1's Qwen builder refuses R1-Distill's tokenizer (no
    `<|im_end|>`, verl issue #7637). The ids go to the engine as they are: a text prompt would be tokenised again
    and, for R1-Distill, get a second BOS.
    """
    from verl.utils.tokenizer.continuous_token import ContinuousTokenBuilder

    builder = ContinuousTokenBuilder(tokenizer, chat_template_kwargs=dict(chat_template_kwargs or {}))
    ids = [builder.build_initial_tokens(list(row["prompt"])) for row in rows]
    return [prompt[-max_prompt_length:] if max_prompt_length else prompt for prompt in ids]


class HfEngine:
    """n samples per prompt with the CPU rollout's sampler (the same code that serves training rollouts)."""

    def __init__(self, model_path: str, seed: int, max_model_len: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.generator = torch.Generator().manual_seed(seed)

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_tokens: int,
                 batch_size: int) -> list[list[str]]:
        from erc_verl.platform.sampler import sample

        flat = [ids for ids in prompts for _ in range(n)]
        texts = []
        for start in range(0, len(flat), batch_size):
            ids, _ = sample(
                self.model, flat[start : start + batch_size], max_new_tokens=max_tokens, temperature=temperature,
                top_k=-1, top_p=top_p, eos_token_ids=[self.tokenizer.eos_token_id],
                pad_token_id=self.tokenizer.pad_token_id, generator=self.generator,
            )
            texts += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def close(self) -> None:
        del self.model


class VllmEngine:
    """vLLM's offline `LLM`, given token ids; one per model, closed before the next loads."""

    def __init__(self, model_path: str, seed: int, max_model_len: int):
        from vllm import LLM

        self.seed = seed
        self.llm = LLM(model=model_path, seed=seed, max_model_len=max_model_len)

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_tokens: int,
                 batch_size: int) -> list[list[str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=self.seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
        return [[o.text for o in out.outputs] for out in outputs]  # decoded with skip_special_tokens, as training

    def close(self) -> None:
        import gc

        import torch

        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()  # vLLM V1: the engine-core process holds the weights and the KV cache
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pick_backend(name: str):
    if name == "auto":
        import importlib.util

        import torch

        name = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    return {"hf": HfEngine, "vllm": VllmEngine}[name]


def evaluate(models: dict[str, str], benchmarks: dict[str, str], score_fn, n: int, temperature: float,
             top_p: float, max_tokens: int, ks=DEFAULT_K, backend: str = "auto", batch_size: int = 64,
             seed: int = 0, chat_template_kwargs: dict | None = None,
             max_prompt_length: int | None = None) -> dict[str, dict[str, dict]]:
    """avg@n and pass@k of every model on every benchmark; each model is loaded once, for all benchmarks."""
    from transformers import AutoTokenizer

    engine_cls = pick_backend(backend)
    data = {name: load_benchmark(path) for name, path in benchmarks.items()}
    results = {}
    for run, model_path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompts = {
            bench: prompt_token_ids(tokenizer, rows, chat_template_kwargs, max_prompt_length)
            for bench, rows in data.items()
        }
        longest_prompt = max(len(ids) for bench_prompts in prompts.values() for ids in bench_prompts)
        engine = engine_cls(model_path, seed=seed, max_model_len=longest_prompt + max_tokens)
        try:
            results[run] = {}
            for bench, rows in data.items():
                samples = engine.generate(prompts[bench], n, temperature, top_p, max_tokens, batch_size)
                correct = [[_is_correct(score_fn, row, text) for text in texts] for row, texts in zip(rows, samples)]
                results[run][bench] = summarize(correct, ks)
        finally:
            engine.close()
    return results


def _is_correct(score_fn, row: dict, text: str) -> bool:
    """verl reward functions return a float or a dict with `score` (and, ours, `acc`)."""
    result = score_fn(
        data_source=row.get("data_source", ""), solution_str=text,
        ground_truth=row["reward_model"]["ground_truth"], extra_info=row.get("extra_info"),
    )
    if isinstance(result, dict):
        return bool(result["acc"]) if "acc" in result else result["score"] > 0
    return result > 0


def _named(values: list[str], what: str) -> dict[str, str]:
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).stem, value
        if not Path(path).exists():
            raise SystemExit(f"erc-verl eval: {what} {path!r} does not exist")
        named[name] = path
    return named


def model_dir(path: str) -> str:
    """An HF model directory, given one or a verl checkpoint (`global_step_N` or its `actor/`)."""
    for candidate in (Path(path), Path(path) / "huggingface", Path(path) / "actor" / "huggingface"):
        if (candidate / "config.json").is_file():
            if not any(candidate.glob("*.safetensors")) and not any(candidate.glob("pytorch_model*.bin")):
                raise SystemExit(
                    f"erc-verl eval: {candidate} has a model config but no weights: save checkpoints with "
                    "actor_rollout_ref.actor.checkpoint.save_contents including hf_model, or merge it with "
                    "`python -m verl.model_merger merge`"
                )
            return str(candidate)
    raise SystemExit(f"erc-verl eval: {path!r} is neither an HF model directory nor a verl checkpoint with one")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erc-verl eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="[NAME=]PATH of an HF model directory or a verl checkpoint (global_step_N) saved "
                        "with hf_model; repeat for one table row per run")
    parser.add_argument("--recipe", help="take sampling settings, benchmarks and reward from this recipe")
    parser.add_argument("--data", action="append", default=[], help="[NAME=]PATH of a verl parquet/jsonl")
    parser.add_argument("--reward", help="PATH:NAME of a verl reward function (file or pkg://module); default: the "
                        "recipe's reward.custom_reward_function, else the project's math-verify reward")
    parser.add_argument("--n", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-response-length", type=int)
    parser.add_argument("--k", default=",".join(map(str, DEFAULT_K)), help="comma-separated k for pass@k")
    parser.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/eval", help="directory for eval.json and eval.md")
    parser.add_argument("overrides", nargs="*", help="hydra overrides applied to the recipe")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    from erc_verl.runs.recipes import recipes_dir

    # the paper's protocol (recipes/common/eval.yaml), unless the recipe has its own
    settings = OmegaConf.to_container(OmegaConf.load(recipes_dir() / "common" / EVAL_FRAGMENT).erc_verl.eval)
    benchmarks, score_fn, chat_template_kwargs, max_prompt_length = {}, None, None, None
    if args.recipe:
        from verl.trainer.ppo.reward import get_custom_reward_fn

        from erc_verl.runs.recipes import compose

        cfg = compose(args.recipe, args.overrides)
        if OmegaConf.select(cfg, "erc_verl.eval"):
            settings = OmegaConf.to_container(cfg.erc_verl.eval, resolve=True)
        val_files = cfg.data.val_files
        benchmarks = _named([val_files] if isinstance(val_files, str) else list(val_files), "benchmark")
        score_fn = get_custom_reward_fn(cfg)
        # the prompt as the recipe's training rollouts see it
        template_kwargs = OmegaConf.select(cfg, "data.apply_chat_template_kwargs")
        chat_template_kwargs = OmegaConf.to_container(template_kwargs, resolve=True) if template_kwargs else {}
        max_prompt_length = OmegaConf.select(cfg, "actor_rollout_ref.rollout.prompt_length")
    for key in ("n", "temperature", "top_p", "max_response_length"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    benchmarks.update(_named(args.data, "data"))
    if not benchmarks:
        raise SystemExit("erc-verl eval: no benchmarks: pass --recipe (its data.val_files) or --data PATH")
    if args.reward:
        from verl.utils.import_utils import load_extern_object

        path, _, name = args.reward.rpartition(":")
        score_fn = load_extern_object(module_path=path, object_name=name)
    if score_fn is None:
        from verl.utils.reward_score import default_compute_score as score_fn

    models = {name: model_dir(path) for name, path in _named(args.model, "model").items()}
    results = evaluate(
        models, benchmarks, score_fn, n=settings["n"], temperature=settings["temperature"], top_p=settings["top_p"],
        max_tokens=settings["max_response_length"],
        ks=[int(k) for k in args.k.split(",") if k], backend=args.backend, batch_size=args.batch_size, seed=args.seed,
        chat_template_kwargs=chat_template_kwargs, max_prompt_length=max_prompt_length,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    table = markdown_table(results)
    (out / "eval.md").write_text(table)
    print(table)
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
