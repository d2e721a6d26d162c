"""The Redis URL grammars: ``redis://`` and ``rediss://`` (a DB segment), ``redis+unix://`` (a socket
path, DB and namespace in the query) and ``redis+cluster://`` (startup nodes, no DB)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from kvckpt.errors import InvalidCheckpointIdError
from kvckpt.urls import (
    StoreURL,
    parse_db,
    parse_host_url,
    parse_hosts,
    redact_url,
    require_namespace,
    split_url,
)

PORT = 6379
USAGE = (
    "use redis://[user[:password]@]host[:port]/DB/NAMESPACE, rediss://…, "
    "redis+unix:///path/to.sock?db=0&namespace=NAMESPACE or "
    "redis+cluster://host:port[,host:port]/NAMESPACE"
)


def parse_standalone_url(text: str) -> StoreURL:
    """``redis://``, ``rediss://`` or ``redis+unix://`` into a StoreURL (db always set)."""
    parts = split_url(text, USAGE)
    where: dict[str, Any]  # what locates the server, and the query options the store sees
    if parts.scheme == "redis+unix":
        socket_path = unquote(parts.path)
        namespace = parts.query.get("namespace", [""])[-1]
        if parts.netloc or not socket_path.startswith("/"):
            raise InvalidCheckpointIdError(
                f"{redact_url(text)!r}: the socket path must be absolute, as in "
                "redis+unix:///run/redis.sock?db=0&namespace=NAMESPACE"
            )
        db = parse_db(parts.query.get("db", ["0"])[-1], text)
        where = {"socket_path": socket_path, "query": parts.options("db", "namespace")}
    else:
        hosts = parse_hosts(parts.netloc, PORT, text, USAGE)
        given = [k for k in ("db", "namespace") if k in parts.query]
        if given:  # ignoring them would save to another database or namespace than the user meant
            raise InvalidCheckpointIdError(
                f"{redact_url(text)!r}: {parts.scheme}:// takes the database and the namespace from the "
                f"path, not {' or '.join(f'{k}=' for k in given)}; write {parts.scheme}://host:port/DB/NAMESPACE"
            )
        segments = parts.segments()
        if not segments or not segments[0]:
            raise InvalidCheckpointIdError(
                f"{redact_url(text)!r}: missing database number; write {parts.scheme}://host:port/0/NAMESPACE"
            )
        db = parse_db(segments[0], text)
        namespace = unquote("/".join(segments[1:]))
        where = {"hosts": hosts, "query": parts.options()}  # db= and namespace= were refused above
    require_namespace(namespace, text, USAGE)
    return StoreURL(parts.scheme, namespace, db=db, username=parts.username, password=parts.password, **where)


def parse_cluster_url(text: str) -> StoreURL:
    return parse_host_url(text, PORT, USAGE)
