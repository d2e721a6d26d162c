"""One deadline for a whole save, load, listing or gc: how long kvckpt waits on a store that stopped
making progress.

A server that accepts connections but never answers must fail a save within the store's
``total_timeout`` (etcd: ``timeout``), not within that once per operation: a save makes many store
operations, and its cleanup after a failure (removing its data, its liveness marker, ``.unfinished``)
makes more, each of which would wait again. So every store operation inside one :func:`scope` shares
one :class:`Deadline`, held in a ContextVar; kvckpt.transfer's I/O threads run in a copy of the
caller's context, so they share it too. A big save legitimately does more than ``total_timeout`` of
I/O, so the deadline bounds the time *without progress*: every successful operation pushes it out by
the budget again. An operation that cannot start before it fails at once, and no attempt waits past
it. Once an operation found it passed it stays passed, so a failed save's cleanup does not wait
again: what is left goes to kvckpt.gc and expiry, and the save's error says so.

The deadline only remembers the last progress; the budget is each store's own, so one scope can
span two stores. Outside any scope every operation gets a deadline of its own.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Deadline:
    """When the store last made progress for one save, load, listing or gc; safe across threads
    (plain assignments under the GIL: a lost race only moves the deadline by one operation)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._passed = False

    @property
    def passed(self) -> bool:
        """Whether an operation found no time left; progress no longer revives it."""
        return self._passed

    def progress(self) -> None:
        """A store operation succeeded, or the caller began a new step of its work (time spent
        outside the store, e.g. DCP planning between a writer's calls, is no store's fault)."""
        if not self._passed:
            self._last = time.monotonic()

    def remaining(self, budget: float) -> float:
        """Seconds left for a store allowed ``budget`` seconds without progress; none left marks
        the deadline passed."""
        left = self._last + budget - time.monotonic()
        if left <= 0:
            self._passed = True
        return left

    def idle(self) -> float:
        """Seconds since the last progress (what an error reports as the time waited)."""
        return time.monotonic() - self._last

    def __reduce__(self) -> tuple[Any, ...]:
        """A writer pickled into another process (async_save) starts there with a fresh one: the
        monotonic clock means nothing across processes."""
        return (Deadline, ())


class Passed(TimeoutError):
    """No store operation may start: the shared deadline passed (the store made no progress for its
    whole budget)."""

    def __init__(self, budget: float, option: str = "total_timeout") -> None:
        super().__init__(
            f"the store made no progress for {option}={budget:g}s, the deadline every operation of this "
            "save, load, listing or gc shares"
        )


_current: ContextVar[Deadline | None] = ContextVar("kvckpt_deadline", default=None)


def current() -> Deadline:
    """The deadline of the enclosing scope, or a new one for a single operation."""
    return _current.get() or Deadline()


@contextmanager
def using(deadline: Deadline) -> Iterator[Deadline]:
    """Make ``deadline`` the one every store operation inside shares (a writer keeps its save's
    across DCP's separate calls). Not for generators: they would leak it to their caller."""
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


@contextmanager
def scope() -> Iterator[Deadline]:
    """The enclosing scope's deadline, or a new one shared by every store operation inside."""
    found = _current.get()
    if found is not None:
        yield found
        return
    with using(Deadline()) as fresh:
        yield fresh


def shared(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` runs in a :func:`scope`: one deadline for every store operation it makes."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with scope():
            return fn(*args, **kwargs)

    return run
