"""Committing a save's record under the rule of docs/protocol.md, and removing what a save leaves.

Torch-free: the DCP writer hands over the encoded record and the keys it names. The commit lands only
while the save's liveness marker exists (KVStore.commit); a commit whose reply was lost is fenced by
removing the marker, then the record is read to learn what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kvckpt import layout, record
from kvckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    KVCheckpointError,
    StoreUnavailableError,
)
from kvckpt.store import Commit, KVStore

log = logging.getLogger(__name__)


@dataclass
class Committer:
    """One save's commit: where its record goes and what to do when it will not land."""

    store: KVStore
    record_key: str
    display: str
    overwrite: bool
    ttl: float | None
    live_ttl: float
    #: Removes every key of the save (and its ``.unfinished`` marker) once it will not commit.
    abandon: Callable[[list[str]], None]
    #: Set once the liveness marker needs no removal any more: consumed, fenced, or unreachable.
    marker_settled: bool = False

    def commit(self, data: bytes, keys: list[str], hint: bytes | None, marker: str | None) -> Commit:
        """Write the record ``data`` naming ``keys``; returns a written Commit or raises, after
        removing the save's data, a typed error saying nothing was committed. ``hint`` is the
        record read before (what a lost swap replaced); ``marker`` is None without a heartbeat."""
        if marker is None or not self.store.capabilities.conditional_commit:
            return self._unconditionally(data, keys, hint)
        try:
            outcome = self.store.commit(
                self.record_key, data, live_key=marker, create=not self.overwrite, ttl=self.ttl
            )
        except StoreUnavailableError as exc:
            outcome = self._learn_outcome(data, keys, marker, hint, exc)
        except KVCheckpointError:  # the server refused the commit (e.g. out of memory)
            self.abandon(keys)
            raise
        self.marker_settled = self.marker_settled or outcome.written
        if outcome.written:
            return outcome
        self.abandon(keys)
        if not outcome.alive:
            raise CorruptCheckpointError(
                f"{self.display}: this save's liveness marker lapsed (it was not refreshed for "
                f"{self.live_ttl:g} s: the process stalled or the store was unreachable), so kvckpt.gc "
                "may have removed its data; nothing was committed: save again",
                key=marker,
            )
        raise self._exists()

    def _unconditionally(self, data: bytes, keys: list[str], hint: bytes | None) -> Commit:
        """A backend without KVStore.commit: put-if-absent or swap, sent once (kvckpt.gc refuses
        such a store, since it cannot tell a dead save from one about to commit)."""
        try:
            if self.overwrite:
                return Commit(True, True, self.store.swap(self.record_key, data, ttl=self.ttl))
            written = self.store.put(self.record_key, data, create=True, ttl=self.ttl)
        except StoreUnavailableError as exc:
            if self._read(exc) != data:
                self.abandon(keys)
                raise self._not_committed() from exc
            return Commit(True, True, hint)
        except KVCheckpointError:
            self.abandon(keys)
            raise
        if not written:
            self.abandon(keys)
            raise self._exists()
        return Commit(True, True)

    def _learn_outcome(
        self, data: bytes, keys: list[str], marker: str, hint: bytes | None, exc: Exception
    ) -> Commit:
        """Removing the marker is the fence: a commit still on its way then finds no marker and
        changes nothing, so the record read afterwards is final. No CLIENT permission is needed.
        When the store cannot even be reached the data is kept, as the commit may have landed."""
        try:
            self.store.delete(marker)
        except KVCheckpointError:
            raise self._unknown() from exc
        finally:
            self.marker_settled = True
        current = self._read(exc)
        if current == data:
            log.warning("%s: the commit's reply was lost, but the record is this save's", self.display)
            return Commit(written=True, alive=True, previous=hint)
        if current is not None and not self.overwrite:
            return Commit(written=False, alive=True)
        self.abandon(keys)
        raise self._not_committed() from exc

    def _read(self, exc: Exception) -> bytes | None:
        try:
            return self.store.get(self.record_key)
        except KVCheckpointError:
            raise self._unknown() from exc

    def _exists(self) -> CheckpointExistsError:
        return CheckpointExistsError(
            f"Checkpoint already exists: another save committed {self.display} first; this save's "
            "data was removed",
            checkpoint_id=self.display,
        )

    def _unknown(self) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{self.display}: the connection failed while committing and the store is still "
            "unreachable, so whether this save committed is unknown; its data was kept. Load the "
            "checkpoint once the store is back to find out, and save again if it is missing",
            checkpoint_id=self.display,
        )

    def _not_committed(self) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{self.display}: the connection failed while committing; the commit did not take effect, "
            "nothing was committed and this save's data was removed; save again",
            checkpoint_id=self.display,
        )


def left_to_gc(exc: BaseException, left: list[str]) -> None:
    """Say in a failed save's error what its cleanup could not remove (``left``): the store stopped
    answering before the save's deadline (kvckpt.deadline), and waiting on it again would break the
    promise that a hung store fails a save within its total_timeout. What is left is harmless: no
    record names it, gc removes it, and it expires."""
    note = f"cleaning up was left to kvckpt.gc and expiry: {', '.join(left)} could not be removed in time"
    if isinstance(exc, KVCheckpointError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}; {note}",)  # the message, kept with the error's type and fields
    else:  # not ours to reword (an interrupt, a torch error): the log says it
        log.warning("%s", note)


def discard(store: KVStore, keys: list[str]) -> bool:
    """Best-effort removal after a failure; what remains still expires through pending_ttl.
    True when every key is gone."""
    step = store.capabilities.max_batch_ops
    try:
        for start in range(0, len(keys), step):
            store.delete_many(keys[start : start + step])
    except KVCheckpointError as exc:
        log.warning("could not remove %d uncommitted key(s): %s", len(keys), exc)
        return False
    return True


def retire(store: KVStore, namespace: str, previous: bytes, keep: set[str]) -> None:
    """Delete the chunks of the record an overwrite replaced that the new one does not name
    (generations are per save, so no other record names them); a damaged old record only costs a
    warning."""
    try:
        old = [layout.full_key(namespace, k) for k in record.chunk_keys(record.decode_record(previous, ""))]
    except KVCheckpointError as exc:
        log.warning("%s: could not read the replaced record to delete its data: %s", namespace, exc)
        return
    discard(store, [key for key in old if key not in keep])
