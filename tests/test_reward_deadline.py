"""The soft deadline cannot be lost: a raise that lands where Python swallows exceptions is repeated.

Deterministic: SIGALRM is blocked while the deadline runs out, so the first expiry waits, pending, until a GC
callback unblocks it; it is then delivered inside that callback, whose exceptions the interpreter swallows.
"""

import gc
import signal
import sys
import time

import pytest

from erc_verl.reward import judge
from erc_verl.reward.judge import _Deadline, _SoftDeadline


def spin_until_interrupted(limit_s: float = 60.0) -> str:
    """Python code that only a deadline ends; returns after `limit_s` so that a broken deadline fails a test
    instead of hanging it."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        pass
    return "not interrupted"


@pytest.fixture
def alarm_delivered_in_gc_callback(monkeypatch):
    """Block SIGALRM; the next garbage collection waits for it to be pending, then unblocks it inside a GC
    callback. Yields the exception types the interpreter reported as swallowed ('Exception ignored in ...')."""
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_type))
    delivered = []

    def deliver_pending_alarm(phase, info):
        if delivered:
            return
        delivered.append(phase)
        while signal.SIGALRM not in signal.sigpending():
            time.sleep(0.001)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})  # runs the Python handler, here

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    gc.callbacks.append(deliver_pending_alarm)
    try:
        yield swallowed
    finally:
        gc.callbacks.remove(deliver_pending_alarm)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    assert delivered, "the GC callback never ran"


def test_a_swallowed_deadline_fires_again(alarm_delivered_in_gc_callback):
    swallowed = alarm_delivered_in_gc_callback
    ended_at_expiry = None
    with pytest.raises(_Deadline):
        with _SoftDeadline(0.2) as deadline:
            gc.collect()  # the first expiry lands in the GC callback and is swallowed
            assert swallowed == [_Deadline] and deadline.expiries == 1
            try:
                spin_until_interrupted()
            except _Deadline:
                ended_at_expiry = deadline.expiries
                raise
    assert ended_at_expiry == 2  # the next interval's firing ended the block


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
