"""URL scheme → backend class, in the style of fsspec's registry.

Backends are named as ``"module:Class"`` and imported on first use, so an optional dependency (etcd's
grpcio) costs nothing until a URL needs it. Three sources, later ones winning:

- the built-in backends below;
- the ``kvckpt.backends`` entry-point group of installed packages (``scheme = "module:Class"``);
- ``register_backend(scheme, "module:Class" or the class)`` at run time.

A backend class implements kvckpt.store.KVStore plus two class methods: ``parse_url(text)`` (its URL
grammar, returning a kvckpt.urls.StoreURL) and ``from_url(url, **store_options)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import threading
from importlib.metadata import entry_points
from typing import Any, Protocol

from kvckpt.errors import (
    InvalidArgumentError,
    InvalidCheckpointIdError,
    MissingDependencyError,
)
from kvckpt.store import KVStore
from kvckpt.urls import StoreURL, redact, scheme_of

ENTRY_POINT_GROUP = "kvckpt.backends"


class StoreFactory(Protocol):
    def parse_url(self, text: str) -> StoreURL: ...

    def from_url(self, url: StoreURL, **options: Any) -> KVStore: ...


#: scheme → (where the class is, the pip extra that provides its client library or None)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "redis": ("kvckpt.stores.redis.standalone:RedisStore", None),
    "rediss": ("kvckpt.stores.redis.standalone:RedisStore", None),
    "redis+unix": ("kvckpt.stores.redis.standalone:RedisStore", None),
    "redis+cluster": ("kvckpt.stores.redis.cluster:RedisClusterStore", None),
    "etcd": ("kvckpt.stores.etcd.store:EtcdStore", "etcd"),
    "fakeredis": ("kvckpt.testing.fake_server:FakeRedisStore", "fakeredis"),
}
#: The built-in URL forms, for messages about a URL no backend serves.
USAGE = (
    "use redis://[user[:password]@]host[:port]/DB/NAMESPACE, rediss://…, "
    "redis+unix:///path/to.sock?db=0&namespace=NAMESPACE, redis+cluster://host:port[,host:port]/NAMESPACE, "
    "etcd://host:port[,host:port]/NAMESPACE, fakeredis://NAME/NAMESPACE, or a scheme added with "
    "kvckpt.register_backend"
)
_registered: dict[str, tuple[str | StoreFactory, str | None]] = dict(_BUILTIN)
_entry_points_read = False
_lock = threading.Lock()


def register_backend(scheme: str, backend: str | StoreFactory, *, extra: str | None = None) -> None:
    """Serve ``scheme://`` URLs with ``backend`` ("module:Class" or the class itself).

    ``extra`` names the pip extra to suggest when importing the module fails. Re-registering a scheme
    replaces it (tests and plugins may override a built-in)."""
    if not scheme or scheme != scheme.lower() or scheme_of(f"{scheme}://x/y") != scheme:
        raise InvalidArgumentError(
            f"not a URL scheme: {scheme!r}; use lower-case letters, digits, '+', '.', '-'", options=["scheme"]
        )
    if isinstance(backend, str) and ":" not in backend:
        raise InvalidArgumentError(
            f"backend must be 'module:Class' or the class itself, got {backend!r}", options=["backend"]
        )
    with _lock:
        _registered[scheme] = (backend, extra)


def unregister_backend(scheme: str) -> None:
    """Forget ``scheme`` (a built-in comes back as it was)."""
    with _lock:
        _registered.pop(scheme, None)
        if scheme in _BUILTIN:
            _registered[scheme] = _BUILTIN[scheme]


def _read_entry_points() -> None:
    global _entry_points_read
    with _lock:
        if _entry_points_read:
            return
        _entry_points_read = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            _registered.setdefault(point.name, (point.value, None))


def schemes() -> list[str]:
    """Every scheme with a backend, built-in, installed or registered."""
    _read_entry_points()
    return sorted(_registered)


def owns(checkpoint_id: object) -> bool:
    """True only for URLs whose scheme has a backend (not for paths or other schemes)."""
    scheme = scheme_of(checkpoint_id)
    return scheme is not None and scheme in schemes()


def backend_for(scheme: str) -> StoreFactory:
    _read_entry_points()
    try:
        target, extra = _registered[scheme]
    except KeyError:
        raise InvalidCheckpointIdError(
            f"unknown scheme {scheme!r}: no kvckpt backend serves it (known: {', '.join(schemes())}); {USAGE}"
        ) from None
    if not isinstance(target, str):
        return target
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


def parse_url(text: str) -> StoreURL:
    """``text`` parsed by the grammar of the backend its scheme names."""
    scheme = scheme_of(text)
    if scheme is None:
        raise InvalidCheckpointIdError(f"not a kvckpt URL: {redact(str(text))!r}; {USAGE}")
    return backend_for(scheme).parse_url(text)


def open_store(url: str | StoreURL, **options: Any) -> KVStore:
    """The store ``url`` names, given its backend's ``options``; an option it does not take is
    InvalidArgumentError naming the closest one it takes."""
    parsed = url if isinstance(url, StoreURL) else parse_url(url)
    check_store_options(parsed.scheme, options)
    return backend_for(parsed.scheme).from_url(parsed, **options)


def _named(func: Any) -> tuple[set[str], bool]:
    """The keyword names ``func`` takes, and whether it also takes any other (``**kwargs``)."""
    params = inspect.signature(func).parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names - {"self", "cls", "url"}, any(p.kind == p.VAR_KEYWORD for p in params)


def check_store_options(scheme: str, options: dict[str, Any]) -> None:
    """Refuse an option the backend would only trip over when it first connects (a typo, usually).

    A backend's ``from_url`` names its own options, or takes ``**options`` that a dataclass in its
    ``store_options`` attribute names (the Redis stores share theirs); what else it takes goes to the
    class it builds, whose constructor names the rest. A backend that passes any other keyword on to
    a client library of its own is left to that library.
    """
    if not options:
        return
    factory = backend_for(scheme)
    known, open_ended = _named(factory.from_url)
    declared = getattr(factory, "store_options", None)
    if open_ended and isinstance(declared, type) and dataclasses.is_dataclass(declared):
        known |= {f.name for f in dataclasses.fields(declared)}
        open_ended = False
    own = sorted(known)
    if open_ended:
        extra, open_ended = _named(factory)
        known |= extra
    unknown = sorted(set(options) - known)
    if unknown and not open_ended:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"unknown store option(s) {', '.join(map(repr, unknown))} for {scheme}:// URLs{hint} "
            f"(the backend's own: {', '.join(own)})",
            options=unknown,
        )
