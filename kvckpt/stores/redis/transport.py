"""The RESP2 transport of every connection kvckpt opens to a standalone Redis (TCP, TLS, unix socket).

Values leave from, and land in, the caller's memory. redis-py hands every reply back as a new bytes
object (one copy there, another into the tensor) and sends each memoryview argument with its own
``sendall`` (10,000 small values: 10,000 syscalls). Here a batch is one write of its small parts,
large values go out straight from the tensor's memory, and each GETRANGE reply is received straight
into its destination (``recv_into``, which works on an ``SSLSocket`` too). This module holds the
sockets, the login, the pool and the send-once commit; packing and reading replies are resp.py's.

Failures are raised as redis-py's exception classes, so the stores translate them into kvckpt's errors
the same way whether they came from here or from a redis-py client (Cluster, an injected client); a
reply that is not RESP is StoreProtocolError. Every operation retries through one ``RetryPolicy``.
"""

from __future__ import annotations

import functools
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import redis.exceptions as rex

from kvckpt._buffers import flat_view
from kvckpt.deadline import Deadline, current
from kvckpt.store import Buffer, RangeRead
from kvckpt.stores.redis.fencing import send_once
from kvckpt.stores.redis.resp import Arg as Arg  # "as": the stores import these three from here
from kvckpt.stores.redis.resp import Reply as Reply
from kvckpt.stores.redis.resp import RespReader, arg_bytes, pack
from kvckpt.stores.redis.resp import raise_first as raise_first
from kvckpt.stores.redis.retry import RetryPolicy

T = TypeVar("T")

