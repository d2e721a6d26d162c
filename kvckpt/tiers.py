"""The durable tier beside the store: where drained checkpoints live and which one a restart takes.

A drained checkpoint is a plain DCP checkpoint (a local folder or an fsspec URL such as ``s3://…``)
holding, beside DCP's own files, ``.kvckpt-drained.json``. That file is written last and is what makes
a copy complete: a folder without it is a copy that was cut short, whatever else it holds. It is JSON
(never a pickle) and says which store checkpoint was copied, its generation and its commit time, so
listing the tier and choosing a restart point never unpickles DCP's ``.metadata``.

Torch-free: the ``kvckpt`` command and a launcher choosing a restart point do not import torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from kvckpt import manage
from kvckpt.errors import (
    InvalidCheckpointIdError,
    KVCheckpointError,
    MissingDependencyError,
    StoreUnavailableError,
)
from kvckpt.registry import owns, parse_url, schemes
from kvckpt.urls import redact, scheme_of

log = logging.getLogger(__name__)

#: Written last into a drained checkpoint: present means complete.
MARKER = ".kvckpt-drained.json"
#: Written first into a copy made in place (object stores, where nothing can be renamed atomically).
IN_PROGRESS = ".kvckpt-draining.json"
FORMAT = "kvckpt-drained/1"
#: The sibling folders a local copy is written into before it is renamed into place.
_STAGING = re.compile(r"\..+\.(kvckpt|old)-[a-z0-9_]{8}")


@dataclass(frozen=True)
class DrainedCheckpoint:
    """One complete copy on the durable tier."""

    checkpoint_id: str  # folder path or fsspec URL: kvckpt.load, FileSystemReader or FsspecReader take it
    name: str  # its path below the durable prefix
    source: str  # the store checkpoint it was copied from, credentials redacted
    namespace: str
    save_id: str  # the source's generation
    created: float  # when the source was committed (Unix seconds)
    total_bytes: int
    drained_at: float
    step: int | None = None  # the source's recorded step (kvckpt.save(..., step=N)), if any

    @property
    def order(self) -> tuple[bool, int, float]:
        """Newest last, as the store orders its checkpoints: by step where recorded, then commit time."""
        return (self.step is not None, self.step or 0, self.created)


def open_fsspec(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's filesystem and path for a folder or URL; a scheme it cannot open is a typed error."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(location, **(storage_options or {}))
    except ImportError as exc:
        raise MissingDependencyError(
            f"{redact(location)} needs a package fsspec could not import ({exc}); for s3:// pip "
            "install s3fs (or 'kvckpt[s3]')"
        ) from exc
    except ValueError as exc:
        raise InvalidCheckpointIdError(
            f"{redact(location)} is neither a kvckpt URL ({', '.join(schemes())}) nor a folder or URL "
            f"fsspec can open ({exc})"
        ) from exc
    return fs, str(path)


class Destination:
    """A durable prefix opened through fsspec (a local path or any fsspec URL)."""

    def __init__(self, prefix: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        text = os.fspath(prefix)
        if owns(text):
            raise KVCheckpointError(
                f"{redact(text)} is a kvckpt store URL; the durable tier is a local folder or an fsspec "
                "URL such as s3://bucket/prefix"
            )
        self.local = scheme_of(text) in (None, "file")
        self.storage_options = dict(storage_options or {})
        self.fs, root = open_fsspec(text, self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.prefix = self.root if self.local else text.rstrip("/")

    def path(self, name: str) -> str:
        """The filesystem path of ``name`` (what ``self.fs`` takes)."""
        return f"{self.root}/{name}"

    def url(self, name: str) -> str:
        """The id of ``name`` for readers: a local path, or the URL with its scheme."""
        return f"{self.prefix}/{name}"

    def _files(self) -> list[str]:
        self.fs.invalidate_cache()  # another process (the drainer) changes the tier
        if not self.fs.exists(self.root):
            return []
        return [str(p) for p in self.fs.find(self.root, withdirs=True)]

    def checkpoints(self) -> list[DrainedCheckpoint]:
        """Complete copies under the prefix, oldest source commit first; damaged markers are skipped."""
        found = []
        for path in self._files():
            folder, _, base = path.rpartition("/")
            if base != MARKER:
                continue
            name = folder[len(self.root) + 1 :]
            if not name or any(_STAGING.fullmatch(part) for part in name.split("/")):
                continue
            try:
                found.append(self._read_marker(name, self.fs.cat_file(path)))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping %s: its %s cannot be read (%s)", self.url(name), MARKER, exc)
        return sorted(found, key=lambda c: (*c.order, c.name))

    def _read_marker(self, name: str, raw: bytes) -> DrainedCheckpoint:
        body = json.loads(raw)
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {FORMAT!r}")
        return DrainedCheckpoint(
            checkpoint_id=self.url(name),
            name=name,
            source=str(body["source"]),
            namespace=str(body["namespace"]),
            save_id=str(body["save_id"]),
            created=float(body["created"]),
            total_bytes=int(body["total_bytes"]),
            drained_at=float(body["drained_at"]),
            step=None if body.get("step") is None else int(body["step"]),
        )

    def partials(self) -> list[str]:
        """Paths of copies cut short: local staging folders, in-place copies without a marker."""
        files = self._files()
        markers = {p.rpartition("/")[0] for p in files if p.endswith("/" + MARKER)}
        found = [p.rpartition("/")[0] for p in files if p.endswith("/" + IN_PROGRESS)]
        partial = [p for p in found if p not in markers]
        staging = [p for p in files if _STAGING.fullmatch(p.rpartition("/")[2]) and self.fs.isdir(p)]
        return sorted(set(partial + staging))

    def write_marker(self, folder: str, name: str, body: dict[str, Any]) -> None:
        self.fs.pipe_file(f"{folder}/{name}", json.dumps({"format": FORMAT, **body}).encode())

    def remove(self, path: str) -> None:
        """Remove a copy: its marker first, so it stops counting as complete before anything else goes."""
        marker = f"{path}/{MARKER}"
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def durable_checkpoints(
    prefix: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> list[DrainedCheckpoint]:
    """Complete drained checkpoints under a durable prefix, oldest first (by step, then commit time)."""
    return Destination(prefix, storage_options).checkpoints()


def newest_restorable(
    memory_prefix: str,
    durable_prefix: str | os.PathLike[str],
    *,
    client: Any = None,
    storage_options: dict[str, Any] | None = None,
    **store_options: Any,
) -> str | None:
    """The checkpoint to resume from: the newest committed one in the store, else the newest drained one.

    "Newest" is by the recorded step where one is recorded, else by the source's commit time (as
    ``kvckpt.latest`` orders), so a store holding something newer than the durable tier wins, and a
    store that lost its checkpoints (flushed, restarted, expired) or cannot be reached falls back to
    the durable tier. Returns an id ``kvckpt.load`` takes (a store URL with the prefix's
    own credentials, a folder path or an fsspec URL), or None when neither tier has a checkpoint.
    """
    try:
        in_memory = manage.list_checkpoints(memory_prefix, client=client, **store_options)
    except StoreUnavailableError as exc:
        log.warning("the store is unreachable (%s); resuming from the durable tier", exc)
        in_memory = []
    drained = durable_checkpoints(durable_prefix, storage_options=storage_options)
    if in_memory and (not drained or in_memory[-1].order()[:3] >= drained[-1].order):
        namespace = in_memory[-1].namespace
        if client is not None:
            return namespace
        return parse_url(memory_prefix).with_namespace(namespace).to_url(redact=False)
    return drained[-1].checkpoint_id if drained else None
