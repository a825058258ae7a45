"""A process pool with a hard deadline per task: a task still running at its deadline has its process killed
and replaced, and the rest of the queue keeps flowing. Works from any thread (verl runs sync reward functions
in executor threads, where math-verify's signal-based timeouts cannot work) and from asyncio
(`asyncio.wrap_future` on the returned futures).

`concurrent.futures.ProcessPoolExecutor` cannot do this: it has no per-task timeout, and one killed worker
breaks the whole executor. Workers are plain `python -c <bootstrap>` subprocesses rather than
multiprocessing children: those re-import the caller's main module in every worker (a Ray actor's is Ray's
worker script, a verl driver's is verl's trainer), and forking a Ray actor full of threads is unsafe. A worker
starts in about a second (importing sympy) and is only replaced after a kill or a crash.
"""

import collections
import ctypes
import importlib
import logging
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # a worker not ready by then (machine swamped, broken environment) is replaced
MAX_START_FAILURES = 3  # consecutive workers dying before ready: fail the queue instead of waiting forever
_READY = "ready"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class TaskTimeout(Exception):
    """The task ran past its deadline; its worker process was killed."""


class WorkerDied(Exception):
    """The worker process running the task exited (crash, out-of-memory kill, signal)."""


def _serve(conn: Connection, fn: Callable[[Any], Any], warmup: list) -> None:
    """Worker loop: receive a payload, send back (ok, result or error name)."""
    for payload in warmup:
        try:
            fn(payload)
        except BaseException:  # noqa: BLE001 - warming up is best effort
            pass
    conn.send(_READY)
    while True:
        try:
            payload = conn.recv()
        except EOFError:
            return  # the parent closed the pipe (pool closed, or the parent is gone)
        try:
            reply = (True, fn(payload))
        except BaseException as error:  # noqa: BLE001 - any failure of one task is reported, never fatal
            reply = (False, type(error).__name__)
        try:
            conn.send(reply)
        except Exception as error:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send((False, f"unsendable result: {type(error).__name__}"))


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve `future` unless its caller cancelled it (asyncio.wrap_future cancels when its task is)."""
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Slot:
    """One worker process and the task it is running, if any."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.started_at = 0.0
        self.task: tuple[Future, Any, float | None] | None = None  # (future, payload, timeout_s)
        self.deadline = float("inf")


