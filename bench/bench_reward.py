"""Math reward throughput and latency: erc_verl's pool against math-verify one response at a time.

The mix: ~300 R1-Distill-style responses (a few thousand characters of reasoning, `</think>`, a short solution
ending in a boxed answer: integers, fractions, radicals, tuples, half right and half wrong, right ones often in an
equivalent form) and ~3% pathological ones (towers of exponents, 200k digits, thousands of nested braces).

Rows:
  math-verify, 1 process   parse + verify with math-verify's own 5 s timeouts, one response at a time
  math-verify, N processes the same in a multiprocessing.Pool of N
  erc_verl pool            compute_score (guards, soft and hard deadlines, N worker processes), N callers each
                           scoring one response at a time (latency = one call, queueing excluded)
  erc_verl pool, batch     compute_score_async on the whole mix at once, as verl's reward loop does (throughput)
`cpu_*` columns: CPU time per response (one process, nothing else in it), which a loaded machine inflates less
than wall-clock latency. `disagree` counts realistic responses judged differently from math-verify without any deadline or limit (the
reference); pathological ones have no reference (it would run for minutes).

    python bench/bench_reward.py            # full mix, writes bench/results/reward.json
    python bench/bench_reward.py --group-size 8   # 8 responses per problem, as the paper samples
    python bench/bench_reward.py --quick    # small mix: checks the script runs
"""

import asyncio
import logging
import multiprocessing
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arg_parser, parse, print_table, write_results  # noqa: E402

from erc_verl.reward.judge import THINK_END, MathRewardConfig, score_in_process  # noqa: E402
from erc_verl.reward.math_verify_score import compute_score, compute_score_async  # noqa: E402

BASELINE_TIMEOUT_S = 5
# The reference: the same pipeline with every guard and deadline off, i.e. math-verify alone.
REFERENCE = MathRewardConfig(max_answer_chars=None, max_nesting_depth=None, max_digits=None, max_number_digits=None,
                             parse_timeout_s=None, verify_timeout_s=None)
PATHOLOGICAL = [
    r"10^{10^{10^{10}}}",
    r"9^{9^{9}}",
    r"2^{2^{2^{2^{2^{2}}}}}",
    r"100000000!",
    r"1.5\times10^{99999999}",
    "7" * 200_000,
    "3" * 200_000 + r"\cdot 10^{-5}",
    "{" * 2000 + "1" + "}" * 2000,
    "{" * 5000 + "x" + "}" * 5000,
]


@dataclass
class Item:
    response: str
    gold: str
    kind: str
    right: bool | None  # what the generator meant; None for pathological


def _reasoning(rng: random.Random, chars: int) -> str:
    steps = [
        "Let me set $x_{{{k}}} = {a}k + {b}$ and check small cases: $x_1 = {c}$.",
        "So the sum is $\\sum_{{i=1}}^{{{a}}} i = \\frac{{{a}({a}+1)}}{{2}} = {d}$, which matches.",
        "Wait, I should double-check: if $n = {a}$ then $n^2 - {b} = {e}$.",
        "Hmm, maybe it is easier to consider the product ${a} \\cdot {b} = {f}$ modulo ${c}$.",
        "Alternatively, by symmetry the two cases contribute equally, so I only need one of them.",
        "Then $\\sqrt{{{g}}} = {a}$, and the triangle has sides ${a}$, ${b}$ and ${c}$.",
    ]
    parts = []
    while sum(map(len, parts)) < chars:
        a, b, c, k = rng.randint(2, 40), rng.randint(1, 90), rng.randint(3, 97), rng.randint(1, 9)
        parts.append(rng.choice(steps).format(a=a, b=b, c=c, k=k, d=a * (a + 1) // 2, e=a * a - b, f=a * b, g=a * a))
    return " ".join(parts)


def _problem(rng: random.Random, kind: str) -> tuple[str, tuple]:
    """(ground truth, its numbers) of a problem whose answer is of `kind`."""
    if kind == "integer":
        n = rng.randint(2, 999)
        return str(n), (n,)
    if kind == "fraction":
        q = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 12])
        p = rng.choice([k for k in range(1, 3 * q) if Fraction(k, q).denominator == q])
        return f"\\frac{{{p}}}{{{q}}}", (p, q)
    if kind == "radical":
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10, 11])
        return f"{a}\\sqrt{{{b}}}", (a, b)
    x, y = rng.sample(range(-20, 21), 2)
    return f"({x}, {y})", (x, y)


