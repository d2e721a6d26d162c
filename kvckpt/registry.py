"""URL scheme → backend class, imported lazily so a missing optional extra costs nothing until used."""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from kvckpt.errors import InvalidCheckpointIdError, MissingDependencyError
from kvckpt.store import KVStore
from kvckpt.urls import StoreURL, parse_url, scheme_of


class StoreFactory(Protocol):
    def from_url(self, url: StoreURL, **options: Any) -> KVStore: ...


# scheme: (module:class, pip extra that provides its client or None)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "redis": ("kvckpt.stores.redis:RedisStore", None),
    "rediss": ("kvckpt.stores.redis:RedisStore", None),
    "redis+unix": ("kvckpt.stores.redis:RedisStore", None),
    "redis+cluster": ("kvckpt.stores.redis_cluster:RedisClusterStore", None),
    "etcd": ("kvckpt.stores.etcd:EtcdStore", "etcd"),
    "fakeredis": ("kvckpt.testing.fake_server:FakeRedisStore", "fakeredis"),
}


def owns(checkpoint_id: object) -> bool:
    """True only for URLs whose scheme kvckpt serves (not for paths or other schemes)."""
    return scheme_of(checkpoint_id) in BACKENDS


def backend_for(scheme: str) -> StoreFactory:
    try:
        target, extra = BACKENDS[scheme]
    except KeyError:
        raise InvalidCheckpointIdError(
            f"no kvckpt backend for scheme {scheme!r}; known: {', '.join(BACKENDS)}"
        ) from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or (exc.name or "").startswith("kvckpt"):
            raise
        raise MissingDependencyError(
            f"the {scheme}:// backend needs the {exc.name!r} package: pip install 'kvckpt[{extra}]'"
        ) from exc
    factory: StoreFactory = getattr(module, class_name)
    return factory


def open_store(url: str | StoreURL, **options: Any) -> KVStore:
    parsed = url if isinstance(url, StoreURL) else parse_url(url)
    return backend_for(parsed.scheme).from_url(parsed, **options)
