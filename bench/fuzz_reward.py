"""Reward fuzz at scale: generated adversarial responses through the paper reward's worker pool.

Each response goes through `erc_verl.reward.math_verify_score.compute_score` (the function the paper recipes
select, with their settings: default options, 2 worker processes), from as many caller threads as there are
worker processes. Categories: unbalanced and deeply nested brackets, 1 MB strings, towers of exponents, huge
factorials and digit strings, control characters and invalid UTF-8, LaTeX environments, repeated `</think>`,
empty and None-like inputs, random mixtures of LaTeX pieces, and near-real answers (some right).

Reported, overall and per category:
  crashes          compute_score raised, returned something other than {score, acc, pred, reason} with a known
                   reason, or the worker died under the response (`worker_crash`): must be 0
  past_deadline    responses whose scoring (from a worker taking them to their result) ran past the hard
                   deadline plus GRACE_S for the pool to notice and kill: must be 0
  replacements     worker processes replaced (killed at the hard deadline, or died)
  p50/p99/max ms   latency of one call as its caller sees it (includes waiting for a replacement worker)
and the reasons table. Exits 1 when crashes or past_deadline is not 0.

    python bench/fuzz_reward.py                 # 10,000 responses, writes bench/results/fuzz_reward.json
    python bench/fuzz_reward.py --quick         # 200 responses with 0.5 s soft / 3 s hard deadlines: for CI
"""

import collections
import logging
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arg_parser, print_table, write_results  # noqa: E402

from erc_verl.reward.judge import REASONS, MathRewardConfig  # noqa: E402
from erc_verl.reward.math_verify_score import compute_score, get_pool  # noqa: E402
from erc_verl.reward.pool import DeadlinePool  # noqa: E402

T = "</think>"
MB = 2**20
GRACE_S = 1.0  # the dispatcher kills a worker when it notices the deadline: allow for a loaded machine
QUICK_OPTIONS = {"parse_timeout_s": 0.5, "verify_timeout_s": 0.5, "hard_timeout_s": 3.0}
GOLDS = ["540", "7", "\\frac{1}{2}", "2\\sqrt{3}", "(1, 2)", "x^2+1", "\\text{(B)}", "[0, 1)", "-3", "0.25"]
PIECES = ["\\boxed{", "{", "}", "^{", "^", "10", "9" * 40, "\\frac{", "\\sqrt{", "\\dfrac", T, "$", "$$", "\\left(",
          "\\right)", "(", ")", "[", "]", "!", "\\text{", "\\infty", "x", "=", ",", ".", "\\\\", "\\cup", "&",
          "\\begin{pmatrix}", "\\end{pmatrix}", "final answer is ", "Answer: ", "\n", " ", "\x00", "\udcff"]


def _boxed(rng: random.Random, inner: str) -> str:
    return rng.choice(["", "Reasoning. " * rng.randint(1, 50)]) + T + rng.choice(
        [f"\\boxed{{{inner}}}", f"The answer is $\\boxed{{{inner}}}$.", f"${inner}$", f"Answer: {inner}", inner])


def brackets(rng: random.Random):
    depth = rng.choice([5, 20, 21, 100, 1000, 5000, 50_000])
    opener, closer = rng.choice([("{", "}"), ("(", ")"), ("[", "]"), ("\\left(", "\\right)"), ("\\{", "\\}")])
    kind = rng.randrange(4)
    if kind == 0:  # balanced, deep
        return _boxed(rng, opener * depth + "1" + closer * depth)
    if kind == 1:  # only openers
        return _boxed(rng, opener * depth)
    if kind == 2:  # only closers, then something real
        return T + closer * depth + "\\boxed{5}"
    return _boxed(rng, "".join(rng.choice("{}()[]") for _ in range(depth)))  # random, unbalanced


