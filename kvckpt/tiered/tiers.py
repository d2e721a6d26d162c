"""The durable tier beside the store: where drained checkpoints live and which one a restart takes.

A drained checkpoint is a plain DCP checkpoint (a local folder or an fsspec URL such as ``s3://…``)
holding, beside DCP's own files, ``.kvckpt-drained.json``. That file is written last and is what makes
a copy complete: a folder without it is a copy that was cut short, whatever else it holds. It is JSON
(never a pickle) and says which store checkpoint was copied, its generation, its step and its commit
time by the store's clock, so listing the tier and choosing a restart point never unpickles DCP's
``.metadata``.

Write before delete: a copy replacing another of the same name is completed in a staging folder
beside it (``.NAME.kvckpt-XXXXXXXX``) and only then moved onto the name (:meth:`Destination.install`),
so at every moment, a kill included, the name has a complete copy in place or in staging. Readers
take the copy in place, else the staged one; the next drainer moves a staged copy into place.

Torch-free: the ``kvckpt`` command and a launcher choosing a restart point do not import torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

from kvckpt.errors import (
    InvalidCheckpointIdError,
    KVCheckpointError,
    MissingDependencyError,
    StoreUnavailableError,
)
from kvckpt.management import api as manage
from kvckpt.management import catalog
from kvckpt.registry import owns, parse_url, schemes
from kvckpt.urls import redact, scheme_of

log = logging.getLogger(__name__)

#: Written last into a drained checkpoint: present means complete.
MARKER = ".kvckpt-drained.json"
#: Written first into a copy made in place (object stores, where nothing can be renamed atomically).
IN_PROGRESS = ".kvckpt-draining.json"
FORMAT = "kvckpt-drained/1"
#: Sibling folders of NAME: a copy written before it takes the name ("kvckpt"), or the copy it
#: replaced, moved aside until it is removed ("old", local folders only).
_STAGING = re.compile(r"\.(?P<base>.+)\.(?P<kind>kvckpt|old)-[a-z0-9_]{8}")
#: Which complete copy of a name the next drainer keeps: the staged replacement was written after the
#: copy in place, which is newer than one moved aside.
_RANK = {"kvckpt": 2, "": 1, "old": 0}


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
    #: The store's clock at the source's commit; None in copies drained before it was recorded.
    commit_clock: float | None = None


@dataclass(frozen=True)
class _Copy:
    """A complete copy found on the tier: at its name, or staged beside it."""

    checkpoint: DrainedCheckpoint
    folder: str  # the folder holding the marker
    root: str  # what removing it removes: the staging folder (earlier drainers nested the copy in it)
    kind: str  # "" in place, else the staging kind

    @property
    def rank(self) -> tuple[int, float]:
        return (_RANK[self.kind], self.checkpoint.drained_at)


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

    def staged_name(self, name: str, kind: str = "kvckpt") -> str:
        """A fresh staging name beside ``name``: ``parent/.BASE.KIND-XXXXXXXX``."""
        parent, _, base = name.rpartition("/")
        staged = f".{base}.{kind}-{secrets.token_hex(4)}"
        return f"{parent}/{staged}" if parent else staged

    def is_complete(self, name: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(f"{self.path(name)}/{MARKER}"))

    def _files(self) -> list[str]:
        self.fs.invalidate_cache()  # another process (the drainer) changes the tier
        if not self.fs.exists(self.root):
            return []
        return [str(p) for p in self.fs.find(self.root, withdirs=True)]

    def _placement(self, folder: str) -> tuple[str, str, str] | None:
        """(name, root, kind) of a folder holding a marker; None for one that is no copy of a name."""
        parts = folder[len(self.root) + 1 :].split("/")
        staged = [i for i, part in enumerate(parts) if _STAGING.fullmatch(part)]
        if not staged:
            return ("/".join(parts), folder, "") if parts != [""] else None
        at = staged[0]
        match = _STAGING.fullmatch(parts[at])
        assert match is not None
        if parts[at + 1 :] not in ([], [match["base"]]):
            return None
        root = "/".join([self.root, *parts[: at + 1]])
        return "/".join([*parts[:at], match["base"]]), root, match["kind"]

    def _copies(self, files: list[str]) -> dict[str, list[_Copy]]:
        """Every complete copy, in place or staged, by name."""
        found: dict[str, list[_Copy]] = {}
        for path in files:
            folder, _, base = path.rpartition("/")
            placed = self._placement(folder) if base == MARKER else None
            if placed is None:
                continue
            name, root, kind = placed
            try:
                checkpoint = self._read_marker(name, folder, self.fs.cat_file(path))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping %s: its %s cannot be read (%s)", self.url_of(folder), MARKER, exc)
                continue
            found.setdefault(name, []).append(_Copy(checkpoint, folder, root, kind))
        return found

    def checkpoints(self) -> list[DrainedCheckpoint]:
        """One complete copy per name, oldest source first (kvckpt.management.catalog.newest_last: the store's
        order); damaged markers are skipped.

        The copy at the name where it is complete, else (a replacement cut short or still being moved
        into place) the staged one: its ``checkpoint_id`` is then the staging folder's.
        """
        found = []
        for copies in self._copies(self._files()).values():
            in_place = [c for c in copies if not c.kind]
            found.append((in_place or [max(copies, key=lambda c: c.rank)])[0].checkpoint)
        return catalog.newest_last(found, lambda c: c.name)

    def url_of(self, folder: str) -> str:
        """The id for readers of a filesystem path below the prefix (what :meth:`url` is to a name)."""
        return self.prefix + folder[len(self.root) :]

    def _read_marker(self, name: str, folder: str, raw: bytes) -> DrainedCheckpoint:
        body = json.loads(raw)
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {FORMAT!r}")
        clock = body.get("commit_clock")
        return DrainedCheckpoint(
            checkpoint_id=self.url_of(folder),
            name=name,
            source=str(body["source"]),
            namespace=str(body["namespace"]),
            save_id=str(body["save_id"]),
            created=float(body["created"]),
            total_bytes=int(body["total_bytes"]),
            drained_at=float(body["drained_at"]),
            step=None if body.get("step") is None else int(body["step"]),
            commit_clock=None if clock is None else float(clock),
        )

    def partials(self) -> list[str]:
        """Paths of copies cut short: staging folders and in-place copies without a marker."""
        files = self._files()
        complete = {c.root for copies in self._copies(files).values() for c in copies}
        markers = {p.rpartition("/")[0] for p in files if p.endswith("/" + MARKER)}
        found = [p.rpartition("/")[0] for p in files if p.endswith("/" + IN_PROGRESS)]
        partial = [p for p in found if p not in markers]
        staging = [p for p in files if _STAGING.fullmatch(p.rpartition("/")[2]) and self.fs.isdir(p)]
        return sorted(set(partial + staging) - complete)

    def recover(self) -> list[str]:
        """Leave each name exactly one complete copy, at the name; returns what was done, to log.

        Where a replacement was cut short after its copy was complete, the newest complete copy (a
        staged replacement, else the one in place, else one moved aside) is moved onto the name and
        only then are the others removed, so no step leaves a name without a complete copy.
        """
        done = []
        for name, copies in self._copies(self._files()).items():
            staged = [c for c in copies if c.kind]
            if not staged:
                continue
            keep = max(copies, key=lambda c: c.rank)
            if keep.kind:
                self.install(keep.folder, name, keep.root)
                done.append(f"moved the complete copy {self.url_of(keep.folder)} onto {self.url(name)}")
            for other in staged:
                if other is not keep:
                    self._drop(other.folder, other.root)
                    done.append(f"removed {self.url_of(other.root)}, a replaced copy of {self.url(name)}")
        return done

    def install(self, folder: str, name: str, root: str | None = None) -> None:
        """Move the complete copy in ``folder`` onto ``name``, replacing the copy there.

        A local folder is renamed: the copy in place moves aside first (a folder cannot be renamed
        over a non-empty one), and between the two renames readers find both complete copies
        staged. An object store cannot rename: the copy in place is removed (marker first), the
        staged files are copied onto the name with ``.metadata`` and then the marker last, and only
        then is the staged copy removed. ``root`` is the staging folder holding ``folder``.
        """
        final = self.path(name)
        if self.local:
            retired = None
            if os.path.lexists(final):
                retired = self.path(self.staged_name(name, "old"))
                os.rename(final, retired)
            os.rename(folder, final)
            if retired is not None:
                self.remove(retired)
            if root is not None and root != folder:
                self.remove(root)
            return
        self.remove(final)
        self.fs.invalidate_cache()
        files = sorted((str(p) for p in self.fs.find(folder)), key=lambda p: p.endswith("/.metadata"))
        for path in [p for p in files if not p.endswith("/" + MARKER)] + [f"{folder}/{MARKER}"]:
            self.fs.copy(path, final + path[len(folder) :])
        self._drop(folder, root or folder)

    def _drop(self, folder: str, root: str) -> None:
        self.remove(folder)
        if root != folder:
            self.remove(root)

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
    """Complete drained checkpoints under a durable prefix, oldest first, as the store orders its own
    (by step when every copy recorded one, else by the store's commit clock: docs/record-format.md)."""
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

    "Newest" is in ``kvckpt.latest``'s order over the checkpoints of both tiers together (by step
    when every one of them recorded a step, else by the store's commit clock), so a store holding
    something newer than the durable tier wins, and a store that lost its checkpoints (flushed,
    restarted, expired) or cannot be reached falls back to the durable tier. Returns an id
    ``kvckpt.load`` takes (a store URL with the prefix's own credentials, a folder path or an
    fsspec URL), or None when neither tier has a checkpoint.
    """
    try:
        in_memory = manage.list_checkpoints(memory_prefix, client=client, **store_options)
    except StoreUnavailableError as exc:
        log.warning("the store is unreachable (%s); resuming from the durable tier", exc)
        in_memory = []
    drained = durable_checkpoints(durable_prefix, storage_options=storage_options)
    stepped = catalog.by_step([*in_memory, *drained])  # one order over both tiers together

    def key(checkpoint: catalog.Ordered) -> tuple[int, bool, float]:
        return catalog.order_key(checkpoint, stepped=stepped)

    stored = max(in_memory, key=lambda c: (key(c), c.namespace), default=None)
    copied = max(drained, key=lambda c: (key(c), c.name), default=None)
    if stored is not None and (copied is None or key(stored) >= key(copied)):
        namespace = stored.namespace
        if client is not None:
            return namespace
        return parse_url(memory_prefix).with_namespace(namespace).to_url(redact=False)
    return copied.checkpoint_id if copied is not None else None
