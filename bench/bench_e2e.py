"""End to end: ERC-DAPO against plain DAPO (vanilla loss + clip-higher) on the short CPU recipe.

Runs `erc-verl train RECIPE` as a subprocess, alternating the two loss modes (order ABBA, ABBA, ...) so drift
and other load on the machine hit both alike. Step time is the median of verl's `timing_s/step` in the metrics
JSONL (file logger), skipping the first steps (start-up, compilation). Memory is the kernel's RSS high-water
mark (VmHWM in /proc/<pid>/status) of every process of the run - the driver, Ray's GCS and raylet and the
workers, all descendants of the `erc-verl train` process - read every --poll seconds: `worker_peak` is the
largest single process (the actor/rollout worker that trains), `tree_peak` the sampled peak of the summed RSS.

    .venv/bin/python bench/bench_e2e.py [--quick] [--runs 2] [--steps 6] [-- extra hydra overrides]

`--pipeline` profiles the recipe itself instead (`make train`'s run) and writes `pipeline[_quick].json`:
- `train`: `erc-verl train RECIPE` as it is (its steps, validations, checkpoints, report): wall time from the
  command's start to its exit, the time until verl's first metrics row (Ray and worker start-up, then validation
  before training), medians of verl's `timing_s/*` phases, every validation's time (`timing_s/testing`) and the
  validation accuracy before and after;
- `gen`: the same recipe with dynamic sampling off (each step generates exactly train_batch_size x rollout.n
  responses once) and without validation: generation tokens/s in the pipeline = response tokens of the step /
  `timing_s/gen`, median over the steps after the first, against `sample` alone (the `hf` server's sampler, 1
  torch thread, in this process) on a batch of the same size drawn from the recipe's training prompts, with the
  cached warm-start model, at the rollout temperature and response length, stopping at EOS like the pipeline.
With --quick the two are one short run with dynamic sampling off and one validation.

    .venv/bin/python bench/bench_e2e.py --pipeline [--quick] [--steps 8] [-- extra hydra overrides]

    .venv/bin/python bench/bench_e2e.py --recipe cpu_paper_erc_dapo   # the paper recipes' code path (2 ranks, SP 2,
                                                                      # bf16, remove padding, dynamic batch size)
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from common import REPO, arg_parser, median, print_table, write_results

from erc_verl.runs.console import Progress
from erc_verl.runs.metrics import attempt_path, read_steps
from erc_verl.runs.report import summarize

MODES = {
    "dapo": ["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"],
    "erc_dapo": ["actor_rollout_ref.actor.policy_loss.loss_mode=erc_dapo"],
}
BASE, ERC = "dapo", "erc_dapo"
PHASES = ("update_actor", "old_log_prob", "gen")


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class TreeMemory(threading.Thread):
    """Samples the RSS high-water mark of a process and all its descendants until stopped."""

    def __init__(self, pid: int, poll_s: float):
        super().__init__(daemon=True)
        self.root, self.poll_s = psutil.Process(pid), poll_s
        self.hwm_kib: dict[int, tuple[str, int]] = {}
        self.tree_peak_kib = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.poll_s)

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total = 0
        for proc in procs:
            try:
                hwm, rss = _status_kib(proc.pid, "VmHWM"), _status_kib(proc.pid, "VmRSS")
                name = proc.name()
            except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
                continue
            total += rss
            self.hwm_kib[proc.pid] = (name, max(hwm, self.hwm_kib.get(proc.pid, ("", 0))[1]))
        self.tree_peak_kib = max(self.tree_peak_kib, total)

    def stop(self) -> None:
        self._done.set()
        self.join()


def one_run(mode: str, index: int, args, work: Path) -> dict:
    name = f"{mode}_{index}"
    run_dir = work / name
    metrics_path = run_dir / "metrics.jsonl"  # the recipe points verl's file logger at <run_dir>/metrics.jsonl
    cmd = [
        sys.executable,
        "-m",
        "erc_verl",
        "train",
        args.recipe,
        *MODES[mode],
        f"trainer.total_training_steps={args.steps}",
        f"trainer.experiment_name=bench_e2e_{name}",
        f"erc_verl.run_dir={run_dir}",
        # training steps only: no validation, checkpoints or report plots inside the measured runs
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "++erc_verl.report=null",  # (recipes without a report hook too)
        *args.overrides,
    ]
    log = (work / f"{name}.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    sampler = TreeMemory(proc.pid, args.poll)
    sampler.start()
    rc = proc.wait()
    sampler.stop()
    wall = time.perf_counter() - start
    if rc != 0 or not metrics_path.exists():
        raise SystemExit(f"{' '.join(cmd)}\nexited {rc}; see {work / (name + '.log')}")
    steps = [{"step": step, "data": data} for step, data in read_steps(str(metrics_path)) if "timing_s/step" in data]
    timed = steps[args.skip :]
    if not timed:
        raise SystemExit(f"{metrics_path}: {len(steps)} steps with timing_s/step, none after --skip {args.skip}")
    timing_keys = sorted({k for m in timed for k in m["data"] if k.startswith("timing_s/")})
    worker_pid, (worker_name, worker_hwm) = max(sampler.hwm_kib.items(), key=lambda item: item[1][1])
    return {
        "mode": mode,
        "run": index,
        "wall_s": wall,
        "steps": len(steps),
        "step_s": median([m["data"]["timing_s/step"] for m in timed]),
        "timing_s": {k: median([m["data"][k] for m in timed if k in m["data"]]) for k in timing_keys},
        "worker_peak_mib": worker_hwm / 1024,
        "worker": worker_name,
        "tree_peak_mib": sampler.tree_peak_kib / 1024,
        "processes": len(sampler.hwm_kib),
    }


class RowClock(Progress):
    """When each of verl's metrics rows appeared (seconds on the perf_counter clock), instead of printing them."""

    def show(self, step: int, data: dict) -> None:
        self.arrivals = getattr(self, "arrivals", {})
        self.arrivals.setdefault(step, time.perf_counter())