def _boxed(rng: random.Random, kind: str, numbers: tuple, right: bool) -> str:
    """A model's answer: right ones often in another but equivalent form, wrong ones near misses."""
    if kind == "integer":
        (n,) = numbers
        return str(n if right else n + rng.choice([-10, -1, 1, 2]))
    if kind == "fraction":
        p, q = numbers
        if not right:
            return f"\\frac{{{p + 1}}}{{{q}}}"
        return rng.choice([f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}"]
                          + ([str(p / q)] if q in (2, 4, 5, 8) else []))
    if kind == "radical":
        a, b = numbers
        return rng.choice([f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"]) if right else f"{a + 1}\\sqrt{{{b}}}"
    x, y = numbers
    return rng.choice([f"({x}, {y})", f"({x},{y})"]) if right else f"({y}, {x})"


def _response(rng: random.Random, boxed: str) -> str:
    summary = (f"**Solution.** {_reasoning(rng, rng.randint(200, 600))}\n\n"
               f"Therefore, the final answer is $\\boxed{{{boxed}}}$.")
    return f"{_reasoning(rng, rng.randint(2000, 5000))}\n{THINK_END}\n\n{summary}"


def make_mix(n_realistic: int, n_pathological: int, group_size: int = 1, seed: int = 0) -> list[Item]:
    """`group_size` responses per problem (RL samples several per prompt, sharing its ground truth); kinds
    rotate over problems, right and wrong answers alternate."""
    rng = random.Random(seed)
    kinds = ["integer", "fraction", "radical", "tuple"]
    items = []
    for start in range(0, n_realistic, group_size):
        kind = kinds[(start // group_size) % 4]
        gold, numbers = _problem(rng, kind)
        for i in range(start, min(start + group_size, n_realistic)):
            right = (i if group_size > 1 else i // 4) % 2 == 0
            items.append(Item(_response(rng, _boxed(rng, kind, numbers, right)), gold, kind, right))
    for i in range(n_pathological):
        items.append(Item(_response(rng, PATHOLOGICAL[i % len(PATHOLOGICAL)]), "540", "pathological", None))
    rng.shuffle(items)
    return items


# --- the baseline: math-verify alone, one response at a time ----------------------------------------------------

def baseline_judge(item: Item) -> tuple[bool, float, float]:
    """(correct, seconds, CPU seconds): the official pipeline with math-verify's own (signal) 5 s timeouts."""
    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify

    start, cpu = time.perf_counter(), time.process_time()
    text = item.response.rpartition(THINK_END)[2]
    parsed = mv_parse(text, parsing_timeout=BASELINE_TIMEOUT_S)
    correct = len(parsed) >= 2 and (parsed[1] == item.gold or mv_verify(
        mv_parse(f"\\boxed{{{item.gold}}}", parsing_timeout=BASELINE_TIMEOUT_S), parsed,
        timeout_seconds=BASELINE_TIMEOUT_S))
    return bool(correct), time.perf_counter() - start, time.process_time() - cpu


def erc_verl_cpu(item: Item) -> float:
    """CPU seconds of erc_verl's judging of one response, in process: what the pool's workers spend on it."""
    cpu = time.process_time()
    score_in_process(item.response, item.gold)
    return time.process_time() - cpu


def _quiet_and_warm() -> None:
    logging.disable(logging.WARNING)  # math-verify logs every timeout
    for answer, gold in (("1/2", "\\frac{1}{2}"), ("(1, 2)", "(2,1)"), ("2\\sqrt{3}", "\\sqrt{12}")):
        baseline_judge(Item(f"</think>\\boxed{{{answer}}}", gold, "warm-up", True))
        score_in_process(f"</think>\\boxed{{{answer}}}", gold)


def _percentiles(seconds: list[float], prefix: str = "") -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {f"{prefix}p50_ms": statistics.median(ms), f"{prefix}p99_ms": ms[round(0.99 * (len(ms) - 1))],
            f"{prefix}max_ms": ms[-1]}


def _summary(name: str, wall_s: float, latencies: list[float] | None, verdicts: list[bool] | None,
             items: list[Item], reference: list[bool | None], cpu: list[float] | None = None) -> dict:
    row = {"method": name, "responses_per_s": len(items) / wall_s, "wall_s": wall_s}
    if latencies:
        row.update(_percentiles(latencies))
    if cpu:
        row.update(_percentiles(cpu, "cpu_"), cpu_mean_ms=1000 * statistics.mean(cpu))
    if verdicts is not None:
        row["disagree"] = sum(ref is not None and v != ref for v, ref in zip(verdicts, reference))
    return row


def main() -> None:
    parser = arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--realistic", type=int, default=291)
    parser.add_argument("--pathological", type=int, default=9)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=1,
                        help="responses per problem (the paper samples 8): they share a ground truth")
    args = parse(parser)
    if args.quick:
        args.realistic, args.pathological = 40, 2
    items = make_mix(args.realistic, args.pathological, args.group_size)
    n = args.processes
    _quiet_and_warm()
    print(f"{len(items)} responses ({args.pathological} pathological, {args.group_size} per problem), "
          f"{n} processes", flush=True)

    start = time.perf_counter()
    results = [baseline_judge(it) for it in items]
    baseline_wall = time.perf_counter() - start
    # The reference verdicts (realistic responses only), after the baseline: math-verify's caches would favour it.
    reference = [score_in_process(it.response, it.gold, REFERENCE)["acc"] if it.right is not None else None
                 for it in items]
    label_mismatch = sum(ref is not None and ref != it.right for ref, it in zip(reference, items))
    rows = [_summary("math-verify, 1 process", baseline_wall, [s for _, s, _ in results],
                     [v for v, _, _ in results], items, reference, cpu=[c for _, _, c in results])]
    print(rows[-1], flush=True)

    with multiprocessing.get_context("spawn").Pool(n, initializer=_quiet_and_warm) as mp_pool:
        mp_pool.map(baseline_judge, items[:n], chunksize=1)  # workers started and warm before the clock
        start = time.perf_counter()
        results = mp_pool.map(baseline_judge, items, chunksize=1)
        rows.append(_summary(f"math-verify, {n} processes", time.perf_counter() - start,
                             [s for _, s, _ in results], [v for v, _, _ in results], items, reference))
    print(rows[-1], flush=True)
    with multiprocessing.get_context("spawn").Pool(1, initializer=_quiet_and_warm) as mp_pool:
        ours_cpu = mp_pool.map(erc_verl_cpu, items, chunksize=8)  # a fresh process: no cache shared with the above

    cfg = {"num_processes": n}
    compute_score("math", "</think>\\boxed{1}", "1", **cfg)  # pool started and warm before the clock

    def timed(item: Item) -> tuple[dict, float]:
        start = time.perf_counter()
        result = compute_score("math_longcot_math_verify", item.response, item.gold, **cfg)
        return result, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as callers:
        results = list(callers.map(timed, items))
    rows.append(_summary("erc_verl pool", time.perf_counter() - start, [s for _, s in results],
                         [r["acc"] for r, _ in results], items, reference, cpu=ours_cpu))
    reasons = {}
    for (result, seconds), item in zip(results, items):
        if item.right is None:
            reasons[result["reason"]] = reasons.get(result["reason"], 0) + 1
    slowest = sorted(((1000 * s, it.kind, r["reason"] or "verdict") for (r, s), it in zip(results, items)),
                     reverse=True)[:5]
    print(rows[-1], flush=True)

    async def batch():
        return await asyncio.gather(*(compute_score_async("math_longcot_math_verify", it.response, it.gold, **cfg)
                                      for it in items))

    start = time.perf_counter()
    batch_results = asyncio.run(batch())
    rows.append(_summary("erc_verl pool, batch", time.perf_counter() - start, None, [r["acc"] for r in batch_results],
                         items, reference))

    base = rows[0]["responses_per_s"]
    for row in rows:
        row["speedup"] = row["responses_per_s"] / base
    print()
    print_table(rows, ["method", "responses_per_s", "speedup", "p50_ms", "p99_ms", "max_ms", "cpu_p50_ms",
                       "cpu_p99_ms", "disagree"])
    # What the CPU time says N processes manage on N cores that nothing else uses (wall time on a shared machine
    # is slower by however much CPU the other jobs take).
    print(f"\nCPU-bound estimate on {n} idle cores: math-verify {1000 / rows[0]['cpu_mean_ms']:.1f}/s in one process, "
          f"erc_verl {n * 1000 / rows[2]['cpu_mean_ms']:.1f}/s")
    print(f"pathological responses, erc_verl reasons: {reasons}")
    print("slowest erc_verl calls (ms, kind, reason): " + ", ".join(f"{ms:.0f} {k} {r}" for ms, k, r in slowest))
    print(f"realistic responses where math-verify's verdict differs from the generator's intent: {label_mismatch}")
    load = os.getloadavg()  # the machine may be shared: figures are only comparable at a similar load
    print(f"load average (1/5/15 min) at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    name = "reward" + (f"_group{args.group_size}" if args.group_size != 1 else "") + ("_quick" if args.quick else "")
    write_results(args.out, name, vars(args), rows, pathological_reasons=reasons,
                  slowest=slowest, label_mismatch=label_mismatch, n_responses=len(items), load_average=load)


if __name__ == "__main__":
    main()
