"""A read-and-delete fsspec view of committed checkpoints, for frameworks that manage folders.

Lightning's ModelCheckpoint and torchtitan's CheckpointManager find, probe and prune checkpoints
through fsspec (``exists``, ``isdir``, ``ls``, ``rm``); they save and load through DCP or a
CheckpointIO, which reach kvckpt's own writer and reader. This view shows a store as folders:
every committed checkpoint NAMESPACE is a directory holding one file, ``.metadata`` (its record),
as DCP's folder layout would; every namespace prefix above a checkpoint is a directory. A save
still in progress, or one that died, has no record and so does not exist here.

Nothing is written through it: opening a file refuses, so DCP's FsspecWriter (which would pick
this protocol when ``kvckpt.install()`` was not called) fails loudly instead of storing its own
file format. Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fsspec import AbstractFileSystem, register_implementation
from fsspec.registry import _registry as fsspec_classes  # fsspec has no public unregister
from fsspec.registry import registry

from kvckpt import layout
from kvckpt.errors import KVCheckpointError
from kvckpt.management.api import CheckpointInfo, delete, list_checkpoints
from kvckpt.registry import parse_url

#: Schemes whose URLs end in the namespace, so a framework can join folder names onto them.
SCHEMES = ("redis", "rediss", "redis+cluster", "etcd", "fakeredis")
_RECORD = layout.RECORD_NAME.lstrip("/")
_registered = threading.Lock()


class KVCheckpointFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """One store's committed checkpoints as directories; paths are namespaces."""

    protocol = SCHEMES
    root_marker = ""
    cachable = True

    def __init__(self, server_url: str, **options: Any) -> None:
        super().__init__(server_url=server_url, **options)
        self._server = parse_url(server_url)
        self._options = options

    @classmethod
    def _get_kwargs_from_urls(cls, path: str) -> dict[str, Any]:
        # any namespace will do: only the server part is used
        return {"server_url": parse_url(path).with_namespace("_").to_url(redact=False)}

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(path[0] if isinstance(path, list) else path)
        if "://" in text:
            return parse_url(text).namespace
        return text.strip("/")

    def unstrip_protocol(self, name: str) -> str:
        """The full URL of a namespace, credentials included, as DCP and kvckpt.load need it."""
        return self._url(self._strip_protocol(name))

    def _url(self, namespace: str) -> str:
        return self._server.with_namespace(namespace).to_url(redact=False)

    def _checkpoints(self, prefix: str) -> list[CheckpointInfo]:
        return list_checkpoints(self._url(prefix), **self._options)

    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        name = self._strip_protocol(path)
        parent, _, leaf = name.rpartition("/")
        if leaf == _RECORD and parent:
            for found in self._checkpoints(parent):
                if found.namespace == parent:
                    return {"name": name, "type": "file", "size": 0, "created": found.created}
        elif self._checkpoints(name):
            return {"name": name, "type": "directory", "size": 0}
        raise FileNotFoundError(name)

    def ls(self, path: Any, detail: bool = True, **kwargs: Any) -> list[Any]:
        name = self._strip_protocol(path)
        entries: dict[str, dict[str, Any]] = {}
        for found in self._checkpoints(name):
            if found.namespace == name:
                child = f"{name}/{_RECORD}"
                entries[child] = {"name": child, "type": "file", "size": 0, "created": found.created}
            else:
                child = f"{name}/{found.namespace[len(name) + 1 :].split('/')[0]}"
                entries.setdefault(child, {"name": child, "type": "directory", "size": 0})
        if not entries:
            raise FileNotFoundError(name)
        listed = sorted(entries.values(), key=lambda entry: str(entry["name"]))
        return listed if detail else [entry["name"] for entry in listed]

    def modified(self, path: Any) -> Any:
        """When the newest checkpoint at or below ``path`` was committed."""
        import datetime

        found = self._checkpoints(self._strip_protocol(path).removesuffix(f"/{_RECORD}"))
        if not found:
            raise FileNotFoundError(path)
        return datetime.datetime.fromtimestamp(max(info.created for info in found), datetime.timezone.utc)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete the checkpoint at ``path``; with ``recursive`` every checkpoint below it too."""
        name = self._strip_protocol(path).removesuffix(f"/{_RECORD}")
        found = self._checkpoints(name)
        if not found:
            raise FileNotFoundError(name)
        if not recursive and any(info.namespace != name for info in found):
            raise IsADirectoryError(f"{name} holds other checkpoints; pass recursive=True")
        for info in found:
            delete(self._url(info.namespace), **self._options)

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        """Directories are implied by the checkpoints below them: nothing to create."""

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        """Directories are implied by the checkpoints below them: nothing to create."""

    def _open(self, path: Any, mode: str = "rb", **kwargs: Any) -> Any:
        raise KVCheckpointError(
            f"{self._server.with_namespace(self._strip_protocol(path))}: kvckpt "
            "stores no files; save and load through DCP after kvckpt.install() (its KVStorageWriter/"
            "Reader), or through kvckpt's Lightning CheckpointIO"
        )


def register_fsspec() -> Callable[[], None]:
    """Register the view for kvckpt's schemes (replacing any earlier registration); idempotent.

    Returns what puts back the registrations it replaced (``kvckpt.uninstall``). fsspec has no public
    way to drop a protocol, so a scheme nobody had registered is removed from its registry dict.
    """
    with _registered:
        before = {scheme: registry.get(scheme) for scheme in SCHEMES}
        for scheme in SCHEMES:
            register_implementation(scheme, KVCheckpointFileSystem, clobber=True)

    def restore() -> None:
        with _registered:
            for scheme, implementation in before.items():
                if implementation is not None:
                    register_implementation(scheme, implementation, clobber=True)
                else:
                    fsspec_classes.pop(scheme, None)

    return restore
