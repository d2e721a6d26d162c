"""Waiting for replicas (Redis WAIT), the same on every server whatever carries the commands."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvckpt.errors import ReplicationError

#: Sends commands on one connection to one server and returns their replies.
Run = Callable[[list[tuple[Any, ...]]], list[Any]]
#: WAIT on one server (``run``), writing the fence key given first: the replicas that acknowledged.
WaitOne = Callable[[Run, "str | None"], int]


def wait_on(
    run: Run,
    replicas: int,
    timeout: float,
    fence_key: str | None = None,
    socket_timeout: float | None = None,
) -> int:
    """Redis ``WAIT`` on one server: how many replicas acknowledged every write made before the call.

    ``run`` sends commands on one connection and returns their replies. WAIT waits for the replication
    offset of the *connection* it runs on, as of that connection's last write (Redis 7.2+ moves it
    only on commands that propagate; older servers on any command). A pooled connection may not have
    carried our writes, so a small write to ``fence_key`` (removed right after, and expiring in a
    minute anyway) goes first on the same connection: its offset then covers every write any
    connection made before. Without a fence key a PING does that on servers before 7.2. Long
    timeouts are cut into slices shorter than the socket timeout so the reply never times out.
    """
    deadline = time.monotonic() + timeout
    step = socket_timeout * 0.8 if socket_timeout else timeout
    while True:
        remaining = deadline - time.monotonic()
        first: tuple[Any, ...] = ("PING",) if fence_key is None else ("SET", fence_key, b"wait", "PX", 60_000)
        commands = [first, ("WAIT", replicas, max(1, int(min(remaining, step) * 1000)))]
        if fence_key is not None:
            commands.append(("UNLINK", fence_key))
        acked = int(run(commands)[1])
        if acked >= replicas or time.monotonic() >= deadline:
            return acked


def check_wait_args(replicas: int, timeout: float) -> None:
    if replicas < 0 or not timeout > 0:
        raise ValueError(f"wait_for_replicas needs replicas >= 0 and timeout > 0, got {replicas}, {timeout}")


def replication_message(where: str, acked: int, wanted: int, timeout: float) -> str:
    return (
        f"{where}: only {acked} of {wanted} replica(s) acknowledged the writes within {timeout:g}s; a "
        "failover now could lose them. Check the replicas are up and linked (INFO replication) and "
        "that the replica output buffer limit is not cutting them off, or require fewer replicas"
    )


def fewest_acks(where: str, acks: dict[str | None, int], wanted: int, timeout: float) -> int:
    """The fewest acknowledgements of the primaries in ``acks`` (node name → replicas that acked; the
    name None for a store of one server); raises ReplicationError naming every primary short of
    ``wanted``."""
    short = {name: n for name, n in acks.items() if n < wanted}
    if not short:
        return min(acks.values(), default=wanted)
    name, acked = min(short.items(), key=lambda item: item[1])
    if name is None:
        raise ReplicationError(replication_message(where, acked, wanted, timeout), acked=acked, wanted=wanted)
    nodes = sorted(n for n in short if n is not None)
    raise ReplicationError(
        replication_message(f"{where} primary {name}", acked, wanted, timeout),
        acked=acked,
        wanted=wanted,
        nodes=nodes,
    )
