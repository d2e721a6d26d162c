"""Drain committed checkpoints from a kvckpt store to durable storage, in a process beside the job.

The drainer polls the store prefix (a SCAN of records, as ``kvckpt ls``), picks what is due and copies
it with :mod:`kvckpt.tiered.copy`'s bounded streaming: checksums are verified as the store is read, at
most ``group_bytes`` of it is held, and what lands is a plain DCP checkpoint written by DCP's own
``FileSystemWriter`` (local folders) or ``FsspecWriter`` (``s3://…`` and any fsspec URL).

A copy is complete only once ``.kvckpt-drained.json`` is in it (:mod:`kvckpt.tiered.tiers`), and a copy is
never removed before its replacement is complete: a local copy is written into a hidden sibling
folder and renamed into place with its marker; on an object store (no rename) the first copy of a
name is written in place with ``.kvckpt-draining.json`` first and the marker last, and a replacement
is completed in a sibling folder and then copied onto the name. A copy cut short (a crash, kill -9, a
power loss) is removed by the next drainer to start and done again if it is still due; a complete
replacement cut short while taking its name is moved into place. The trainer's save path is
untouched: the drainer only reads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta

from kvckpt import humanize
from kvckpt.arguments import mapping, seconds, whole
from kvckpt.dcp.reader import KVStorageReader
from kvckpt.errors import (
    CheckpointChangedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    KVCheckpointError,
)
from kvckpt.integrations.torch_private import fsspec_writer
from kvckpt.management import api as manage
from kvckpt.management.api import CheckpointInfo
from kvckpt.registry import parse_url
from kvckpt.tiered.copy import METADATA_FILE, CopyPlan, StagedFolderWriter, plan_for, write_copy
from kvckpt.tiered.tiers import IN_PROGRESS, MARKER, Destination
from kvckpt.urls import redact

log = logging.getLogger("kvckpt.drain")

#: s3fs buffers a whole upload part (50 MiB by default) per open file, on top of the group being
#: copied; 8 MiB parts keep a drain to S3 near the folder's memory (S3's minimum part is 5 MiB).
UPLOAD_PART_BYTES = 8 << 20
#: What a drain holds by default: half of cp's, as it runs for days beside a job on a shared host.
DRAIN_GROUP_BYTES = 32 << 20


@dataclass(frozen=True)
class Drained:
    """One finished copy."""

    source: str  # credentials redacted
    destination: str
    nbytes: int
    seconds: float


class _Throttle:
    """Sleeps as items are handed over so a copy averages at most ``rate`` bytes per second."""

    def __init__(self, rate: float) -> None:
        self.rate, self.moved, self.started = rate, 0, time.perf_counter()

    def __call__(self, nbytes: int) -> None:
        self.moved += nbytes
        ahead = self.moved / self.rate - (time.perf_counter() - self.started)
        if ahead > 0:
            time.sleep(ahead)


@functools.cache
def _staged_fsspec_writer() -> Callable[..., FileSystemWriter]:
    """DCP's FsspecWriter is private to torch: the subclass is made on the first drain to fsspec."""
    base: Any = fsspec_writer()

    class StagedFsspecWriter(base):  # type: ignore[misc]
        """Writes a staged copy but records the name it will be moved onto, as a local copy does."""

        def __init__(self, staging: str, final: str, **options: Any) -> None:
            super().__init__(staging, sync_files=False, **options)
            self._final = final

        def storage_meta(self) -> StorageMeta | None:
            return StorageMeta(checkpoint_id=self._final, save_id=self.save_id)

    return StagedFsspecWriter