def pipeline_run(name: str, overrides: list[str], args, work: Path) -> dict:
    """One `erc-verl train` of the recipe (plus `overrides`), timed from outside and from its metrics."""
    run_dir = work / name
    cmd = [
        sys.executable, "-m", "erc_verl", "train", args.recipe, *overrides, *args.overrides,
        f"trainer.experiment_name=bench_pipeline_{name}", f"erc_verl.run_dir={run_dir}",
        f"+ray_kwargs.ray_init._temp_dir=/tmp/ray_bench_{os.getpid()}_{name}",
    ]
    clock = RowClock(attempt_path(str(run_dir / "metrics.jsonl")), total=0, test_freq=0, poll_s=0.1)
    with (work / f"{name}.log").open("w") as log:
        start = time.perf_counter()
        clock.start()
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        clock.stop()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexited {rc}; see {work / (name + '.log')}")
    rows = read_steps(str(run_dir / "metrics.jsonl"))
    steps = [d for s, d in rows if "timing_s/step" in d]
    phases = sorted({k for d in steps for k in d if k.startswith("timing_s/") and k != "timing_s/testing"})
    summary = summarize(rows)
    return {
        "run": name,
        "wall_s": wall,
        "first_row_s": min(getattr(clock, "arrivals", {0: start}).values()) - start,
        "steps": len(steps),
        **{f"{k.removeprefix('timing_s/')}_s": median([d[k] for d in steps[1:] or steps if k in d]) for k in phases},
        "validation_s": [d["timing_s/testing"] for d in steps if "timing_s/testing" in d],
        "val_accuracy_before": summary["val_accuracy_before"],
        "val_accuracy_after": summary["val_accuracy_after"],
        "gen_tokens_per_s": [
            d["response_length/mean"] * args.batch / d["timing_s/gen"] for d in steps[1:] or steps
        ],
    }


