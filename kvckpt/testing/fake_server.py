"""fakeredis behind a URL, so code that reads its checkpoint URL from config runs unchanged in tests.

``fakeredis://NAME/NAMESPACE`` names an in-process fakeredis server: every URL with the same NAME in
one process reaches the same data, whatever opens it (KVStorageWriter, kvckpt.load, the management
API, DCP after ``kvckpt.install()``). Other processes cannot see it; for them ``TcpServer(NAME)``
serves the same data over loopback TCP at a ``redis://`` URL, no redis-server binary needed.

For code that takes a client instead, ``fake_client``/``fake_store``: every ``fakeredis.FakeRedis()``
is its own server unless several share a ``fakeredis.FakeServer``, so pass the same ``server`` to
clients that must see each other's keys.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import uuid
from typing import Any
from urllib.parse import unquote

from kvckpt.errors import InvalidCheckpointIdError, KVCheckpointError, MissingDependencyError
from kvckpt.store import KVStore
from kvckpt.stores.redis.client import ClientStore
from kvckpt.urls import StoreURL, redact, require_namespace, split_url

USAGE = "use fakeredis://NAME/NAMESPACE (NAME: letters, digits, '_', '.' or '-')"

try:
    import fakeredis
    from fakeredis._clients._tcp_server import TCPFakeRequestHandler, Writer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "fakeredis:// URLs need fakeredis 2.41 or later: pip install 'kvckpt[fakeredis]'"
    ) from exc

_servers: dict[str, Any] = {}
_lock = threading.Lock()


def server(name: str) -> Any:
    """The process-wide ``fakeredis.FakeServer`` called ``name``, created on first use."""
    with _lock:
        if name not in _servers:
            _servers[name] = fakeredis.FakeServer()
        return _servers[name]


def forget(name: str) -> None:
    """Drop the server called ``name`` and its data; the next use of the name starts empty."""
    with _lock:
        _servers.pop(name, None)


def fresh_url(namespace: str = "checkpoints", prefix: str = "test") -> str:
    """A ``fakeredis://`` URL on a server nobody has used yet."""
    return f"fakeredis://{prefix}-{uuid.uuid4().hex[:12]}/{namespace}"


def fake_client(fake_server: Any = None) -> Any:
    """A ``fakeredis.FakeRedis`` on ``fake_server`` (a ``fakeredis.FakeServer``; a new one by default)."""
    return fakeredis.FakeRedis(server=fake_server or fakeredis.FakeServer())


def fake_store(fake_server: Any = None) -> KVStore:
    """A KVStore over ``fake_client(fake_server)``; ``kvckpt.save(state, "ns", client=store)`` uses it."""
    return ClientStore(client=fake_client(fake_server), description="fakeredis")


class FakeRedisStore:
    """The registry's backend for ``fakeredis://``: a store on the named in-process server."""

    @classmethod
    def parse_url(cls, text: str) -> StoreURL:
        parts = split_url(text, USAGE)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", parts.netloc):
            raise InvalidCheckpointIdError(
                f"{redact(text)!r}: a fakeredis server NAME is missing or odd; {USAGE}"
            )
        namespace = unquote("/".join(parts.segments()))
        require_namespace(namespace, text, USAGE)
        return StoreURL(parts.scheme, namespace, hosts=((parts.netloc, 0),), query=parts.options())

    @classmethod
    def from_url(cls, url: StoreURL, **options: Any) -> KVStore:
        if options:
            raise KVCheckpointError(
                f"{url}: a fakeredis:// store takes no options (got {', '.join(sorted(options))})"
            )
        (name, _), *_ = url.hosts
        return ClientStore(client=fakeredis.FakeRedis(server=server(name)), description=f"fakeredis://{name}")


class _BulkWriter(Writer):
    """Every string reply as a bulk string, as Redis sends GET/GETRANGE replies.

    fakeredis writes a string without CR/LF as a simple string (``+…``); kvckpt's RESP path reads
    GETRANGE replies straight into tensor memory and accepts only bulk replies there.
    """

    def dump(self, value: Any) -> None:
        if isinstance(value, (bytes, str)):
            data = value if isinstance(value, bytes) else value.encode()
            self.write(b"$%d\r\n%s\r\n" % (len(data), data))
            self.writer.flush()
        else:
            super().dump(value)


class _Handler(TCPFakeRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.writer = _BulkWriter(self.client_address, self.wfile, self)


class TcpServer:
    """The fakeredis server ``name`` served on a free loopback port, for tests across processes.

    ``url(namespace)`` gives a ``redis://127.0.0.1:PORT/0/NAMESPACE`` any process can open; the
    same data stays reachable in this process as ``fakeredis://NAME/NAMESPACE``. A context manager.
    """

    def __init__(self, name: str | None = None) -> None:
        if importlib.util.find_spec("lupa") is None:  # fakeredis runs Lua scripts on lupa
            raise MissingDependencyError(
                "TcpServer serves redis:// URLs, whose commits run a Lua script (docs/protocol.md), "
                "and fakeredis needs lupa for Lua: pip install 'kvckpt[fakeredis]' (it brings "
                "fakeredis[lua])"
            )
        self.name = name or f"tcp-{uuid.uuid4().hex[:12]}"
        self._tcp = fakeredis.TcpFakeServer(("127.0.0.1", 0))
        self._tcp.RequestHandlerClass = _Handler
        self._tcp.fake_server = server(self.name)
        self.port: int = self._tcp.server_address[1]
        self._thread = threading.Thread(target=self._tcp.serve_forever, name=f"fakeredis-{self.port}")
        self._thread.daemon = True
        self._thread.start()

    def url(self, namespace: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0/{namespace}"

    def close(self) -> None:
        self._tcp.shutdown()
        self._tcp.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
