"""FaultProxies in front of a cluster's nodes share one set of faults (tests/harness/proxy.py).

The Cluster variants of the fault scenarios rely on it: a rule fires as often as its ``times`` says
whichever node sees the bytes, a byte budget counts the bytes sent to every node, and a server that
goes down takes every node's links with it.
"""

from __future__ import annotations

import socket

from tests.harness.proxy import FaultProxy, resp_prefix
from tests.harness.servers import RedisServer


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def _ask(port: int, *parts: str) -> bytes:
    """The reply to one command sent on a fresh connection, b"" when the proxy cut the link."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*%d\r\n" % len(parts) + resp_prefix(*parts))
        try:
            return sock.recv(1024)
        except ConnectionResetError:
            return b""


def test_grouped_proxies_share_rules_budgets_counters_and_downtime(redis_server: RedisServer) -> None:
    with FaultProxy(redis_server.port) as a, FaultProxy(redis_server.port, network=a) as b:
        pattern = resp_prefix("GET", "shared-rule")
        a.cut_on(pattern, times=1)
        assert _ask(b.port, "GET", "shared-rule") == b""  # set through a, fired on b
        assert _ask(a.port, "GET", "shared-rule") == b"$-1\r\n"  # once in all, not once per proxy
        assert (a.fired, b.fired, a.seen(pattern), b.seen(pattern)) == (1, 1, 2, 2)

        b.cut_after_bytes(30)  # one budget over both: a PING is 14 bytes
        assert _ask(a.port, "PING") == b"+PONG\r\n"
        assert _ask(b.port, "PING") == b"+PONG\r\n"
        assert _ask(a.port, "PING") == b""
        assert a.fired == 2 and a.accepted == b.accepted == 5

        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as idle:
            b.wait_for(lambda: b.accepted == 6, what="the idle link accepted")
            a.cut_on(resp_prefix("GET", "down"), refuse_after=True)
            assert _ask(a.port, "GET", "down") == b""
            assert _closed(idle)  # the server went down: b's links die with a's
        assert _ask(b.port, "PING") == b""  # and b refuses new ones
        b.accept()
        assert _ask(a.port, "PING") == b"+PONG\r\n"