def sample_alone(cfg, batch: int, repeats: int) -> dict:
    """`sample` (what the `hf` server runs per batch) alone: the recipe's warm-start model and training prompts."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erc_verl.platform.sampler import sample

    model_dir = cfg.actor_rollout_ref.model.path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    chats = pd.read_parquet(cfg.data.train_files)["prompt"].tolist()
    prompts = [
        tokenizer.apply_chat_template(list(chats[i % len(chats)]), add_generation_prompt=True, tokenize=True)
        for i in range(batch)
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    rollout = cfg.actor_rollout_ref.rollout
    torch.set_num_threads(1)  # as the server runs (the recipe's OMP_NUM_THREADS=1)
    generator = torch.Generator().manual_seed(0)
    times, tokens = [], []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        ids, _ = sample(model, prompts, cfg.data.max_response_length, rollout.temperature, -1, 1.0,
                        [tokenizer.eos_token_id], tokenizer.pad_token_id, generator)
        times.append(time.perf_counter() - start)
        tokens.append(sum(len(row) for row in ids))
    return {"batch": batch, "seconds": median(times[1:]), "tokens_per_s": median(
        [n / t for n, t in zip(tokens[1:], times[1:], strict=True)])}


def pipeline(args, cfg) -> None:
    work = args.out / ("pipeline_quick_runs" if args.quick else "pipeline_runs")
    work.mkdir(parents=True, exist_ok=True)
    rollout = cfg.actor_rollout_ref.rollout
    args.batch = cfg.data.train_batch_size * rollout.n
    gen_overrides = ["algorithm.filter_groups.enable=false", f"trainer.total_training_steps={args.steps}"]
    if args.quick:
        runs = [pipeline_run("gen", [*gen_overrides, "trainer.test_freq=2", "trainer.save_freq=-1",
                                     "data.val_max_samples=32"], args, work)]
    else:
        runs = [pipeline_run("train", [], args, work),
                pipeline_run("gen", [*gen_overrides, "trainer.val_before_train=false", "trainer.test_freq=-1",
                                     "trainer.save_freq=-1", "erc_verl.report=null"], args, work)]
    alone = sample_alone(cfg, args.batch, repeats=1 if args.quick else 3)
    gen = runs[-1]
    in_pipeline = median(gen["gen_tokens_per_s"])
    rows = [
        {k: v for k, v in run.items() if not isinstance(v, list)}
        | {"validation_s": median(run["validation_s"]) if run["validation_s"] else float("nan"),
           "gen_tokens_per_s": median(run["gen_tokens_per_s"])}
        for run in runs
    ]
    print(f"{args.recipe}: the recipe as it runs, and generation in the pipeline against `sample` alone")
    print_table(rows, list(rows[0]))
    print(f"\ngeneration, batch of {args.batch}: pipeline {in_pipeline:.0f} tokens/s, sample alone "
          f"{alone['tokens_per_s']:.0f} tokens/s ({alone['tokens_per_s'] / in_pipeline:.2f}x)")
    write_results(args.out, "pipeline_quick" if args.quick else "pipeline", vars(args), rows, runs=runs,
                  sample_alone=alone, alone_over_pipeline=alone["tokens_per_s"] / in_pipeline,
                  load_average=os.getloadavg())


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0], threads=False)
    parser.add_argument("--recipe", default="cpu_tiny_erc_dapo")
    parser.add_argument("--runs", type=int, default=2, help="runs per loss mode")
    parser.add_argument("--steps", type=int, default=6, help="trainer.total_training_steps of each run")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of the step time")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--pipeline", action="store_true", help="profile the recipe as it runs (see above)")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run (after --)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.steps, args.skip = 1, 2, 1

    from erc_verl.runs.recipes import compose
    from erc_verl.runs.train import call_hook

    # the recipe's setup hook builds (once, cached) the model and data: done here, outside the timed runs
    cfg = compose(args.recipe, args.overrides)
    call_hook(cfg, "setup")
    if args.pipeline:
        return pipeline(args, cfg)
    work = args.out / ("e2e_quick_runs" if args.quick else "e2e_runs")
    work.mkdir(parents=True, exist_ok=True)
    order = []
    for r in range(args.runs):
        order += [BASE, ERC] if r % 2 == 0 else [ERC, BASE]
    runs = []
    for i, mode in enumerate(order):
        runs.append(one_run(mode, i, args, work))
        print(f"run {i}: {mode} step {runs[-1]['step_s']:.2f} s, worker peak {runs[-1]['worker_peak_mib']:.0f} MiB")

    by_mode = {m: [r for r in runs if r["mode"] == m] for m in (BASE, ERC)}
    summary = {
        m: {
            "step_s": median([r["step_s"] for r in rs]),
            # the phases that compute entropies (update: ERC only; old log-probs: both modes) and generation,
            # whose length varies with dynamic sampling's extra rounds
            **{
                f"{phase}_s": median([r["timing_s"].get(f"timing_s/{phase}", float("nan")) for r in rs])
                for phase in PHASES
            },
            "worker_peak_mib": median([r["worker_peak_mib"] for r in rs]),
            "tree_peak_mib": median([r["tree_peak_mib"] for r in rs]),
        }
        for m, rs in by_mode.items()
    }
    rows = [{"mode": m, **s, **{f"{k}_ratio": s[k] / summary[BASE][k] for k in s}} for m, s in summary.items()]
    print(f"{args.recipe}: {args.runs} runs per mode (ABBA), {args.steps} steps each, first {args.skip} skipped")
    print_table(runs, ["run", "mode", "step_s", "worker_peak_mib", "tree_peak_mib", "wall_s"])
    print()
    print_table(rows, ["mode"] + [c for k in summary[BASE] for c in (k, f"{k}_ratio")])
    write_results(args.out, "e2e_quick" if args.quick else "e2e", vars(args), rows, runs=runs)


if __name__ == "__main__":
    sys.exit(main())
