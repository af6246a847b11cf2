"""A lock that is handed over in the order it was asked for.

`threading.Lock` makes no promise of order: a thread that releases it and asks again at once
(a loop of searches) usually gets it back before a thread woken from waiting runs, so an item
edit waiting behind a stream of searches could wait for as long as the stream lasted (bench/
bench_large_catalog.py `edits` measured edits of 13-41 s on a 200k-item catalog searched in a
loop, where an edit alone takes 0.1 s). `FairLock` serves its callers first come, first served:
a search asking again after an edit queued behind it waits for the edit.

Blocking acquires only (`with lock:`, `acquire()`), not reentrant: what service/catalog.py needs.
"""

from __future__ import annotations

import threading


class FairLock:
    """A first-come, first-served (ticket) lock."""

    __slots__ = ("_turn", "_next", "_serving", "_abandoned")

    def __init__(self) -> None:
        self._turn = threading.Condition(threading.Lock())
        self._next = 0  # the ticket the next caller takes
        self._serving = 0  # the ticket that holds the lock (or may take it)
        # tickets whose caller stopped waiting (an exception, e.g. KeyboardInterrupt, raised
        # in the wait): skipped when their turn comes, or the lock would never be free again
        self._abandoned: set[int] = set()

    def acquire(self) -> bool:
        with self._turn:
            ticket = self._next
            self._next += 1
            try:
                while ticket != self._serving:
                    self._turn.wait()
            except BaseException:
                if ticket == self._serving:  # its turn came as it stopped: pass it on
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise
        return True

    def release(self) -> None:
        with self._turn:
            if self._serving == self._next:
                raise RuntimeError("release of an unlocked FairLock")
            self._advance()

    def _advance(self) -> None:
        """The next ticket's turn (under `_turn`), past any abandoned ones."""
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._turn.notify_all()

    def locked(self) -> bool:
        with self._turn:
            return self._serving != self._next

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