#: A value at least this large is sent from its own memory rather than copied into the batch buffer.
DIRECT_SEND = 64 << 10
#: Ranges are asked for in pieces of at most this size. The server copies each reply into a buffer
#: of the reply's size; pieces this small reuse its allocator's free memory, where a 4 MiB reply
#: took fresh pages (redis-server 7.0 with jemalloc: ~55,000 page faults per 512 MiB read; 1 MiB: none).
READ_PIECE = 1 << 20
#: Small parts of a batch are flushed to the socket once this much has accumulated.
SEND_BUFFER = 1 << 20


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect; picklable, so a store crosses processes without its sockets."""

    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float | None = 30.0
    connect_timeout: float | None = 3.0
    #: TLS: on when ``tls``; ``ca`` verifies the server (else the system's CAs), ``cert``/``key`` are
    #: the client's certificate.
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context


class RespConnection:
    """One socket. Every method leaves it either in step with the server or closed."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._sock: socket.socket | None = None
        where = endpoint.unix_path or f"{endpoint.host}:{endpoint.port}"
        self._reader = RespReader(self._recv_into, source=f"Redis at {where}")
        #: How long each operation may wait at most, asked as it starts (RetryPolicy.left: the deadline).
        self.bound: Callable[[], float] | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, wait: float | None = None) -> None:
        ep = self.endpoint
        connect_timeout = ep.connect_timeout if wait is None else min(ep.connect_timeout or wait, wait)
        if ep.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(connect_timeout)
                sock.connect(ep.unix_path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((ep.host, ep.port), timeout=connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if ep.tls:
                try:
                    sock = ep.tls_context().wrap_socket(sock, server_hostname=ep.host)
                except BaseException:
                    sock.close()
                    raise
        sock.settimeout(ep.timeout if wait is None else wait)
        self._sock = sock
        self._reader.clear()
        setup: list[tuple[Arg, ...]] = []
        if ep.username:  # as redis-py does: a user without a password authenticates with ""
            setup.append(("AUTH", ep.username, ep.password or ""))
        elif ep.password is not None:
            setup.append(("AUTH", ep.password))
        if ep.db:
            setup.append(("SELECT", ep.db))
        if not setup:
            return
        replies = self.execute(setup)
        for command, reply in zip(setup, replies, strict=True):
            if isinstance(reply, rex.RedisError):
                self.close()
                if command[0] == "AUTH":  # "ERR invalid password" on servers without ACLs
                    raise rex.AuthenticationError(str(reply))
                raise reply

    def _recv_into(self, view: memoryview) -> int:
        if self._sock is None:
            raise rex.ConnectionError("the connection is closed")
        return self._sock.recv_into(view)

    def drop_if_stale(self) -> None:
        """Close an idle connection the server closed (or wrote to unasked): reuse would fail mid-batch."""
        if self._sock is not None and select.select([self._sock], [], [], 0)[0]:
            self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._reader.clear()
        if sock is not None:
            sock.close()

    @contextmanager
    def _io(self) -> Iterator[socket.socket]:
        """The socket; any failure but a complete server error reply closes it (it may be out of step)."""
        wait = None if self.bound is None else self.bound()
        if self._sock is None:
            self.connect(wait)
        assert self._sock is not None
        if wait is not None:
            self._sock.settimeout(wait)
        try:
            yield self._sock
        except rex.ResponseError:
            raise
        except BaseException:
            self.close()
            raise

    # Commands ----------------------------------------------------------------------------------

    def execute(self, commands: Sequence[tuple[Arg, ...]]) -> list[Reply]:
        """Pipeline small commands; error replies come back as exception objects, in place."""
        with self._io() as sock:
            sock.sendall(b"".join(pack(*command) for command in commands))
            return [self._reader.reply() for _ in commands]

    def set_many(self, items: Sequence[tuple[str, Buffer]], px: int | None) -> list[Reply]:
        """SET each key (with PX when given); error replies come back as exception objects, in place."""
        head = b"*3\r\n$3\r\nSET\r\n" if px is None else b"*5\r\n$3\r\nSET\r\n"
        tail = b"\r\n" if px is None else b"\r\n$2\r\nPX\r\n" + b"$%d\r\n%d\r\n" % (len(str(px)), px)
        with self._io() as sock:
            out = bytearray()
            for key, value in items:
                k = arg_bytes(key)
                data = flat_view(value)
                out += b"%s$%d\r\n%s\r\n$%d\r\n" % (head, len(k), k, data.nbytes)
                if data.nbytes >= DIRECT_SEND:
                    sock.sendall(out)
                    out.clear()
                    sock.sendall(data)
                else:
                    out += data
                out += tail
                if len(out) >= SEND_BUFFER:
                    sock.sendall(out)
                    out.clear()
            if out:
                sock.sendall(out)
            return [self._reader.reply() for _ in items]

    def getrange_into(self, reads: Sequence[RangeRead]) -> list[int | rex.RedisError]:
        """GETRANGE each read's bytes straight into its buffer; returns how many bytes each got, or
        the error reply one of its pieces got."""
        with self._io() as sock:
            out = bytearray()
            pieces: list[tuple[int, memoryview]] = []  # (read, where its piece lands), in reply order
            for i, r in enumerate(reads):
                dest = flat_view(r.into)
                for start in range(0, dest.nbytes, READ_PIECE):
                    piece = dest[start : start + READ_PIECE]
                    first = r.offset + start
                    out += pack(b"GETRANGE", r.key, first, first + piece.nbytes - 1)
                    pieces.append((i, piece))
            sock.sendall(out)
            counts: list[int | rex.RedisError] = [0] * len(reads)
            for i, piece in pieces:
                got = self._reader.bulk_into(piece, "GETRANGE")
                count = counts[i]
                if isinstance(got, rex.RedisError):
                    counts[i] = got
                elif isinstance(count, int):
                    counts[i] = count + got
            return counts


class Transport:
    """Connections for concurrent callers (one per I/O thread), each operation retried by one policy.

    Every batch kvckpt sends through ``run`` is idempotent (SET of the same bytes, GET, GETRANGE,
    PERSIST, PEXPIRE, EXISTS, UNLINK, SCAN), so after a dropped connection it is sent again whole on a
    fresh one; a batch either completes or raises, never half-succeeds. A commit goes through
    ``once`` instead: sent exactly once, and fenced when its reply is lost.
    """

    def __init__(self, endpoint: Endpoint, policy: RetryPolicy, where: str) -> None:
        self.endpoint = endpoint
        self.policy = policy
        self.where = where
        self._idle: list[RespConnection] = []
        self._lock = threading.Lock()

    def _take_connection(self) -> RespConnection:
        with self._lock:
            conn = self._idle.pop() if self._idle else RespConnection(self.endpoint)
        conn.drop_if_stale()
        return conn

    def _give(self, conn: RespConnection) -> None:
        if conn.connected:
            with self._lock:
                self._idle.append(conn)

    def run(self, operation: Callable[[RespConnection], T], what: str = "a batch") -> T:
        """``operation`` on a connection, retried within the shared deadline (kvckpt.deadline)."""
        deadline = current()

        def attempt() -> T:
            conn = self._take_connection()
            try:
                conn.bound = functools.partial(self.policy.left, deadline)
                return operation(conn)
            finally:
                self._give(conn)

        return self.policy.run(attempt, where=self.where, what=what, deadline=deadline)

    def once(self, command: tuple[Arg, ...], *, asking: bool = False) -> Reply:
        """Send a commit exactly once; after a lost reply, fence it so it can never run late
        (kvckpt.stores.redis.fencing). ``asking`` sends ASKING first (a Cluster node importing the
        key's slot serves it only then)."""
        deadline = current()
        conn = self._take_connection()
        try:
            conn.bound = functools.partial(self.policy.left, deadline)
            reply = send_once(
                lambda: self._client_id(conn, deadline),
                lambda: conn.execute([("ASKING",), command] if asking else [command])[-1],
                conn.close,
                lambda conn_id: self.run(
                    lambda other: other.execute([("CLIENT", "KILL", "ID", conn_id)]), "fencing"
                ),
            )
        finally:
            self._give(conn)
        deadline.progress()
        raise_first([reply])
        return reply

    def _client_id(self, conn: RespConnection, deadline: Deadline) -> int | None:
        """This connection's id on the server (connecting first, with retries); None if not allowed."""
        (reply,) = self.policy.run(
            lambda: conn.execute([("CLIENT", "ID")]), where=self.where, what="connecting", deadline=deadline
        )
        return reply if isinstance(reply, int) else None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def execute(self, commands: Sequence[tuple[Arg, ...]], what: str = "a batch") -> list[Reply]:
        """Small commands in one round trip; raises the first error reply."""
        return raise_first(self.run(lambda conn: conn.execute(commands), what))
