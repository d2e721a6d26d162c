"""Generations no record refers to: what a crashed save leaves behind, found and removed safely.

A generation ``NAMESPACE/SAVE_ID/…`` is

- *committed* when a record in its namespace (``.metadata`` or a rank's ``__R.metadata``) names it;
- *in progress* while any save's marker ``NAMESPACE/.live/SAVE_ID`` exists in its namespace
  (kvckpt.protocol.heartbeat): only a save's coordinator keeps a marker, while the other ranks of that save
  write under generations they drew themselves, so a marker protects its whole namespace;
- an *orphan* otherwise: the save died before committing, or lost its commit race.

A save that died before any rank wrote data leaves only its ``.unfinished`` marker; where that is all a
namespace holds of dead saves, the marker is listed as an orphan too (``Orphan.marker_only``), so it
is shown and removed like one rather than lingering unseen.

Saves are counted by namespace (summary): the ranks of one save write under generations each draws
itself and nothing in the store ties them together, but a save reclaims its namespace's orphans
before it writes (before_save), so what one namespace holds is what one save left (unless saves to
one namespace ran at the same time).

Only orphans are ever removed. A namespace whose record cannot be decoded keeps every generation (it
cannot be told which one is committed), and so does a generation directory holding a nested record.
Torch-free, like kvckpt.management.api.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvckpt import humanize, layout, record
from kvckpt.errors import CorruptCheckpointError, KVCheckpointError
from kvckpt.store import KVStore, batched

_RECORD = re.compile(r"(__\d+)?" + re.escape(layout.RECORD_NAME))
_RANK_RECORD = re.compile(r"__\d+" + re.escape(layout.RECORD_NAME))


@dataclass(frozen=True)
class Orphan:
    """One orphaned generation: its keys and the bytes they hold."""

    namespace: str
    save_id: str
    num_keys: int
    nbytes: int
    keys: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def marker_only(self) -> bool:
        """A save that died before any of its ranks wrote data: only its ``.unfinished`` marker
        (naming the generation it drew, ``save_id``) is left."""
        return self.keys == (layout.unfinished_key(self.namespace),)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def summary(found: Sequence[Orphan]) -> str:
    """'2 saves that died left 3 orphaned generations holding 6.0 MiB': saves counted by namespace
    (see the module's docstring), then what they left."""
    saves = len({o.namespace for o in found})
    generations = [o for o in found if not o.marker_only]
    markers = len(found) - len(generations)
    left = []
    if generations:
        held = humanize.size(sum(o.nbytes for o in generations))
        left.append(f"{_plural(len(generations), 'orphaned generation')} holding {held}")
    if markers:
        left.append(f"{_plural(markers, '.unfinished marker')} (dead before writing any data)")
    return f"{_plural(saves, 'save')} that died left {' and '.join(left) or 'nothing'}"


@dataclass(frozen=True)
class Survey:
    """The orphans under a prefix, how many saves were found in progress there, and the
    ``.unfinished`` markers (kvckpt.layout.unfinished_key) of namespaces where none is."""

    orphans: tuple[Orphan, ...]
    in_progress: int
    markers: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.orphans)


def _join(prefix: str, segments: list[str]) -> str:
    return "/".join([prefix, *segments]) if prefix else "/".join(segments)


def _generation_of(segments: list[str]) -> int | None:
    """Index of the first segment naming a generation that has something below it."""
    for i, segment in enumerate(segments[:-1]):
        if layout.GENERATION.fullmatch(segment):
            return i
    return None


def survey(store: KVStore, prefix: str, *, only_namespace: bool = False) -> Survey:
    """Scan ``prefix`` (whole path segments; ``""`` for the whole store) for orphaned generations.

    With ``only_namespace`` only generations of the namespace ``prefix`` itself count, not those of
    checkpoints nested below it.
    """
    start = len(prefix) + 1 if prefix else 0
    data: dict[tuple[str, str], list[str]] = defaultdict(list)
    live: set[tuple[str, str]] = set()
    protected: set[tuple[str, str]] = set()
    records: dict[str, list[str]] = defaultdict(list)
    markers: dict[str, str] = {}
    for key in store.scan_prefix(prefix + "/" if prefix else ""):
        segments = key[start:].split("/")
        if segments[-1] == layout.UNFINISHED_NAME:
            markers[_join(prefix, segments[:-1])] = key
            continue
        at = _generation_of(segments)
        if _RECORD.fullmatch(segments[-1]):
            records[_join(prefix, segments[:-1])].append(key)
            if at is not None:  # a checkpoint nested inside a generation-like directory
                protected.add((_join(prefix, segments[:at]), segments[at]))
            continue
        if len(segments) >= 2 and segments[-2] == layout.LIVE_NAME:  # NAMESPACE/.live/SAVE_ID
            live.add((_join(prefix, segments[:-2]), segments[-1]))
            continue
        if at is None:
            continue
        generation = (_join(prefix, segments[:at]), segments[at])
        if not only_namespace or generation[0] == prefix:
            data[generation].append(key)
    busy = {namespace for namespace, _ in live}
    candidates = {g for g in data if g[0] not in busy and g not in protected}
    stale = {ns: key for ns, key in markers.items() if ns not in busy}
    if only_namespace:
        stale = {ns: key for ns, key in stale.items() if ns == prefix}
    committed = _committed(store, {ns for ns, _ in candidates} | set(stale), records)
    orphans = []
    for namespace, save_id in sorted(candidates):
        names = committed.get(namespace)
        if names is None or save_id in names:
            continue
        keys = data[namespace, save_id]
        orphans.append(Orphan(namespace, save_id, len(keys), _size(store, keys), tuple(keys)))
    orphans += _lone_markers(store, stale, {o.namespace for o in orphans}, committed)
    ordered = sorted(orphans, key=lambda o: (o.namespace, o.save_id))
    return Survey(tuple(ordered), len(live), tuple(key for _, key in sorted(stale.items())))


