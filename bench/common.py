"""What the benchmarks share: peak memory of torch's CPU allocations, interleaved timing, tables, results files.

Peak memory is read from `torch.profiler` with `profile_memory=True`: every allocation and free of torch's CPU
allocator is an event with a signed size, so the running sum in time order is the memory torch holds, and its
maximum is the peak above what was held when profiling started. It counts tensors only (not Python, not the
allocator's own overhead), which is what an accelerator's allocator would be asked for too.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
MIB = 2**20

if str(REPO) not in sys.path:  # scripts run as `python bench/bench_x.py` also import the project's test helpers
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    """CPU model, cores, RAM and library versions of this machine."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    import verl

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "gpu": torch.cuda.is_available() and torch.cuda.get_device_name() or "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "verl": verl.__version__,
    }


def peak_allocated(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Run `fn` under the memory profiler; returns (its result, peak bytes, bytes still held at the end), both
    relative to what torch held on the CPU when `fn` started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return result, peak, running


def interleaved_times(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall time of every case, `repeats` times each; each round runs all cases, starting one later every round,
    so drift and other load on the machine spread evenly over the cases."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Rows as an aligned text table (floats with 3 significant decimals)."""
    cells = [[c for c in columns]] + [
        [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, row in enumerate(cells):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def arg_parser(description: str, threads: bool = True) -> argparse.ArgumentParser:
    """--quick (tiny sizes, to check the script runs), --out (results folder) and (unless the benchmark sweeps
    thread counts itself) --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: checks, not figures")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON results")
    # on a small machine shared with other jobs, a second OpenMP thread spins at every op's barrier: an exp over
    # 32k floats measured 8 ms with 2 threads against 0.03-0.15 ms with 1
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def write_results(out: Path, name: str, args: dict, rows: list[dict], **extra) -> Path:
    """<out>/<name>.json with the machine, the arguments, the rows and anything else given."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {
        "benchmark": name,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([os.path.relpath(sys.executable, REPO)] + sys.argv),
        "machine": machine(),
        "args": args,
        "rows": rows,
        **extra,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
