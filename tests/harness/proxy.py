"""A loopback TCP proxy that injects network faults on demand, for fault tests against real servers.

    with FaultProxy(server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0/ns"
        proxy.cut_on(resp_prefix("SET", "ns/.metadata"))   # the link drops as the commit is sent

Faults are driven by what the client sends, so a test can hit an exact protocol step (a command, a
byte count) without hooks in production code. Proxies in front of the nodes of one cluster share their
faults (``FaultProxy(port, network=first)``): rules, counters, the byte budget, refuse and stall, and
the open connections are common, so the group acts as one network. Loopback only: it listens on
127.0.0.1 and forwards to a loopback port. Every loop waits with a short timeout and checks a stop
flag, so no thread outlives ``stop()``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_TICK = 0.02
_RECV = 256 * 1024
_IO_TIMEOUT = 10.0
_LOOPBACK = ("127.0.0.1", "localhost")


def resp_prefix(*parts: str | bytes) -> bytes:
    """The RESP bytes of consecutive command arguments, e.g. ``resp_prefix("SET", key)``.

    Matches the command whatever its argument count (the ``*N`` array header is left out).
    """
    out = b""
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out += b"$%d\r\n%s\r\n" % (len(raw), raw)
    return out


@dataclass
class _Rule:
    pattern: bytes
    action: str  # "cut" | "drop_reply" | "hold"
    remaining: int | None  # times it may still fire; None: every time
    refuse_after: bool = False
    partial: bool = False  # "cut": forward the data up to the end of the pattern first


@dataclass
class _Link:
    """One client connection and its upstream connection."""

    client: socket.socket
    upstream: socket.socket
    owner: int  # id() of the FaultProxy that accepted it
    tail: bytes = b""
    swallow: bool = False  # discard the next reply and drop the link
    held: bytes | None = None  # client bytes waiting for release()
    dead: threading.Event = field(default_factory=threading.Event)

    def kill(self) -> None:
        """Drop both sides now; safe from any thread (the pump thread closes the sockets)."""
        self.dead.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Network:
    """The fault state of one FaultProxy, or of a group of them in front of one cluster's nodes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.links: list[_Link] = []
        self.rules: list[_Rule] = []
        self.counts: dict[bytes, int] = {}
        self.budget: int | None = None
        self.budget_refuse = False
        self.refusing = False
        self.stalled = threading.Event()
        self.accepted = 0
        self.fired = 0


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to a loopback server; cuts, stalls or holds traffic on demand.

    With ``network=other`` it shares ``other``'s faults: a rule fires as often as its ``times`` says
    whichever proxy sees the bytes, the byte budget counts the client bytes of all of them, counters
    add up, and every method acts on all of them (a "down" server is the whole group down).
    """

    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", *, network: FaultProxy | None = None
    ) -> None:
        if upstream_host not in _LOOPBACK:
            raise ValueError(f"FaultProxy only forwards to loopback, not {upstream_host!r}")
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._net: _Network = network._net if network is not None else _Network()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None

    @property
    def accepted(self) -> int:
        """Connections accepted so far, refused ones included."""
        return self._net.accepted

    @property
    def fired(self) -> int:
        """Faults injected so far: rules fired and byte budgets spent."""
        return self._net.fired

    # Lifecycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(_TICK)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._net.lock:
            links = [link for link in self._net.links if link.owner == id(self)]
        for link in links:
            link.kill()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Faults -------------------------------------------------------------------------------

    def cut(self) -> None:
        """Drop every open connection now (the client sees the link close mid-whatever)."""
        with self._net.lock:
            links = list(self._net.links)
        for link in links:
            link.kill()

    def refuse(self) -> None:
        """Drop new connections as soon as they arrive: the server looks down."""
        self._net.refusing = True

    def accept(self) -> None:
        """Undo ``refuse`` and ``stall``; forward normally again (rules stay)."""
        self._net.refusing = False
        self._net.stalled.clear()

    def stall(self) -> None:
        """Stop moving bytes either way; connections stay open (a hung server or network)."""
        self._net.stalled.set()

    def cut_after_bytes(self, nbytes: int, *, refuse_after: bool = False) -> None:
        """Forward ``nbytes`` more client bytes (all connections together), then cut mid-stream."""
        with self._net.lock:
            self._net.budget, self._net.budget_refuse = nbytes, refuse_after

    def cut_on(
        self, pattern: bytes, *, times: int | None = 1, refuse_after: bool = False, partial: bool = False
    ) -> None:
        """When the client sends ``pattern``, drop the link without forwarding that data; with
        ``partial`` the server first gets the data up to the end of ``pattern`` (half a command)."""
        self._add(_Rule(pattern, "cut", times, refuse_after, partial))

    def drop_reply_on(self, pattern: bytes, *, times: int | None = 1) -> None:
        """Forward the command carrying ``pattern``, let the server run it, then drop the link
        before its reply reaches the client (the classic lost reply)."""
        self._add(_Rule(pattern, "drop_reply", times))

    def hold_on(self, pattern: bytes, *, times: int | None = None) -> None:
        """Park each connection that sends ``pattern`` (that data unforwarded) until ``release``."""
        self._add(_Rule(pattern, "hold", times))

    def release(self, count: int | None = None, *, matching: bytes | None = None) -> None:
        """Forward what held connections sent: the first ``count`` of those whose held bytes
        contain ``matching``. A plain ``release()`` frees all and stops holding."""
        with self._net.lock:
            if count is None and matching is None:
                self._net.rules = [r for r in self._net.rules if r.action != "hold"]
            links = [
                link
                for link in self._net.links
                if link.held is not None and (matching is None or matching in link.held)
            ][:count]
        for link in links:
            if link.held is not None:
                self._send(link, link.upstream, link.held)
            link.held = None  # only now may the pump read more from this client

    # Observation --------------------------------------------------------------------------

    def seen(self, pattern: bytes) -> int:
        """How many times the client has sent a rule's ``pattern``, forwarded or not."""
        with self._net.lock:
            return self._net.counts.get(pattern, 0)

    def held(self, matching: bytes = b"") -> int:
        """How many connections are parked, counting only those whose held bytes contain ``matching``."""
        with self._net.lock:
            return sum(link.held is not None and matching in link.held for link in self._net.links)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"FaultProxy: {what} not reached within {timeout:.0f}s")
            time.sleep(_TICK)

    # Internals ----------------------------------------------------------------------------

    def _add(self, rule: _Rule) -> None:
        with self._net.lock:
            self._net.rules.append(rule)
            self._net.counts.setdefault(rule.pattern, 0)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="kvckpt-proxy")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._net.lock:
                self._net.accepted += 1
            if self._net.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=_IO_TIMEOUT)
            except OSError:
                client.close()
                continue
            client.settimeout(_IO_TIMEOUT)
            link = _Link(client, upstream, id(self))
            with self._net.lock:  # "down" may have come while connecting: cut() did not see this link
                refused = self._net.refusing
                if not refused:
                    self._net.links.append(link)
            if refused:
                client.close()
                upstream.close()
                continue
            self._spawn(self._pump, link)

    def _pump(self, link: _Link) -> None:
        try:
            while not (self._stopping.is_set() or link.dead.is_set()):
                if self._net.stalled.is_set() or link.held is not None:
                    time.sleep(_TICK)
                    continue
                readable, _, _ = select.select([link.client, link.upstream], [], [], _TICK)
                for sock in readable:
                    data = sock.recv(_RECV)
                    if not data:
                        return
                    if sock is link.client:
                        self._from_client(link, data)
                    else:
                        self._from_server(link, data)
                    if link.dead.is_set():
                        return
        except OSError:
            pass
        finally:
            link.dead.set()
            for sock in (link.client, link.upstream):
                sock.close()
            with self._net.lock:
                if link in self._net.links:
                    self._net.links.remove(link)

    def _from_client(self, link: _Link, data: bytes) -> None:
        cut_at: int | None = None
        fired: _Rule | None = None
        net = self._net
        with net.lock:
            window = link.tail + data
            fresh = len(link.tail)
            for pattern in net.counts:
                net.counts[pattern] += len(_new_ends(window, pattern, fresh))
            for rule in net.rules:
                ends = _new_ends(window, rule.pattern, fresh) if rule.remaining != 0 else []
                if ends:
                    fired = rule
                    net.fired += 1
                    cut_at = ends[0] - fresh if rule.partial else 0
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    break
            longest = max((len(p) for p in net.counts), default=1)
            link.tail = window[-(longest - 1) :] if longest > 1 else b""
            down = False
            if fired is None and net.budget is not None:
                if len(data) >= net.budget:
                    cut_at, net.budget, down = net.budget, None, net.budget_refuse
                    net.fired += 1
                else:
                    net.budget -= len(data)
            elif fired is not None and fired.action == "cut":
                down = fired.refuse_after
            net.refusing = net.refusing or down
        if fired is None and cut_at is None:
            self._send(link, link.upstream, data)
        elif fired is None or fired.action == "cut":
            if cut_at:
                self._send(link, link.upstream, data[:cut_at])
            if down:  # the server (every node of a group) "went down": every other connection dies
                self.cut()  # first, so none is left to serve what the client tries once this one dies
            link.kill()
        elif fired.action == "drop_reply":
            link.swallow = True
            self._send(link, link.upstream, data)
        else:  # hold
            link.held = data

    def _from_server(self, link: _Link, data: bytes) -> None:
        if link.swallow:  # the server has run the command: its reply is lost with the link
            link.kill()
        else:
            self._send(link, link.client, data)

    @staticmethod
    def _send(link: _Link, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError:
            link.kill()


def _new_ends(window: bytes, pattern: bytes, fresh: int) -> list[int]:
    """End offsets of the occurrences of ``pattern`` in ``window`` that end past ``fresh``."""
    ends, start = [], max(0, fresh - len(pattern) + 1)
    while (found := window.find(pattern, start)) >= 0:
        ends.append(found + len(pattern))
        start = found + 1
    return ends
