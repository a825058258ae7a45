"""Verifiable-math reward of the paper's official setup, as a verl custom reward function.

verl config (see the README):
    reward.custom_reward_function.path=pkg://erc_verl.reward.math_verify_score
    reward.custom_reward_function.name=compute_score        # or compute_score_async
    +reward.custom_reward_function.reward_kwargs.<field>=... # any MathRewardConfig field

The verdict is `erc_verl.reward.judge`'s; here each response is judged in a pool of worker processes with a hard
per-item deadline (`erc_verl.reward.pool`): a worker that hangs or dies is replaced while the rest of the batch is
scored, and every call returns {"score", "acc", "pred", "reason"}.
"""

import asyncio
import atexit
import logging
import os
import threading
from concurrent.futures import Future

from erc_verl.reward.judge import MathRewardConfig, failure, judge_safely, prepare
from erc_verl.reward.pool import DeadlinePool, TaskTimeout, WorkerDied

logger = logging.getLogger(__name__)

# Each worker judges these once before taking work: sympy and math-verify pay 50-300 ms on the first fraction,
# radical, interval... they see, which would otherwise land on real items.
_WARMUP_ANSWERS = (("7", "7"), ("\\frac{1}{2}", "0.5"), ("2\\sqrt{3}", "\\sqrt{12}"), ("(1, 2)", "(2, 1)"),
                   ("[0, 1)", "(0, 1]"), ("x^2+1", "(x+1)^2"), ("\\text{(B)}", "B"), ("30^\\circ", "30"))
_pools: dict[tuple, DeadlinePool] = {}
_pools_lock = threading.Lock()


def get_pool(cfg: MathRewardConfig) -> DeadlinePool:
    """This process's pool for `cfg`'s process count and memory limit (a forked child builds its own)."""
    key = (os.getpid(), cfg.num_processes, cfg.memory_limit_mb)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None or not pool.alive:
            warmup = [(f"The answer is $\\boxed{{{answer}}}$.", (gold,), cfg) for answer, gold in _WARMUP_ANSWERS]
            pool = DeadlinePool(judge_safely, cfg.num_processes, cfg.memory_limit_mb, warmup)
            _pools[key] = pool
        return pool


@atexit.register
def _close_pools() -> None:
    """Stop the workers with the process (they would also notice the closed pipe, unless busy computing)."""
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


def _submit(solution_str, ground_truth, kwargs: dict) -> dict | tuple[Future, MathRewardConfig]:
    cfg = MathRewardConfig.from_kwargs(kwargs)  # a bad option is the user's error: that one raises
    try:
        ready = prepare(solution_str, ground_truth, cfg)
        if isinstance(ready, dict):
            return ready
        return get_pool(cfg).submit((*ready, cfg), cfg.hard_deadline_s), cfg
    except Exception:  # noqa: BLE001 - e.g. the pool closing at interpreter exit
        logger.warning("math reward: could not score a response", exc_info=True)
        return failure(cfg, "error")


def _outcome(future: Future, cfg: MathRewardConfig) -> dict:
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, TaskTimeout):
        return failure(cfg, "timeout")
    if isinstance(error, WorkerDied):
        return failure(cfg, "worker_crash")
    logger.warning("math reward: %s", error)
    return failure(cfg, "error")


# A worker that died under an item (killed from outside, out of memory) is replaced; the item gets one more try
# there before it counts as `worker_crash`, so one lost process does not cost a correct answer its reward.
CRASH_RETRIES = 1


def _scored(solution_str, ground_truth, kwargs: dict):
    """One response's scoring as a generator: it yields each future to wait for, and returns the result."""
    for _ in range(1 + CRASH_RETRIES):
        submitted = _submit(solution_str, ground_truth, kwargs)
        if isinstance(submitted, dict):
            return submitted
        future, cfg = submitted
        yield future
        if not isinstance(future.exception(), WorkerDied):
            break
    return _outcome(future, cfg)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """verl custom reward function (sync: verl runs it in an executor thread). `kwargs` are MathRewardConfig
    fields (from `reward_kwargs`); `data_source` and `extra_info` are not needed to score math."""
    scoring = _scored(solution_str, ground_truth, kwargs)
    try:
        while True:
            next(scoring).exception()  # waits; the pool's deadline bounds it
    except StopIteration as done:
        return done.value


async def compute_score_async(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """`compute_score` for verl's reward loop, which awaits coroutine reward functions on its event loop:
    the whole batch is in flight at once without holding an executor thread per item."""
    scoring = _scored(solution_str, ground_truth, kwargs)
    try:
        while True:
            await asyncio.wait([asyncio.wrap_future(next(scoring))])  # without raising: _outcome maps the errors
    except StopIteration as done:
        return done.value
