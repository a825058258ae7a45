"""The soft deadline cannot be lost: a raise that lands where Python swallows exceptions is repeated.

Deterministic: in a process of its own (one thread, automatic GC off), SIGALRM is blocked while the deadline runs
out, so the first expiry waits, pending, until a GC callback unblocks it; it is then delivered inside that
callback, whose exceptions the interpreter swallows. (In the test process another thread could take the signal.)
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from erc_verl.reward import judge
from erc_verl.reward.judge import _Deadline, _SoftDeadline
from tests import REPO_ROOT


def spin_until_interrupted(limit_s: float = 60.0) -> str:
    """Python code that only a deadline ends; returns after `limit_s` so that a broken deadline fails a test
    instead of hanging it."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        pass
    return "not interrupted"


_SWALLOWED_IN_GC_CALLBACK = """
import gc, json, signal, sys, threading, time
from erc_verl.reward.judge import _Deadline, _SoftDeadline

swallowed = []
sys.unraisablehook = lambda unraisable: swallowed.append(unraisable.exc_type.__name__)

def deliver_pending_alarm(phase, info):
    gc.callbacks.remove(deliver_pending_alarm)  # once
    while signal.SIGALRM not in signal.sigpending():
        time.sleep(0.001)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})  # runs the Python handler, here

assert threading.active_count() == 1  # no other thread to take the signal
gc.disable()
gc.collect()  # nothing left for the collection below to finalize
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
gc.callbacks.append(deliver_pending_alarm)
ended_at_expiry = outcome = None
try:
    with _SoftDeadline(0.2) as deadline:
        try:
            gc.collect()  # the first expiry lands in the GC callback and is swallowed
            end = time.monotonic() + 60
            while time.monotonic() < end:  # Python code that only the deadline ends
                pass
            outcome = "not interrupted"
        except _Deadline:
            ended_at_expiry = deadline.expiries
            raise
except _Deadline:
    outcome = "deadline"
print(json.dumps({"swallowed": swallowed, "ended_at_expiry": ended_at_expiry, "outcome": outcome}))
"""


def test_a_swallowed_deadline_fires_again():
    result = subprocess.run([sys.executable, "-c", _SWALLOWED_IN_GC_CALLBACK], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["swallowed"] == ["_Deadline"]  # the first expiry's raise, lost in the GC callback
    assert report["outcome"] == "deadline" and report["ended_at_expiry"] == 2  # the next firing ended the block


def test_the_timer_stops_when_the_block_ends():
    handler_before = signal.getsignal(signal.SIGALRM)
    with _SoftDeadline(30.0):
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is handler_before
    with pytest.raises(_Deadline):
        with _SoftDeadline(0.05):
            spin_until_interrupted()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is handler_before


def test_the_timer_repeats_until_the_block_exits(monkeypatch):
    monkeypatch.setattr(judge, "SOFT_DEADLINE_REPEAT_S", 10.0)
    with _SoftDeadline(30.0):
        assert signal.getitimer(signal.ITIMER_REAL)[1] == pytest.approx(10.0)
    with _SoftDeadline(5.0):
        assert signal.getitimer(signal.ITIMER_REAL)[1] == pytest.approx(5.0)  # never later than the deadline
