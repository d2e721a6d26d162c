"""checkpoint_id → (store, namespace). Shared by the writer, the reader and the management API."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, overload

from kvckpt.arguments import mapping
from kvckpt.errors import InvalidCheckpointIdError, KVCheckpointError
from kvckpt.registry import open_store, owns, parse_url, schemes
from kvckpt.store import KVStore
from kvckpt.urls import StoreURL, redact, scheme_of


@dataclass(frozen=True)
class Target:
    store: KVStore
    namespace: str
    #: What may be shown or stored: the URL with its password redacted, or the bare namespace.
    display: str


class Resolver:
    """Opens stores for checkpoint_ids, reusing one connection while the server stays the same."""

    def __init__(self, client: Any = None, store_options: dict[str, Any] | None = None) -> None:
        mapping("store_options", store_options)
        self._options = dict(store_options or {})
        self._server: StoreURL | None = None
        self._store: KVStore | None = None
        if client is not None:
            self._store = client if isinstance(client, KVStore) else wrap_client(client)

    @property
    def injected(self) -> bool:
        return self._store is not None and self._server is None

    def resolve(self, checkpoint_id: object) -> Target:
        checkpoint_id = checkpoint_text(checkpoint_id)
        if self.injected:
            assert self._store is not None
            if not isinstance(checkpoint_id, str) or not checkpoint_id.strip("/"):
                raise InvalidCheckpointIdError(
                    f"with client= the checkpoint_id is the bare namespace (e.g. 'run1/step100'), "
                    f"got {checkpoint_id!r}"
                )
            if scheme_of(checkpoint_id) is not None:
                raise InvalidCheckpointIdError(
                    f"with client= the checkpoint_id is the bare namespace (e.g. 'run1/step100'), not "
                    f"a URL like {redact(checkpoint_id)!r}: the client already says which server; "
                    "pass only the namespace, or drop client= to connect by URL"
                )
            return Target(self._store, checkpoint_id, checkpoint_id)
        if not isinstance(checkpoint_id, str):
            raise InvalidCheckpointIdError(
                f"kvckpt needs a URL checkpoint_id such as redis://host:6379/0/NAMESPACE, got "
                f"{type(checkpoint_id).__name__}; for a filesystem path use DCP's FileSystemWriter"
            )
        url = parse_url(checkpoint_id)
        if self._store is None or self._server != url.server:
            self.close()
            self._store = open_store(url, **self._options)
            self._server = url.server
        return Target(self._store, url.namespace, url.to_url(redact=True))

    def close(self) -> None:
        if self._store is not None and not self.injected:
            self._store.close()
            self._store, self._server = None, None


class Addressed:
    """What KVStorageWriter and KVStorageReader share: a checkpoint_id resolved to a store + namespace."""

    _resolver: Resolver
    _target: Target | None

    def _init_target(self, client: Any, store_options: dict[str, Any] | None) -> None:
        self._resolver = Resolver(client, store_options)
        self._target = None

    def _retarget(self, checkpoint_id: object) -> None:
        if checkpoint_id is not None:
            self._target = self._resolver.resolve(checkpoint_id)

    @property
    def checkpoint_id(self) -> str | None:
        """The target with credentials redacted (DCP logs this attribute)."""
        return None if self._target is None else self._target.display

    @property
    def target(self) -> Target:
        if self._target is None:
            raise KVCheckpointError(
                f"no checkpoint_id: pass one to {type(self).__name__}(...) or to "
                "dcp.save/dcp.load(checkpoint_id=...)"
            )
        return self._target

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return owns(checkpoint_text(checkpoint_id))


#: A kvckpt scheme followed by a single slash: what pathlib makes of ``redis://host/0/ns``.
_COLLAPSED = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*):/(?!/)")


@overload
def checkpoint_text(checkpoint_id: str | os.PathLike[str]) -> str: ...
@overload
def checkpoint_text(checkpoint_id: object) -> object: ...


def checkpoint_text(checkpoint_id: object) -> object:
    """The checkpoint_id as text, decided once for everything that accepts one.

    DCP types checkpoint_id as ``str | os.PathLike``, so a ``pathlib.Path`` or any object with
    ``__fspath__`` is its text. ``pathlib`` collapses ``//``: ``Path("redis://h/0/ns")`` reads
    ``redis:/h/0/ns``, which DCP would take for a local folder named ``redis:`` and save into it.
    Such an id is refused, not guessed back (``redis+unix:///sock`` and ``redis+unix://sock`` both
    collapse to ``redis+unix:/sock``). Anything else that is not text (bytes paths, None) is
    returned as it is, for the caller to judge.
    """
    given = type(checkpoint_id).__name__
    if isinstance(checkpoint_id, os.PathLike):
        checkpoint_id = os.fspath(checkpoint_id)
    if isinstance(checkpoint_id, str):
        collapsed = _COLLAPSED.match(checkpoint_id)
        if collapsed and collapsed.group("scheme") in schemes():
            scheme = collapsed.group("scheme")
            raise InvalidCheckpointIdError(  # the rest of the id may hold a password: not shown
                f"checkpoint_id '{scheme}:/…' (a {given}) is a kvckpt URL whose '//' became '/': "
                "pathlib.Path collapses it (Path('redis://host:6379/0/ns') reads "
                "'redis:/host:6379/0/ns'); pass the URL as a str. kvckpt refuses it rather than let "
                f"DCP save into a local folder named '{scheme}:'"
            )
    return checkpoint_id


def wrap_client(client: Any) -> KVStore:
    """A KVStore around a redis-py-compatible client object (redis.Redis, fakeredis, …)."""
    from kvckpt.stores.redis import wrap_client as wrap_redis_client

    return wrap_redis_client(client)
