"""index/fair_lock.py: the catalog's lock serves its callers in the order they asked."""

from __future__ import annotations

import threading
import time

import pytest

from index.fair_lock import FairLock


def _wait_for_tickets(lock: FairLock, n: int) -> None:
    """Until `n` tickets were taken (callers holding or waiting)."""
    deadline = time.monotonic() + 30
    while lock._next < n:
        assert time.monotonic() < deadline, f"only {lock._next} of {n} callers reached the lock"
        time.sleep(0.001)


def test_a_waiter_is_served_before_a_caller_that_asks_again_at_once():
    """A thread that releases and asks again in a loop (a stream of searches) does not keep the
    lock from one that queued meanwhile (an edit): the loop's next turn comes after it."""
    lock, order, stop = FairLock(), [], threading.Event()

    def loop():  # the searches
        while not stop.is_set():
            with lock:
                order.append("loop")

    def once():  # the edit
        with lock:
            order.append("once")

    lock.acquire()  # ticket 0: both below queue behind it
    looper = threading.Thread(target=loop, daemon=True)
    looper.start()
    _wait_for_tickets(lock, 2)  # the loop waits with ticket 1
    editor = threading.Thread(target=once, daemon=True)
    editor.start()
    _wait_for_tickets(lock, 3)  # the edit waits with ticket 2
    lock.release()
    editor.join(30)
    stop.set()
    looper.join(30)
    assert not editor.is_alive() and not looper.is_alive()
    assert order[:2] == ["loop", "once"], order[:5]


def test_a_caller_that_stops_waiting_does_not_hold_the_lock_for_ever():
    """An exception raised while a caller waits (a KeyboardInterrupt in the main thread) gives
    its turn up: the callers after it are still served."""
    lock = FairLock()
    lock.acquire()
    wait = lock._turn.wait

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    lock._turn.wait = interrupted
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()  # ticket 1, abandoned
    lock._turn.wait = wait
    got = threading.Event()

    def later():
        with lock:
            got.set()

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    _wait_for_tickets(lock, 3)
    assert not got.is_set()  # ticket 0 is still held
    lock.release()
    thread.join(30)
    assert got.is_set()
    assert not lock.locked()


def test_it_is_a_lock():
    lock = FairLock()
    assert not lock.locked()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="unlocked"):
        lock.release()