def one_megabyte(rng: random.Random):
    filler = rng.choice(["a", "7", " ", "{", "\\", "$", "x+", "\\frac{1}{2}", "é", "\x00", "</thin"])
    text = (filler * (MB // len(filler) + 1))[:MB]
    kind = rng.randrange(4)
    if kind == 0:
        return T + text  # the answer text itself is 1 MB
    if kind == 1:
        return text + T + "\\boxed{540}"  # 1 MB of reasoning, a short answer
    if kind == 2:
        return text  # no </think>
    return T + "\\boxed{" + text + "}"


def tower(rng: random.Random):
    levels = [str(rng.choice([2, 9, 10, 99, 1.5, 0.5, -3, 100000])) for _ in range(rng.randint(2, 8))]
    form = rng.randrange(4)
    if form == 0:
        inner = levels[-1]
        for base in reversed(levels[:-1]):
            inner = f"{base}^{{{inner}}}"
    elif form == 1:
        inner = "^".join(levels)
    elif form == 2:
        inner = "**".join(levels)
    else:
        inner = f"{levels[0]}\\times 10^{{{rng.choice(['99999999', '10^{10}', '-999999999'])}}}"
    return _boxed(rng, inner)


def factorial(rng: random.Random):
    n = rng.choice(["100000000", "10^{6}", "(10^{10})", "999999", "20", "3"])
    return _boxed(rng, rng.choice([f"{n}!", f"{n}!!", f"{n}" + "!" * rng.randint(3, 12), f"\\binom{{{n}}}{{5000}}",
                                   f"\\Gamma({n})", f"{n}! \\cdot {n}!"]))


def digits(rng: random.Random):
    n = rng.choice([4300, 4301, 20_000, 99_999, 200_000, 300_000])
    number = "".join(rng.choice("0123456789") for _ in range(min(n, 2000))) * (n // 2000 + 1)
    number = number[:n]
    form = rng.randrange(4)
    if form == 1:
        number = number[: n // 2] + "." + number[n // 2 :]
    elif form == 2:
        number = ",".join(number[i : i + 3] for i in range(0, min(n, 30_000), 3))
    elif form == 3:
        number = number[:4000] + "\\cdot 10^{" + number[:50] + "}"
    return _boxed(rng, number)


def control_and_bytes(rng: random.Random):
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 5000)))
    if kind == 1:
        return b"\xff\xfe" + T.encode() + bytes(rng.randrange(256) for _ in range(200)) + b"\\boxed{\xc3\x28}"
    if kind == 2:
        return T + "".join(chr(rng.randrange(32)) for _ in range(rng.randint(1, 5000))) + "\\boxed{7}"
    if kind == 3:
        return T + "\\boxed{" + "".join(rng.choice(["\udcff", "\ud800", "\ufeff", "\u202e", "\u0000", "\x7f"])
                                        for _ in range(200)) + "}"
    return T + "\\boxed{5" + "\x08" * 100 + "4}"


def latex_environment(rng: random.Random):
    env = rng.choice(["pmatrix", "bmatrix", "array", "cases", "align", "aligned", "tabular", "equation", "nosuch"])
    size = rng.choice([1, 10, 100, 2000])
    body = " \\\\ ".join("&".join(str(rng.randint(-9, 9)) for _ in range(rng.randint(1, 5))) for _ in range(size))
    kind = rng.randrange(4)
    if kind == 0:
        return _boxed(rng, f"\\begin{{{env}}}{body}\\end{{{env}}}")
    if kind == 1:
        return _boxed(rng, f"\\begin{{{env}}}{body}")  # never closed
    if kind == 2:
        return _boxed(rng, f"\\begin{{{env}}}" * 50 + "1" + f"\\end{{{env}}}" * 50)
    return _boxed(rng, f"\\end{{{env}}}{body}\\begin{{{env}}}")


def think_ends(rng: random.Random):
    n = rng.choice([2, 10, 1000, 100_000])
    kind = rng.randrange(4)
    if kind == 0:
        return T * n
    if kind == 1:
        return (T + "\\boxed{540} ") * n
    if kind == 2:
        return T + "\\boxed{" + T * n + "}"
    return "\\boxed{540}" + T * n


def empty_like(rng: random.Random):
    return rng.choice(["", None, " ", "\n", "None", "null", "NaN", "nan", "undefined", b"", T, T + " ",
                       T + "\\boxed{}", T + "\\boxed{ }", T + "$$", 0, float("nan"), [], {}, object()])


def mixture(rng: random.Random):
    text = "".join(rng.choice(PIECES) if rng.random() < 0.8 else chr(rng.randrange(0x20, 0x3000))
                   for _ in range(rng.randint(0, 400)))
    return rng.choice(["", T]) + text


def near_real(rng: random.Random):
    return _boxed(rng, rng.choice(GOLDS + [str(rng.randint(-1000, 1000)), "\\frac{2}{4}", "\\sqrt{12}", "(2, 1)"]))


CATEGORIES = {f.__name__: f for f in (brackets, one_megabyte, tower, factorial, digits, control_and_bytes,
                                      latex_environment, think_ends, empty_like, mixture, near_real)}
# Share of the responses per category: 1 MB strings are few (each one is a megabyte to pipe to a worker).
WEIGHTS = {"brackets": 14, "one_megabyte": 2, "tower": 12, "factorial": 8, "digits": 8, "control_and_bytes": 10,
           "latex_environment": 10, "think_ends": 6, "empty_like": 6, "mixture": 16, "near_real": 8}


def ground_truth(rng: random.Random):
    roll = rng.random()
    if roll < 0.9:
        return rng.choice(GOLDS)
    return rng.choice(["", None, ["540", "\\frac{1}{2}"], 17, "9" * 5000, "10^{10^{10}}", "{" * 30, "\x00"])


def item(index: int, seed: int):
    """Response `index`: its category, response and ground truth (generated on demand, reproducibly)."""
    rng = random.Random(seed * 1_000_003 + index)
    category = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    return category, CATEGORIES[category](rng), ground_truth(rng)


class ScoringTimes:
    """Per calling thread, each pool task's scoring time: from a worker taking it to its result. The pool's
    futures are marked running when a worker takes them and resolved at the result: both are timed here."""

    def __init__(self):
        self._local = threading.local()
        submit = DeadlinePool.submit
        times = self

        def timed_submit(pool, payload, timeout_s):
            future = submit(pool, payload, timeout_s)
            if hasattr(times._local, "futures"):  # a thread being timed
                times._local.futures.append(future)
            return future

        DeadlinePool.submit = timed_submit
        running = Future.set_running_or_notify_cancel

        def timed_running(future):
            future.taken_at = time.monotonic()
            return running(future)

        Future.set_running_or_notify_cancel = timed_running

    def start(self) -> None:
        self._local.futures = []

    def longest(self) -> float:
        """Longest scoring time of the calling thread's tasks since `start` (0 when nothing reached the pool)."""
        done_at = time.monotonic()  # the call has returned: every task it waited for is done
        return max((done_at - getattr(f, "taken_at", done_at) for f in self._local.futures), default=0.0)


def valid(result) -> bool:
    return (isinstance(result, dict) and set(result) == {"score", "acc", "pred", "reason"}
            and isinstance(result["score"], float) and isinstance(result["acc"], bool)
            and isinstance(result["pred"], str) and (result["reason"] == "" or result["reason"] in REASONS))


def main() -> None:
    parser = arg_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--n", type=int, default=10_000, help="responses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2, help="reward worker processes (and caller threads)")
    args = parser.parse_args()
    options = {"num_processes": args.processes, **(QUICK_OPTIONS if args.quick else {})}
    if args.quick:
        args.n = min(args.n, 200)
    cfg = MathRewardConfig.from_kwargs(options)
    logging.disable(logging.WARNING)  # math-verify logs every timeout
    times = ScoringTimes()
    compute_score("math", T + "\\boxed{1}", "1", **options)  # workers started and warm before the clock
    restarts_before = get_pool(cfg).restarts

    def score(index: int) -> dict:
        category, response, gold = item(index, args.seed)
        times.start()
        start = time.perf_counter()
        try:
            result = compute_score("math_longcot_math_verify", response, gold, **options)
        except Exception as error:  # noqa: BLE001 - a crash is what this counts
            result = {"raised": f"{type(error).__name__}: {error}"}
        latency = time.perf_counter() - start
        reason = result.get("reason") if valid(result) else "INVALID"
        return {"category": category, "latency_s": latency, "scoring_s": times.longest(), "reason": reason,
                "crash": not valid(result) or reason == "worker_crash", "detail": result.get("raised")}

    print(f"{args.n} responses, {args.processes} worker processes, hard deadline {cfg.hard_deadline_s} s",
          flush=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.processes) as callers:
        outcomes = []
        for done, outcome in enumerate(callers.map(score, range(args.n)), 1):
            outcomes.append(outcome)
            if done % 1000 == 0:
                print(f"  {done} scored, {time.perf_counter() - start:.0f} s", flush=True)
    wall_s = time.perf_counter() - start
    replacements = get_pool(cfg).restarts - restarts_before

    limit_s = cfg.hard_deadline_s + GRACE_S
    rows = []
    for name in [*WEIGHTS, "all"]:
        group = [o for o in outcomes if name in ("all", o["category"])]
        if not group:
            continue
        ms = sorted(1000 * o["latency_s"] for o in group)
        reasons = collections.Counter(o["reason"] or "verdict" for o in group)
        rows.append({
            "category": name, "n": len(group), "crashes": sum(o["crash"] for o in group),
            "past_deadline": sum(o["scoring_s"] > limit_s for o in group),
            "p50_ms": statistics.median(ms), "p99_ms": ms[round(0.99 * (len(ms) - 1))], "max_ms": ms[-1],
            "max_scoring_s": max(o["scoring_s"] for o in group),
            "top_reasons": ", ".join(f"{r} {c}" for r, c in reasons.most_common(3)),
        })
    total = rows[-1]
    reasons = collections.Counter(o["reason"] or "verdict" for o in outcomes)
    print()
    print_table(rows, ["category", "n", "crashes", "past_deadline", "p50_ms", "p99_ms", "max_ms", "max_scoring_s",
                       "top_reasons"])
    print("\nreason          count")
    for reason, count in reasons.most_common():
        print(f"{reason:<15} {count}")
    load = os.getloadavg()
    print(f"\n{args.n} responses in {wall_s:.0f} s: crashes {total['crashes']}, past the {cfg.hard_deadline_s} s "
          f"deadline (+{GRACE_S} s) {total['past_deadline']}, worker replacements {replacements}, "
          f"p99 {total['p99_ms']:.0f} ms, max {total['max_ms']:.0f} ms")
    print(f"load average (1/5/15 min) at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    crashes = [o for o in outcomes if o["crash"]][:5]
    for outcome in crashes:
        print(f"crash: {outcome}")
    write_results(args.out, "fuzz_reward" + ("_quick" if args.quick else ""), vars(args), rows,
                  reasons=dict(reasons), replacements=replacements, wall_s=wall_s, hard_deadline_s=cfg.hard_deadline_s,
                  grace_s=GRACE_S, options=options, load_average=load, crash_examples=crashes)
    if total["crashes"] or total["past_deadline"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
