"""One retry policy for every Redis operation: how often, how long apart, and for how long in all.

A dropped link is worth retrying at once; a server that accepts connections but never answers is not
worth waiting on ``retries + 1`` times. So the policy bounds both: ``retries`` re-sends, ``backoff``
doubling up to ``backoff_cap`` between them, and ``total_timeout``: no attempt starts that could not
finish (one ``timeout``) within it. A hung server therefore fails within ``max(timeout,
total_timeout)``; each retry is logged (INFO, logger ``kvckpt.stores.redis``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.exceptions as rex

from kvckpt.errors import InvalidStoreOptionError

logger = logging.getLogger("kvckpt.stores.redis")

T = TypeVar("T")

#: Failures after which an idempotent operation is sent again on a fresh connection.
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

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        return float(min(self.backoff_cap, self.backoff * 2**attempt))

    def run(
        self,
        attempt: Callable[[], T],
        *,
        where: str,
        what: str,
        retry_on: tuple[type[BaseException], ...] = RETRYABLE,
        give_up_on: tuple[type[BaseException], ...] = (rex.AuthenticationError,),
    ) -> T:
        """``attempt()`` until it returns, retrying ``retry_on`` failures within the policy's bounds."""
        started = time.monotonic()
        for number in range(self.retries + 1):
            try:
                return attempt()
            except give_up_on:
                raise
            except retry_on as exc:
                self.pause(number, started, exc, where=where, what=what)
        raise AssertionError("unreachable")

    def pause(self, number: int, started: float, failure: BaseException, *, where: str, what: str) -> None:
        """After failed attempt ``number`` (from 0) of something begun at ``started`` (monotonic):
        log and sleep before the next one, or raise GaveUp from ``failure`` when none may follow."""
        wait = self.delay(number)
        elapsed = time.monotonic() - started
        if number >= self.retries or elapsed + wait + self.timeout > self.total_timeout:
            raise GaveUp(number + 1, elapsed) from failure
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
        return f"{self.attempts} attempt(s) in {self.seconds:.1f}s{at}"