class CopyAbandoned(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the copy in progress was dropped (and its partial removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"abandoned on signal {signum}")
        self.signum = signum


class Drainer:
    """Follow the committed checkpoints under ``source`` and copy the due ones to ``destination``.

    Pending: the committed checkpoints whose generation (namespace and save_id) has no complete
    copy, that the store orders after the newest generation that has one (``kvckpt ls`` order: by
    step where recorded, then by the store's commit clock: one store's order, not a saving host's
    clock, and never compared with what another store recorded). Those ordered before it are handled: a newer
    one was drained, and restoring never picks them. Due: every ``every``-th pending checkpoint, or,
    with ``interval`` seconds, the newest pending one once that long has passed since the last copy.
    When several are due at once (the drainer fell behind) only the newest is copied and the others
    count as handled once it is. ``keep`` bounds how many complete copies stay at the destination
    (the oldest in that order go first).
    ``max_rate`` (bytes per second) caps a copy's average rate, leaving the store's CPU and network
    to the trainer's saves.
    """

    def __init__(
        self,
        source: str,
        destination: str | Path,
        *,
        every: int = 1,
        interval: float | None = None,
        keep: int | None = None,
        poll: float = 2.0,
        group_bytes: int = DRAIN_GROUP_BYTES,
        max_rate: float | None = None,
        client: Any = None,
        store_options: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        whole("Drainer", 1, every=every, group_bytes=group_bytes)
        whole("Drainer", 1, none=True, keep=keep)
        seconds("Drainer", poll=poll)
        seconds("Drainer", none=True, interval=interval)
        mapping("store_options", store_options)
        mapping("storage_options", storage_options)
        if max_rate is not None and (
            isinstance(max_rate, bool) or not isinstance(max_rate, int | float) or not max_rate > 0
        ):
            raise InvalidArgumentError(
                f"Drainer: max_rate={max_rate!r:.60}: expected bytes per second > 0, or None for no cap",
                options=["max_rate"],
            )
        if interval is not None and every != 1:
            raise InvalidArgumentError(
                f"Drainer: interval={interval!r} replaces every={every!r}; pass one of the two",
                options=["interval", "every"],
            )
        self.source, self.every, self.interval, self.keep, self.poll = source, every, interval, keep, poll
        self.group_bytes, self.max_rate, self.client = group_bytes, max_rate, client
        self.store_options = dict(store_options or {})
        self.destination = Destination(destination, storage_options)
        self.prefix = source if client is not None else parse_url(source).namespace
        self.stopping = threading.Event()
        self._skip: set[tuple[str, str]] = set()  # damaged or unnameable: not retried by this process
        self._refused = False  # a checkpoint was skipped as damaged or unnameable
        self._started = time.time()
        self._reader: KVStorageReader | None = None

    def stop(self) -> None:
        """Stop after the copy in progress (safe from a signal handler or another thread)."""
        self.stopping.set()

    # Choosing --------------------------------------------------------------------------------------

    def due(self) -> CheckpointInfo | None:
        """The checkpoint to copy now, or None."""
        stored = manage.list_checkpoints(self.source, client=self.client, **self.store_options)
        drained = self.destination.checkpoints()
        done = {(d.namespace, d.save_id) for d in drained}
        copied = [at for at, info in enumerate(stored) if (info.namespace, info.save_id) in done]
        after = stored[copied[-1] + 1 :] if copied else stored
        fresh = [info for info in after if (info.namespace, info.save_id) not in self._skip]
        if self.interval is not None:  # a rate limit: the drainer's own clock is the one to use
            since = max((d.drained_at for d in drained), default=self._started - self.interval)
            return fresh[-1] if fresh and time.time() - since >= self.interval else None
        rounds = len(fresh) // self.every
        if rounds == 0:
            return None
        if rounds > 1:
            log.info("behind: skipping %d older due checkpoint(s) for the newest", rounds - 1)
        return fresh[rounds * self.every - 1]

    def _name(self, namespace: str) -> str | None:
        """The checkpoint's path below the destination: its namespace below the source prefix."""
        relative = namespace[len(self.prefix) :].strip("/") or namespace.rsplit("/", 1)[-1]
        parts = relative.split("/")
        if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
            return None
        return relative

    # Copying ---------------------------------------------------------------------------------------

    def drain_one(self, info: CheckpointInfo) -> Drained | None:
        """Copy one checkpoint; None when it was skipped (gone from the store, damaged, unnameable)."""
        key = (info.namespace, info.save_id)
        name = self._name(info.namespace)
        if name is None:
            log.error("skipping %s: its name cannot be a path below the destination", info.checkpoint_id)
            self._skip.add(key)
            self._refused = True
            return None
        source_id = info.namespace
        if self.client is None:
            source_id = parse_url(self.source).with_namespace(info.namespace).to_url(redact=False)
        target = self.destination.url(name)
        log.info("copying %s (%s) -> %s", info.checkpoint_id, humanize.size(info.total_bytes), target)
        started = time.perf_counter()
        try:
            reader = self._reader_for(source_id)
            metadata = reader.read_metadata()
            save_id = metadata.storage_meta.save_id if metadata.storage_meta else None
            # An object store's upload buffer holds a second copy of the file being written.
            group = self.group_bytes if self.destination.local else max(1, self.group_bytes // 2)
            plan = plan_for(reader, metadata, group)
            marker = {
                "source": info.checkpoint_id,
                "namespace": info.namespace,
                "save_id": save_id or info.save_id,
                "created": info.created,
                "commit_clock": info.commit_clock,
                "step": info.step,
                "total_bytes": plan.nbytes,
                "items": plan.items,
            }
            self._write(name, reader, plan, marker, started)
        except (CheckpointNotFoundError, CheckpointChangedError) as exc:
            log.warning("skipped %s: deleted or replaced in the store during the copy (%s)", target, exc)
            self._skip.add(key)  # a replacement is another generation, due on its own
            return None
        except CorruptCheckpointError as exc:
            log.error("skipped %s: it is damaged in the store, nothing was written (%s)", target, exc)
            self._skip.add(key)
            self._refused = True
            return None
        seconds = time.perf_counter() - started
        log.info(
            "drained %s -> %s: %s in %s (%s)",
            info.checkpoint_id,
            target,
            humanize.size(plan.nbytes),
            humanize.duration(seconds),
            humanize.rate(plan.nbytes, seconds),
        )
        self._keep_newest()
        return Drained(info.checkpoint_id, target, plan.nbytes, seconds)

    def _throttle(self) -> _Throttle | None:
        return None if self.max_rate is None else _Throttle(self.max_rate)

    def _reader_for(self, checkpoint_id: str) -> KVStorageReader:
        """One reader for the drainer's life: it keeps its connection while the server stays the same."""
        if self._reader is None:
            # allow_pickle=True is truthful: a copy hands non-tensor values on as the stored bytes.
            options = self.store_options
            self._reader = KVStorageReader(client=self.client, store_options=options, allow_pickle=True)
        self._reader.reset(checkpoint_id)
        return self._reader

    def _write(
        self, name: str, reader: KVStorageReader, plan: CopyPlan, marker: dict[str, Any], started: float
    ) -> None:
        """Write the copy where no complete copy of ``name`` is, then move it onto ``name``.

        A complete copy already at ``name`` is removed only once its replacement is complete: what
        is cut short before is a partial the next drainer removes, what is cut short after is a
        complete staged copy readers take and the next drainer moves into place.
        """
        dest = self.destination
        final = dest.path(name)
        if dest.local:
            _refuse_foreign(Path(final))
        in_place = not dest.local and not dest.is_complete(name)  # nothing there to keep
        folder = final if in_place else dest.path(dest.staged_name(name))
        try:
            if dest.local:
                os.makedirs(folder)
                writer: FileSystemWriter = StagedFolderWriter(Path(folder), Path(final))
            else:
                options = dict(dest.storage_options)
                if "s3" in dest.fs.protocol:  # a name or a tuple of names
                    options.setdefault("default_block_size", UPLOAD_PART_BYTES)
                if in_place:
                    dest.remove(folder)  # what a drainer cut short left: it has no marker
                    dest.write_marker(folder, IN_PROGRESS, {})
                writer = _staged_fsspec_writer()(dest.url_of(folder), dest.url(name), **options)
            write_copy(reader, plan, writer, self._throttle())
            finished = {"drained_at": time.time(), "seconds": time.perf_counter() - started}
            dest.write_marker(folder, MARKER, {**marker, **finished})
            if in_place:
                dest.fs.rm(f"{folder}/{IN_PROGRESS}")
        except BaseException:
            with contextlib.suppress(Exception):
                dest.remove(folder)
            raise
        if not in_place:  # complete from here on: if this is cut short, the copy stays and is found
            dest.install(folder, name)

    def _keep_newest(self) -> None:
        if self.keep is None:
            return
        drained = self.destination.checkpoints()
        for old in drained[: max(0, len(drained) - self.keep)]:
            self.destination.remove(self.destination.path(old.name))
            log.info("removed %s (keeping the newest %d)", old.checkpoint_id, self.keep)

    def clean_partials(self) -> None:
        """Remove copies a previous drainer was stopped in the middle of; move complete ones into place."""
        for path in self.destination.partials():
            log.warning("removing %s: a copy that was cut short", path)
            self.destination.remove(path)
        for done in self.destination.recover():
            log.warning("%s: a replacement that was cut short", done)

    # Running ---------------------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> int:
        """Drain until :meth:`stop` (or, with ``once``, until nothing is due). Returns an exit status.

        0: stopped cleanly, or with ``once`` everything due was copied or skipped because it left the
        store; 1: with ``once``, a copy failed, a checkpoint was damaged, or the store could not be
        listed (following, failures are logged and retried at the next poll).
        """
        self.clean_partials()
        failed = untidy = False
        while not self.stopping.is_set():
            try:
                if untidy:  # a copy the destination failed under may be partial, or complete but staged
                    self.clean_partials()
                    untidy = False
                info = self.due()
                if info is not None and not self.stopping.is_set():  # a signal during the listing
                    self.drain_one(info)
                    continue  # look again at once: another may be due by now
            except KVCheckpointError as exc:
                log.error("%s", exc)
                failed = True
            except Exception as exc:  # the destination failed (disk full, object store error)
                log.error("copy failed: %s: %s", type(exc).__name__, exc)
                failed = untidy = True
            if once:
                return 1 if failed or self._refused else 0
            self.stopping.wait(self.poll)
        return 0


def _refuse_foreign(path: Path) -> None:
    """A folder at the copy's name holding files but no DCP checkpoint is not the drainer's to replace."""
    if path.is_dir() and any(path.iterdir()) and not (path / METADATA_FILE).is_file():
        raise CheckpointExistsError(
            f"{path} already holds files that are not a DCP checkpoint; choose another destination",
            checkpoint_id=str(path),
        )
    if path.exists() and not path.is_dir():
        raise CheckpointExistsError(f"{path} exists and is not a folder", checkpoint_id=str(path))


@contextlib.contextmanager
def signals_stop(drainer: Drainer) -> Iterator[None]:
    """SIGINT/SIGTERM once: finish the copy in progress, then stop. Twice: abandon it (CopyAbandoned)."""
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            log.warning("signal %d: finishing the copy in progress, then stopping (again: abandon)", signum)
            drainer.stop()
        else:
            log.warning("signal %d again: abandoning the copy in progress", signum)
            raise CopyAbandoned(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Redacting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def run_command(source: str, destination: str, *, once: bool, **options: Any) -> int:
    """``kvckpt drain``: log to stderr (passwords redacted), stop on signals, return the exit status."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s kvckpt drain: %(message)s"))
    handler.addFilter(_Redacting())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    drainer = Drainer(source, destination, **options)
    try:
        with signals_stop(drainer):
            return drainer.run(once=once)
    except CopyAbandoned as abandoned:
        log.warning("abandoned the copy in progress; nothing of it is left at the destination")
        return 128 + abandoned.signum
    finally:
        log.removeHandler(handler)