class DeadlinePool:
    """`submit(payload, timeout_s)` runs `fn(payload)` in one of `num_processes` worker processes.

    The future resolves to `fn`'s return value, or raises `TaskTimeout` (ran past `timeout_s`, counted from
    the moment a ready worker took it: queueing and worker start-up are not included), `WorkerDied`, or
    `RuntimeError` (the task raised, or workers cannot start). `fn` must be a module-level function. Each worker
    runs `fn` on the `warmup` payloads before taking tasks (libraries with lazy first-use costs).
    """

    def __init__(self, fn: Callable[[Any], Any], num_processes: int, memory_limit_mb: int | None = None,
                 warmup: list | None = None):
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        self._target = f"{fn.__module__}:{fn.__qualname__}"
        self._warmup = ForkingPickler.dumps(list(warmup or []))
        self._memory_limit_mb = memory_limit_mb
        self._slots = [_Slot() for _ in range(num_processes)]
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._start_failures = 0
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self.restarts = 0  # workers replaced after a timeout or a death: a health figure for logs and tests
        self._thread = threading.Thread(target=self._run, name="erc-verl-deadline-pool", daemon=True)
        self._thread.start()

    def submit(self, payload: Any, timeout_s: float | None) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("pool is closed")
            self._queue.append((future, payload, timeout_s))
        self._wake_w.send_bytes(b"")
        return future

    def close(self) -> None:
        """Fail queued tasks, stop the workers and the dispatcher thread."""
        with self._lock:
            self._closed = True
        self._wake_w.send_bytes(b"")
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def busy_pids(self) -> list[int]:
        """Pids of the workers running a task right now (health checks, fault injection in tests)."""
        with self._lock:
            return [slot.process.pid for slot in self._slots if slot.task is not None and slot.process is not None]

    # --- dispatcher thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        break
                self._fill_slots()
                self._dispatch()
                self._wait_and_collect()
        except BaseException:  # noqa: BLE001 - a dispatcher bug must fail the callers, not hang them
            logger.exception("deadline pool dispatcher failed")
        finally:
            self._shutdown()

    def _fill_slots(self) -> None:
        if self._start_failures >= MAX_START_FAILURES:
            self._fail_queue(RuntimeError(f"{self._start_failures} worker processes in a row died on start-up"))
            time.sleep(1.0)  # then try again: the cause (memory pressure, a broken import) may be gone
            self._start_failures = 0
        for slot in self._slots:
            if slot.process is None:
                self._start(slot)

    def _start(self, slot: _Slot) -> None:
        parent_conn, child_conn = multiprocessing.Pipe()  # a socket pair: one fd per side
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # import what we import
        argv = [sys.executable, "-c", _BOOTSTRAP, self._target, str(child_conn.fileno()),
                str(self._memory_limit_mb or 0)]
        try:
            slot.process = subprocess.Popen(argv, pass_fds=(child_conn.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError:
            logger.exception("could not start a worker process")
            self._start_failures += 1
            parent_conn.close()
            return
        finally:
            child_conn.close()
        slot.conn, slot.ready, slot.started_at = parent_conn, False, time.monotonic()
        try:
            parent_conn.send_bytes(self._warmup)  # small: the socket buffers it until the worker reads it
        except OSError:  # died at once; the next wait sees the closed socket and counts a start-up failure
            pass

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not slot.ready or slot.task is not None:
                continue
            with self._lock:
                if not self._queue:
                    return
                item = self._queue.popleft()
            future, payload, timeout_s = item
            if future.cancelled():
                continue
            try:
                data = ForkingPickler.dumps(payload)
            except Exception as error:  # noqa: BLE001 - an unpicklable payload fails its task only
                _settle(future, error=RuntimeError(f"unpicklable payload: {type(error).__name__}"))
                continue
            try:
                slot.conn.send_bytes(data)
            except OSError:  # the worker died while idle: replace it and requeue the task
                self._retire(slot)
                with self._lock:
                    self._queue.appendleft(item)
                continue
            future.set_running_or_notify_cancel()  # False if cancelled just now: the reply is then dropped
            slot.task = item
            slot.deadline = time.monotonic() + timeout_s if timeout_s is not None else float("inf")

    def _wait_and_collect(self) -> None:
        started = [slot for slot in self._slots if slot.process is not None]
        deadlines = [slot.deadline for slot in started if slot.task is not None]
        deadlines += [slot.started_at + STARTUP_TIMEOUT_S for slot in started if not slot.ready]
        soonest = min(deadlines, default=float("inf"))
        wait_s = None if soonest == float("inf") else max(0.0, soonest - time.monotonic())
        # A worker's socket turns readable on a reply and on its death (EOF): one waitable per worker.
        ready = set(wait([self._wake_r] + [slot.conn for slot in started], wait_s))
        if self._wake_r in ready:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        now = time.monotonic()
        for slot in started:
            if slot.conn in ready:
                self._receive(slot)
            elif slot.task is not None and now >= slot.deadline:
                future, _, timeout_s = slot.task
                self._retire(slot)
                _settle(future, error=TaskTimeout(f"task ran past its {timeout_s} s deadline"))
            elif not slot.ready and now >= slot.started_at + STARTUP_TIMEOUT_S:
                logger.warning("worker process not ready after %s s: replacing it", STARTUP_TIMEOUT_S)
                self._start_failures += 1
                self._retire(slot)

    def _receive(self, slot: _Slot) -> None:
        try:
            message = slot.conn.recv()
        except (EOFError, OSError):  # the worker died
            task, was_ready = slot.task, slot.ready
            code = self._retire(slot)
            if task is not None:
                _settle(task[0], error=WorkerDied(f"worker exited with code {code}"))
            elif not was_ready:
                self._start_failures += 1
                logger.warning("worker process died on start-up with code %s", code)
            return
        if not slot.ready:  # the start-up handshake
            slot.ready = message == _READY
            self._start_failures = 0
            return
        future = slot.task[0]
        slot.task, slot.deadline = None, float("inf")
        ok, value = message
        _settle(future, result=value) if ok else _settle(future, error=RuntimeError(value))

    def _retire(self, slot: _Slot) -> int | None:
        """Kill the slot's process if it still runs, free the slot (the next loop starts a replacement) and
        return the process's exit code (negative: the signal that ended it)."""
        try:
            code = slot.process.wait(timeout=0.05)  # one that just died gets its real exit code, not our kill
        except subprocess.TimeoutExpired:
            slot.process.kill()
            code = slot.process.wait()
        slot.conn.close()
        slot.process, slot.conn, slot.ready, slot.task, slot.deadline = None, None, False, None, float("inf")
        self.restarts += 1
        return code

    def _fail_queue(self, error: Exception) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for future, _, _ in queued:
            _settle(future, error=error)

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
        self._fail_queue(RuntimeError("pool is closed"))
        for slot in self._slots:
            if slot.task is not None:
                _settle(slot.task[0], error=RuntimeError("pool is closed"))
            if slot.process is not None:
                self._retire(slot)


# The worker's whole program: PYTHONPATH (the parent's sys.path) makes the parent's erc_verl importable.
_BOOTSTRAP = (
    "import sys; from erc_verl.reward.pool import _worker_main; "
    "_worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
)


def _worker_main(target: str, fd: int, memory_limit_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it stops us by closing the pipe
    try:  # Linux: die with the thread that started us, even in the middle of a computation (no EOF read then)
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if memory_limit_mb:
        # A runaway big-integer computation then fails with MemoryError instead of swapping the machine.
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_mb * 2**20,) * 2)
    module, _, name = target.partition(":")
    conn = Connection(fd)
    try:
        _serve(conn, getattr(importlib.import_module(module), name), conn.recv())
    except OSError:
        pass  # the pool closed our pipe (it was closed, or gave up on us): nothing left to do
