"""One retry policy for every Redis operation: how often, how long apart, and for how long in all.

A dropped link is worth retrying at once; a server that accepts connections but never answers is not
worth waiting on ``retries + 1`` times. So the policy bounds both: ``retries`` re-sends, ``backoff``
doubling up to ``backoff_cap`` between them (with jitter, below), and ``total_timeout``: the time the
store may go without progress, shared by every operation of one save, load, listing or gc
(kvckpt.deadline). No retry starts that could not finish (one ``timeout``) before that deadline, no
attempt waits past it, and an operation that cannot start before it fails at once. A hung server
therefore fails a whole save, cleanup included, within ``total_timeout``; each retry is logged (INFO,
logger ``kvckpt.stores.redis``).

Each wait is "equal jitter", redis-py's default backoff (``EqualJitterBackoff``): half the exponential
delay fixed, the other half drawn uniformly. Ranks of a job that lost the same server at the same
moment would otherwise reconnect in lockstep, every retry a thundering herd; the fixed half keeps a
retry from coming at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.exceptions as rex

from kvckpt.deadline import Deadline, Passed, current
from kvckpt.errors import InvalidStoreOptionError, StoreProtocolError

logger = logging.getLogger("kvckpt.stores.redis")

T = TypeVar("T")

#: Failures after which an idempotent operation is sent again on a fresh connection (but a reply that
#: is not RESP, StoreProtocolError: the same server would answer the same way).
RETRYABLE: tuple[type[BaseException], ...] = (OSError, rex.ConnectionError, rex.TimeoutError)


@dataclass(frozen=True)
class RetryPolicy:
    """``timeout`` bounds each reply (seconds), ``connect_timeout`` each connect; see the module doc."""

    retries: int = 2
    backoff: float = 0.05
    backoff_cap: float = 1.0
    timeout: float = 30.0
    connect_timeout: float = 3.0
    total_timeout: float = 60.0

    def __post_init__(self) -> None:
        """Refuse a wrong type or range now, named as the store option it came from, rather than as
        a TypeError deep in a save."""
        for name in ("timeout", "connect_timeout", "total_timeout", "backoff", "backoff_cap", "retries"):
            value = getattr(self, name)
            whole = name == "retries"
            kind = int if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
                what = "a whole number >= 0" if whole else "a number of seconds"
                raise InvalidStoreOptionError(
                    f"store option {name}={value!r}: expected {what}", options=[name]
                )
            if name in ("timeout", "connect_timeout", "total_timeout") and not value > 0:
                raise InvalidStoreOptionError(
                    f"store option {name}={value!r}: expected more than 0 seconds", options=[name]
                )

    def delay(self, attempt: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``attempt + 1``: between half and all of ``backoff``
        doubled ``attempt`` times (capped at ``backoff_cap``), where ``draw()`` (from [0, 1)) puts it."""
        ceiling = float(min(self.backoff_cap, self.backoff * 2**attempt))
        return ceiling / 2 + ceiling / 2 * draw()

    def run(
        self,
        attempt: Callable[[], T],
        *,
        where: str,
        what: str,
        retry_on: tuple[type[BaseException], ...] = RETRYABLE,
        give_up_on: tuple[type[BaseException], ...] = (rex.AuthenticationError, StoreProtocolError),
        deadline: Deadline | None = None,
    ) -> T:
        """``attempt()`` until it returns, retrying ``retry_on`` failures within the policy's bounds
        and ``deadline`` (the shared one by default); a success is progress."""
        deadline = deadline or current()
        for number in range(self.retries + 1):
            try:
                result = attempt()
            except give_up_on:
                raise
            except retry_on as exc:
                self.pause(number, deadline, exc, where=where, what=what)
            else:
                deadline.progress()
                return result
        raise AssertionError("unreachable")

    def left(self, deadline: Deadline) -> float:
        """How long the next attempt may wait for a reply: ``timeout``, cut to what the deadline
        leaves; raises GaveUp at once when it left nothing."""
        remaining = deadline.remaining(self.total_timeout)
        if remaining <= 0:
            raise GaveUp(0, deadline.idle()) from Passed(self.total_timeout)
        return min(self.timeout, remaining)

    def pause(
        self, number: int, deadline: Deadline, failure: BaseException, *, where: str, what: str
    ) -> None:
        """After failed attempt ``number`` (from 0): log and sleep before the next one, or raise
        GaveUp from ``failure`` when none may follow (no retry left, or none could finish before
        ``deadline``)."""
        wait = self.delay(number)
        if number >= self.retries or deadline.remaining(self.total_timeout) < wait + self.timeout:
            raise GaveUp(number + 1, deadline.idle()) from failure
        kind = type(failure).__name__
        logger.info(
            "%s: %s failed (%s); retry %d of %d in %.2fs", where, what, kind, number + 1, self.retries, wait
        )
        time.sleep(wait)


class GaveUp(Exception):
    """The policy stopped retrying; ``__cause__`` is the last failure, ``node`` where it happened
    when the store talks to several servers (a Cluster names the node to look at)."""

    def __init__(self, attempts: int, seconds: float, node: str | None = None) -> None:
        super().__init__(attempts, seconds, node)
        self.attempts = attempts
        self.seconds = seconds
        self.node = node

    def __str__(self) -> str:
        at = f", the last at node {self.node}" if self.node else ""
        if not self.attempts:
            return f"no attempt: {self.__cause__}{at}"
        return f"{self.attempts} attempt(s) in {self.seconds:.1f}s{at}"