def _lone_markers(
    store: KVStore, stale: dict[str, str], seen: set[str], committed: dict[str, set[str]]
) -> list[Orphan]:
    """Markers of saves that died before writing data, in namespaces with no other orphan: a
    marker naming a committed generation (its clearing after the commit failed) is no dead save."""
    alone = {ns: key for ns, key in stale.items() if ns not in seen and ns in committed}
    found = []
    for (namespace, key), raw in zip(alone.items(), store.get_many(list(alone.values())), strict=True):
        save_id = None if raw is None else raw.decode("utf-8", "replace")
        if save_id is not None and save_id not in committed[namespace]:
            found.append(Orphan(namespace, save_id, 1, len(raw or b""), (key,)))
    return found


def _committed(
    store: KVStore, namespaces: Iterable[str], records: dict[str, list[str]]
) -> dict[str, set[str]]:
    """Per namespace, every generation its records name (read now, not at scan time); a namespace
    with a record that cannot be decoded is left out, so nothing of it is removed."""
    found: dict[str, set[str]] = {}
    for namespace in namespaces:
        keys = list(dict.fromkeys([layout.record_key(namespace), *records.get(namespace, [])]))
        names: set[str] | None = set()
        for key, raw in zip(keys, store.get_many(keys), strict=True):
            if raw is None or names is None:
                continue
            try:
                body = record.decode_record(raw, key)
                names.add(str(body.get("save_id")))
                names.update(k.split("/", 1)[0] for k in record.chunk_keys(body))
            except CorruptCheckpointError:
                names = None
        if names is not None:
            found[namespace] = names
    return found


def _size(store: KVStore, keys: list[str]) -> int:
    return sum(sum(store.value_sizes(part)) for part in batched(keys, store.capabilities.max_batch_ops))


def _has_live_save(store: KVStore, namespace: str) -> bool:
    return next(iter(store.scan_prefix(f"{namespace}/{layout.LIVE_NAME}/")), None) is not None


def rank_records(store: KVStore, namespace: str) -> list[str]:
    """Rank-local records (use_collectives=False), not a nested checkpoint named ``__x``."""
    start = len(namespace) + 1
    return [k for k in store.scan_prefix(f"{namespace}/__") if _RANK_RECORD.fullmatch(k[start:])]


def require_conditional_commit(store: KVStore) -> None:
    """Deciding that a generation is an orphan is safe only where a save whose marker is gone can
    never commit (docs/protocol.md); a backend without KVStore.commit cannot promise that."""
    if not store.capabilities.conditional_commit:
        raise KVCheckpointError(
            f"{type(store).__name__} has no conditional commit (capabilities.conditional_commit), so a "
            "save that looks dead could still commit: orphaned generations cannot be removed safely "
            "there. Delete checkpoints with kvckpt.delete, or implement KVStore.commit and clock"
        )


def remove(store: KVStore, orphans: Iterable[Orphan], markers: Iterable[str] = ()) -> list[Orphan]:
    """Delete orphans of namespaces where no save runs now, and those namespaces' stale
    ``.unfinished`` ``markers`` (a Survey's); returns the orphans deleted.

    A scan is no snapshot: a save that began while it ran may show its data but not its marker, and
    one may commit between the scan and now. So each namespace is decided again, in this order
    (docs/protocol.md, deciders): first no marker may exist there (then every save whose data the
    scan saw has either committed or can never commit), then the records are read, and only what
    none of them names is deleted. A save that begins later writes data the scan never saw.
    """
    require_conditional_commit(store)
    decided: dict[str, set[str] | None] = {}

    def named(namespace: str) -> set[str] | None:
        """What records name now, or None when a save runs there or a record cannot be read."""
        if namespace not in decided:  # one look per namespace: a scan of the store on Redis
            busy = _has_live_save(store, namespace)
            records = {namespace: rank_records(store, namespace)}
            decided[namespace] = None if busy else _committed(store, [namespace], records).get(namespace)
        return decided[namespace]

    removed = []
    for orphan in orphans:
        names = named(orphan.namespace)
        if names is None or orphan.save_id in names:
            continue
        for part in batched(orphan.keys, store.capabilities.max_batch_ops):
            store.delete_many(part)
        removed.append(orphan)
    stale = [key for key in markers if named(key.rsplit("/", 1)[0]) is not None]
    if stale:
        store.delete_many(stale)
    return removed


def before_save(store: KVStore, namespace: str, save_id: str, ttl: float | None) -> list[Orphan]:
    """What a save runs before writing data: reclaim this namespace's orphans, then mark it
    ``.unfinished`` by ``save_id`` (expiring after ``ttl``, as the save's pending data does).

    It looks only when the marker is already there, i.e. an earlier save here began and never
    committed: looking means listing keys, on Redis a SCAN of the whole keyspace (0.5 s per million
    keys), which a save into a store shared with other data should not pay every time.
    """
    marker = layout.unfinished_key(namespace)
    reclaimed = []
    if store.capabilities.conditional_commit and store.get(marker) is not None:
        reclaimed = remove(store, survey(store, namespace, only_namespace=True).orphans)
    store.put(marker, save_id.encode(), ttl=ttl)
    return [o for o in reclaimed if not o.marker_only]  # that marker is this save's now


def after_save(store: KVStore, namespace: str, save_id: str) -> None:
    """A save committed, or removed all its data: it left nothing. A later save's marker stays."""
    marker = layout.unfinished_key(namespace)
    if store.get(marker) == save_id.encode():
        store.delete(marker)
