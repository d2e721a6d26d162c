"""A few I/O threads with a bound on the work in flight.

Each thread's batch is one pipelined call on its own connection; sockets release the GIL, so two
connections roughly double loopback throughput on this class of machine. Each call runs in a copy of
the submitter's context, so its store operations share the submitter's deadline (kvckpt.deadline).
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Transfer:
    def __init__(self, threads: int, max_in_flight: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kvckpt-io")
        self._limit = max_in_flight or 2 * max(1, threads)
        self._pending: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a call; blocks while ``max_in_flight`` calls are unfinished. Re-raises their errors."""
        while len(self._pending) >= self._limit:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(contextvars.copy_context().run, fn, *args))

    def drain(self) -> None:
        """Wait for everything queued; the first error is raised after all calls have settled."""
        error: BaseException | None = None
        while self._pending:
            future = self._pending.popleft()
            try:
                future.result()
            except BaseException as exc:  # keep waiting so no thread outlives the caller's buffers
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:  # the caller's own error wins; still wait so no thread touches freed buffers
                for future in self._pending:
                    future.cancel()  # one not yet started never will: nothing waits on it
                for future in self._pending:
                    if not future.cancelled():
                        future.exception()
                self._pending.clear()
        finally:
            self._pool.shutdown(wait=True)
