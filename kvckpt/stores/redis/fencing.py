"""A commit sent exactly once, on any connection, and fenced when its reply is lost.

A re-sent conditional commit could reinstate a record whose data another writer already retired, so
it is never re-sent. After a lost reply the connection is dropped and killed server-side
(``CLIENT KILL ID``), so the commit either has run or never will, and the caller learns which by
reading the record (docs/protocol.md, docs/reliability.md). Without the CLIENT permission it is sent
once, unfenced (the liveness marker is the fence the protocol relies on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions as rex

T = TypeVar("T")

#: Failures after which the command may or may not have reached the server.
LOST = (OSError, rex.ConnectionError, rex.TimeoutError)


def send_once(
    connection_id: Callable[[], int | None],
    send: Callable[[], T],
    drop: Callable[[], object],
    kill: Callable[[int], object],
) -> T:
    """``send()`` once on a connection whose server id ``connection_id()`` reads first (None where
    CLIENT is not allowed; a failure there is before anything was sent). When the reply is lost,
    ``drop()`` closes the connection and ``kill(id)`` ends it on the server through another one."""
    conn_id = connection_id()
    try:
        return send()
    except LOST:
        drop()
        if conn_id is not None:
            with contextlib.suppress(Exception):  # the marker still fences; this is a second fence
                kill(conn_id)
        raise
