"""How a save in progress proves it is alive, so garbage collection never removes its data.

The coordinator of a save writes ``NAMESPACE/.live/SAVE_ID`` with a short expiry (``live_ttl``, 60 s by
default) before any data of that generation is written, and a daemon thread refreshes the expiry
every quarter of it. Once the marker has expired it never comes back: refreshing only changes the
expiry of a key that still exists. The commit is conditional on the marker, in one server-side step
that also removes it (kvckpt.store.KVStore.commit), so a save whose marker lapsed (its process died,
or stalled for longer than ``live_ttl``) can never commit, and :func:`kvckpt.gc` may treat a
generation without a marker and without a record as an orphan. docs/protocol.md has the whole rule.

That same rule makes a late refresh harmless (PEXPIRE never creates a key), so stopping never waits
for a refresh stuck on a hung server: the thread is told to stop and left to finish on its own, its
own operations bounded by the store's timeouts (it runs outside the save's deadline, in a context of
its own).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref

from kvckpt.errors import KVCheckpointError
from kvckpt.store import KVStore

log = logging.getLogger(__name__)

#: Seconds a save's marker outlives its last refresh (refreshed every quarter of this).
DEFAULT_LIVE_TTL = 60.0


class Heartbeat:
    """The marker of one generation, and the thread keeping it fresh."""

    def __init__(self, store: KVStore, key: str, ttl: float = DEFAULT_LIVE_TTL) -> None:
        """``key`` is the marker's name: kvckpt.layout.live_key, placed by the store beside the record
        (KVStore.colocated) so the commit can check it in the same atomic step."""
        if ttl <= 0:
            raise KVCheckpointError(f"live_ttl must be a positive number of seconds, got {ttl!r}")
        self.store, self.key, self.ttl = store, key, ttl
        self._stop = threading.Event()
        self._abandoned = threading.Event()
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[[threading.Event, threading.Event], Heartbeat] | None = None

    def start(self) -> None:
        who = f"{socket.gethostname()} pid {os.getpid()}".encode()
        self.store.put(self.key, who, ttl=self.ttl)
        stop, abandoned = self._stop, self._abandoned
        self._thread = threading.Thread(
            target=_beat,
            args=(self.store, self.key, self.ttl, stop, abandoned),
            name="kvckpt-heartbeat",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _abandon, stop, abandoned)  # a writer dropped mid-save

    def halt(self) -> None:
        """Stop refreshing and leave the marker: right before the commit, which consumes it. A
        refresh still in flight may land after the commit or the marker's removal, and then changes
        nothing (see the module's docstring)."""
        if self._finalizer is not None:
            self._finalizer.detach()  # stopped on purpose: the thread, still waking, must not remove it
        self._stop.set()

    def stop(self) -> bool:
        """Stop refreshing and remove the marker (best effort: it expires anyway); False when it
        could not be removed, so the save's error can say it was left to expire."""
        self.halt()
        try:
            self.store.delete_many([self.key])
        except KVCheckpointError as exc:
            log.warning("%s: could not remove this save's heartbeat: %s", self.key, exc)
            return False
        return True


def _abandon(stop: threading.Event, abandoned: threading.Event) -> None:
    abandoned.set()
    stop.set()


def _beat(store: KVStore, key: str, ttl: float, stop: threading.Event, abandoned: threading.Event) -> None:
    while not stop.wait(ttl / 4):
        try:
            if not store.expire_many([key], ttl)[0]:
                log.warning("%s: this save's heartbeat lapsed; it will not commit", key)
                return
        except KVCheckpointError as exc:  # a blip: the next beat, or the commit's check, decides
            log.warning("%s: could not refresh this save's heartbeat: %s", key, exc)
    if abandoned.is_set():  # nobody will stop this save any more: it is dead, say so now
        try:
            store.delete_many([key])
        except KVCheckpointError as exc:
            log.warning("%s: could not remove an abandoned save's heartbeat: %s", key, exc)
