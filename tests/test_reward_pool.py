"""The hard-deadline process pool: timeouts, crashes and errors fail one task and never the rest."""

import asyncio
import os
import threading
import time
from concurrent.futures import wait

import pytest

from erc_verl.reward.pool import DeadlinePool, TaskTimeout, WorkerDied


def work(payload):
    """What the test workers run (module level: workers import it by name)."""
    kind, value = payload
    if kind == "echo":
        return value
    if kind == "sleep":
        time.sleep(value)
        return value
    if kind == "crash":
        os._exit(value)
    if kind == "raise":
        raise ValueError(value)
    if kind == "alloc":
        return len(bytearray(value * 2**20))
    if kind == "pid":
        return os.getpid()
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def pool():
    pool = DeadlinePool(work, num_processes=2, memory_limit_mb=512)
    yield pool
    pool.close()
    assert not pool.alive


def test_results_come_back_in_order_of_submission(pool):
    futures = [pool.submit(("echo", i), timeout_s=30) for i in range(50)]
    assert [f.result(timeout=60) for f in futures] == list(range(50))


def test_a_stuck_task_is_killed_and_the_batch_goes_on(pool):
    restarts = pool.restarts
    stuck = pool.submit(("sleep", 60), timeout_s=1.0)
    others = [pool.submit(("echo", i), timeout_s=30) for i in range(20)]
    assert [f.result(timeout=60) for f in others] == list(range(20))  # served by the other worker meanwhile
    with pytest.raises(TaskTimeout):
        stuck.result(timeout=30)
    assert pool.restarts == restarts + 1
    assert pool.submit(("echo", "after"), timeout_s=30).result(timeout=60) == "after"


def test_the_deadline_excludes_queueing():
    single = DeadlinePool(work, num_processes=1)
    try:
        futures = [single.submit(("sleep", 0.4), timeout_s=1.0) for _ in range(4)]  # 1.6 s of work in a row
        assert [f.result(timeout=60) for f in futures] == [0.4] * 4
    finally:
        single.close()


def test_a_crash_fails_its_task_only(pool):
    crashed = pool.submit(("crash", 7), timeout_s=30)
    with pytest.raises(WorkerDied, match="code 7"):
        crashed.result(timeout=60)
    assert pool.submit(("echo", 1), timeout_s=30).result(timeout=60) == 1


def test_errors_and_the_memory_limit_are_reported(pool):
    with pytest.raises(RuntimeError, match="ValueError"):
        pool.submit(("raise", "boom"), timeout_s=30).result(timeout=60)
    with pytest.raises(RuntimeError, match="MemoryError"):
        pool.submit(("alloc", 1024), timeout_s=30).result(timeout=60)  # over the 512 MiB limit
    assert pool.submit(("alloc", 16), timeout_s=30).result(timeout=60) == 16 * 2**20


def test_unpicklable_payload_fails_its_task_only(pool):
    with pytest.raises(RuntimeError, match="unpicklable"):
        pool.submit(("echo", threading.Lock()), timeout_s=30).result(timeout=60)
    assert pool.submit(("echo", 2), timeout_s=30).result(timeout=60) == 2


def test_callers_in_threads_and_asyncio(pool):
    futures = []
    threads = [threading.Thread(target=lambda i=i: futures.append(pool.submit(("echo", i), timeout_s=30)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done, _ = wait(futures, timeout=60)
    assert sorted(f.result() for f in done) == list(range(8))

    async def batch():
        return await asyncio.gather(*(asyncio.wrap_future(pool.submit(("pid", i), timeout_s=30)) for i in range(20)))

    pids = asyncio.run(batch())
    assert os.getpid() not in pids and 1 <= len(set(pids)) <= 2


def test_closed_pool_refuses_work():
    closing = DeadlinePool(work, num_processes=1)
    closing.close()
    with pytest.raises(RuntimeError, match="closed"):
        closing.submit(("echo", 1), timeout_s=1)
