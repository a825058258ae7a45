"""A reward worker process that dies mid-batch is replaced, and every response of the batch still gets scored."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from erc_verl.reward import math_verify_score as reward
from erc_verl.reward.judge import MathRewardConfig

# tuples cost math-verify's LaTeX parser tens of milliseconds each: the batch is in flight long enough to hit
RESPONSES = [(f"</think> so the pair is $\\boxed{{({i}, -{i + 3})}}$.", f"({i}, -{i + 3})") for i in range(24)]
KWARGS = {"num_processes": 2}


def test_killed_worker_is_replaced_and_its_response_rescored():
    cfg = MathRewardConfig.from_kwargs(dict(KWARGS))
    pool = reward.get_pool(cfg)
    assert reward.compute_score("math", *RESPONSES[0], **KWARGS)["acc"]  # workers up and warm
    restarts = pool.restarts

    # verl's naive manager scores a batch from executor threads, as here
    with ThreadPoolExecutor(max_workers=8) as executor:
        futures = [executor.submit(reward.compute_score, "math", text, gt, **KWARGS) for text, gt in RESPONSES]
        deadline = time.time() + 60
        while not pool.busy_pids():
            assert time.time() < deadline, "no worker ever took a task"
            time.sleep(0.001)
        os.kill(pool.busy_pids()[0], signal.SIGKILL)  # the fault: a worker dies under a response
        results = [f.result(timeout=120) for f in futures]

    assert pool.restarts > restarts
    assert [r["reason"] for r in results] == [""] * len(RESPONSES)
    assert all(r["acc"] and r["score"] == 1.0 for r in results)
