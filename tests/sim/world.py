"""One simulated run: a seed draws the actors, the faults and the schedule; the invariants judge it.

The actors run kvckpt's real code on one :class:`~tests.sim.store.SimStore`: trainers call
``kvckpt.save`` (DCP with no process group), and there are ``kvckpt.gc``, ``kvckpt.keep_last``,
``kvckpt.delete`` and a ``Drainer`` copying to an fsspec ``memory://`` durable tier. Each host has its
own clock (``time.time()`` is patched per actor thread: the store's clock plus the host's skew), and
save ids are drawn from a counter, so nothing but the seed decides what happens.

After every step (all actors parked, see :mod:`tests.sim.scheduler`):

- every record names only chunks that exist, holding exactly the bytes its save wrote, and comes from
  a save that may have committed (one still running, acknowledged, or failed with its data kept: a
  save that removed its data has said nothing was committed);
- every acknowledged save stays there, loadable with its exact bytes, until something deleted it on
  purpose (``kvckpt.delete``, ``keep_last``) or a save that committed after it replaced it;
- the durable tier keeps a complete copy of every namespace it ever held, unless ``keep`` pruned it,
  and a complete copy never changes.

At the end: a restarted drainer, run until nothing is due, has drained every committed checkpoint or one
committed after it; ``keep_last`` never removed a checkpoint that began after one it kept had
committed; and ``kvckpt.load`` and ``kvckpt.verify`` read back every acknowledged save.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch

import kvckpt

# Every actor's module is imported before a run patches the ``time`` they see, even in a process's
# first run (kvckpt imports its torch parts lazily).
import kvckpt.dcp.api
import kvckpt.layout
import kvckpt.protocol.heartbeat
import kvckpt.tiered.drain
import kvckpt.transfer
from kvckpt import layout, record
from kvckpt.errors import CorruptCheckpointError, KVCheckpointError
from tests.sim.scheduler import Aborted, Actor, Faults, HarnessError, Scheduler
from tests.sim.store import Op, SimStore

PREFIX = "sim"
NAMESPACES = ("sim/a", "sim/b")
#: Keeps the real heartbeat thread asleep for the whole run: liveness lapses only when the
#: scheduler pauses an actor, which expires that actor's markers on the store.
LIVE_TTL = 1e7
#: Two chunks per tensor: more keys, more places for a scan or a delete to interleave.
CHUNK_BYTES = 8
#: Where host clocks start (Unix seconds); the store's clock adds one second per operation.
EPOCH = 1.8e9


class Violation(AssertionError):
    """An invariant failed."""


def state(label: int) -> dict[str, torch.Tensor]:
    """The state dict save ``label`` writes: its values say which save it is."""
    return {
        "w": torch.arange(4, dtype=torch.float32) + 10 * label,
        "b": torch.tensor([label, -label], dtype=torch.int64),
    }


def blank() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(4, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.int64)}


def expected_bytes(label: int) -> dict[str, bytes]:
    return {fqn: tensor.numpy().tobytes() for fqn, tensor in state(label).items()}


@dataclass(eq=False)
class Save:
    """One call of kvckpt.save and what became of it."""

    label: int
    namespace: str
    overwrite: bool
    actor: str
    started: int  # the store's clock when it began
    save_ids: list[str] = field(default_factory=list)
    state: str = "running"  # running, acked, failed
    committed_at: int | None = None  # the store's clock when its record landed
    data_kept: bool = False  # failed, and its data is still there: its commit may yet land

    def __str__(self) -> str:
        committed = "" if self.committed_at is None else f", committed at t={self.committed_at}"
        return f"save {self.label} ({self.actor} -> {self.namespace}, began at t={self.started}{committed})"


# Patching the process around a run ------------------------------------------------------------


class _HostClock:
    """``time`` as a host sees it: ``time()`` is the store's clock plus the calling actor's skew."""

    def __init__(self, world: World) -> None:
        self._world = world

    def time(self) -> float:
        actor = self._world.sched.current()
        return EPOCH + self._world.store.now + (0.0 if actor is None else actor.skew)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _Threading:
    """``threading`` for the heartbeat module: a thread it starts belongs to the actor that started it."""

    def __init__(self, sched: Scheduler) -> None:
        class Thread(threading.Thread):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._sim_actor = sched.current()

            def run(self) -> None:
                sched.adopt(self._sim_actor)
                super().run()

        self.Thread = Thread

    def __getattr__(self, name: str) -> Any:
        return getattr(threading, name)


def _actor_pool(sched: Scheduler) -> type[ThreadPoolExecutor]:
    """Transfer's pool, with one thread that belongs to the actor making the pool.

    One thread: two threads of one actor reaching store operations at once would park in an order
    the OS picks, not the seed. The scheduler runs one operation at a time anyway.
    """

    class ActorPool(ThreadPoolExecutor):
        def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "", **_: Any) -> None:
            super().__init__(1, thread_name_prefix, initializer=sched.adopt, initargs=(sched.current(),))

    return ActorPool


class _TraceLog(logging.Handler):
    def __init__(self, world: World) -> None:
        super().__init__(logging.WARNING)
        self._world = world

    def emit(self, entry: logging.LogRecord) -> None:
        who = self._world.sched.owner() or "main"
        self._world.trace.append(f"      {who} logs {entry.levelname}: {entry.getMessage()[:300]}")


@contextlib.contextmanager
def _patched(world: World) -> Iterator[None]:
    sched = world.sched
    replaced: list[tuple[object, str, object]] = []

    def put(obj: object, name: str, value: object) -> None:
        replaced.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    put(kvckpt.layout, "new_save_id", world.new_save_id)
    put(kvckpt.transfer, "ThreadPoolExecutor", _actor_pool(sched))
    put(kvckpt.protocol.heartbeat, "threading", _Threading(sched))
    clock = _HostClock(world)
    for name, module in list(sys.modules.items()):
        if name.startswith("kvckpt") and getattr(module, "time", None) is time:
            put(module, "time", clock)
    logger = logging.getLogger("kvckpt")
    handler = _TraceLog(world)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        for obj, name, value in reversed(replaced):
            setattr(obj, name, value)


# The durable tier ------------------------------------------------------------------------------


class DurableWatch:
    """What the durable tier held, so that losing or changing a complete copy is seen at once."""

    def __init__(self, world: World, url: str) -> None:
        self.world, self.url = world, url
        self.fs = fsspec.filesystem("memory")
        self.verified: dict[tuple[str, str], dict[str, bytes]] = {}
        self.held: set[str] = set()

    def _files(self, checkpoint_id: str) -> dict[str, bytes]:
        path = checkpoint_id.removeprefix("memory://")
        return {p: bytes(self.fs.cat_file(p)) for p in sorted(self.fs.find(path))}

    def copies(self) -> list[kvckpt.DrainedCheckpoint]:
        return kvckpt.durable_checkpoints(self.url)

    def check(self, keep: int | None) -> list[kvckpt.DrainedCheckpoint]:
        copies = self.copies()
        for copy in copies:
            files = self._files(copy.checkpoint_id)
            known = self.verified.get((copy.checkpoint_id, copy.save_id))
            if known is None:
                self._verify(copy)
                self.verified[copy.checkpoint_id, copy.save_id] = files
            elif files != known:
                raise Violation(f"the complete durable copy {copy.checkpoint_id} ({copy.save_id}) changed")
        present = {c.namespace for c in copies}
        for namespace in sorted(self.held - present):
            if keep is not None and len(copies) >= keep:
                self.held.discard(namespace)  # pruned by keep
                continue
            raise Violation(
                f"the durable tier lost its only complete copy of {namespace} (it holds "
                f"{[(c.name, c.save_id) for c in copies]})"
            )
        self.held |= present
        return copies

    def _verify(self, copy: kvckpt.DrainedCheckpoint) -> None:
        save = self.world.by_save_id.get(copy.save_id)
        if save is None:
            raise Violation(f"durable copy {copy.checkpoint_id} names generation {copy.save_id}, no save's")
        loaded = blank()
        try:
            kvckpt.load(loaded, copy.checkpoint_id)
        except Exception as exc:
            raise Violation(f"the complete durable copy {copy.checkpoint_id} does not load: {exc}") from exc
        self.world.compare(loaded, save, f"durable copy {copy.checkpoint_id}")


# Scenarios ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Which actors a seed is likely to draw and which faults: each profile aims at one kind of
    interaction, so that every kind gets many seeds and one fault does not hide the others."""

    name: str
    faults: Callable[[random.Random], Faults]
    gc: float = 0.5
    keep_last: float = 0.2
    delete: float = 0.15
    drain: float = 0.2
    #: Host clocks, relative to the store's (seconds).
    skews: tuple[float, ...] = (0.0,)
    #: At most this many unrelated keys in the store.
    filler: int = 0


PROFILES = {
    p.name: p
    for p in [
        Profile(  # a bit of everything
            "mixed",
            lambda rng: Faults(
                drop=rng.choice([0.0, 0.02, 0.06]),
                late=rng.choice([0.0, 0.3]),
                deliver=rng.choice([0.05, 0.2]),
                pause=rng.choice([0.0, 0.02, 0.08]),
                crash=rng.choice([0.0, 0.005]),
            ),
            drain=0.5,
            skews=(0.0, 0.0, 20.0, -20.0, -300.0),
        ),
        Profile("race", lambda rng: Faults(), gc=0.9, keep_last=0.4, filler=12),  # interleavings, SCANs
        Profile(
            "stall",
            lambda rng: Faults(pause=rng.choice([0.05, 0.15]), crash=rng.choice([0.0, 0.01])),
            gc=0.9,
            drain=0.4,
        ),
        Profile(
            "network",
            lambda rng: Faults(
                drop=rng.choice([0.02, 0.06]), late=rng.choice([0.3, 0.7]), deliver=rng.choice([0.05, 0.2])
            ),
        ),
        Profile(
            "drain",
            lambda rng: Faults(drop=rng.choice([0.0, 0.02])),
            gc=0.2,
            drain=1.0,
            skews=(0.0, 20.0, -20.0, -300.0),
        ),
    ]
}


# The run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    seed: int
    failure: str | None
    trace: tuple[str, ...]
    steps: int

    def report(self) -> str:
        lines = [f"seed {self.seed}: {self.failure or 'ok'} ({self.steps} steps)", *self.trace]
        if self.failure:
            lines += [
                f"FAILED seed {self.seed}: {self.failure}",
                f"replay: KVCKPT_SIM_SEED={self.seed} pytest tests/sim -q",
            ]
        return "\n".join(lines)


class World:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.trace: list[str] = []
        self.store = SimStore()
        self.profile = PROFILES[self.rng.choice(sorted(PROFILES))]
        self.faults = self.profile.faults(self.rng)
        self.sched = Scheduler(self.rng, self.faults, self.trace)
        self.sched.paused = lambda actor: self.store.expire_markers_of(actor.name)
        self.sched.clock = lambda: self.store.ops
        self.store.gate = self.sched
        self.store.on_write = self._written
        self.store.on_take = self._taken
        #: (actor, save) of every record a deleter took.
        self.taken: list[tuple[str | None, Save]] = []
        self.saves: list[Save] = []
        self.by_save_id: dict[str, Save] = {}
        self._doing: dict[str | None, Save] = {}
        self._labels = itertools.count(1)
        self._ids = itertools.count(1)
        #: Per namespace: deleters (delete, keep_last) now running, and the store's clock when the
        #: last one ended: what committed before that may have been deleted on purpose.
        self.at_risk: Counter[str] = Counter()
        self.deleted_until: dict[str, int] = {}
        self.problems: list[str] = []
        #: Per keep_last call: the checkpoints there all along that it kept, and those it removed.
        self.keep_last_runs: list[tuple[list[Save], list[kvckpt.CheckpointInfo]]] = []
        self.drainer: kvckpt.Drainer | None = None
        self.drain_keep: int | None = None
        self.durable: DurableWatch | None = None
        self.durable_url = f"memory://sim-durable-{seed}"

    # Bookkeeping -------------------------------------------------------------------------------

    def new_save_id(self) -> str:
        """kvckpt.layout.new_save_id, drawn from a counter and credited to the save in progress."""
        save_id = f"g20260101T000000-{next(self._ids):08x}"
        save = self._doing.get(self.sched.owner())
        if save is not None:
            save.save_ids.append(save_id)
            self.by_save_id[save_id] = save
        return save_id

    def _written(self, key: str, value: bytes) -> None:
        if not key.endswith("/" + layout.RECORD_NAME):
            return
        try:
            save_id = str(record.decode_record(value, key).get("save_id"))
        except CorruptCheckpointError:
            return
        save = self.by_save_id.get(save_id)
        if save is not None and save.committed_at is None:
            save.committed_at = self.store.ops

    def _taken(self, key: str, value: bytes) -> None:
        if key.endswith("/" + layout.RECORD_NAME):
            with contextlib.suppress(CorruptCheckpointError):
                save = self.by_save_id.get(str(record.decode_record(value, key).get("save_id")))
                if save is not None:
                    self.taken.append((self.sched.owner(), save))

    def _record_save(self, namespace: str) -> Save | None:
        raw = self.store.peek(layout.record_key(namespace))
        if raw is None:
            return None
        save_id = str(record.decode_record(raw, namespace).get("save_id"))
        save = self.by_save_id.get(save_id)
        if save is None:
            raise Violation(f"the record of {namespace} names generation {save_id}, which no save drew")
        return save

    def acked(self, namespace: str) -> Save | None:
        """The acknowledged save to ``namespace`` whose commit landed last."""
        done = [s for s in self.saves if s.namespace == namespace and s.state == "acked"]
        return max(done, key=lambda s: s.committed_at or 0, default=None)

    def compare(self, loaded: dict[str, torch.Tensor], save: Save, what: str) -> None:
        want = state(save.label)
        for fqn, tensor in want.items():
            if not torch.equal(loaded[fqn], tensor):
                raise Violation(f"{what}: {fqn!r} is {loaded[fqn].tolist()}, {save} wrote {tensor.tolist()}")

    # Invariants --------------------------------------------------------------------------------

    def check(self) -> None:
        if self.problems:
            raise Violation("; ".join(self.problems))
        namespaces = {k.rsplit("/", 1)[0] for k in self.store.keys(PREFIX + "/") if k.endswith("/.metadata")}
        for namespace in sorted(namespaces | set(NAMESPACES)):
            self._check_namespace(namespace)
        if self.durable is not None and (self.sched.last is None or self.sched.last.name == "drainer"):
            self.durable.check(self.drain_keep)

    def _check_namespace(self, namespace: str) -> None:
        current = self._record_save(namespace)
        if current is not None:
            self._check_record(namespace, current)
        acked = self.acked(namespace)
        if acked is None or self.at_risk[namespace]:
            return
        assert acked.committed_at is not None
        if acked.committed_at <= self.deleted_until.get(namespace, -1):
            return  # deleted on purpose, or could have been
        if current is None:
            raise Violation(
                f"{acked} was acknowledged, and its record is gone: nothing deleted it on purpose"
            )
        if current is not acked and current.state == "acked":
            raise Violation(
                f"{acked} was acknowledged, yet the record is {current}'s, which committed before it"
            )

    def _check_record(self, namespace: str, save: Save) -> None:
        if save.namespace != namespace:
            raise Violation(f"the record of {namespace} is {save}'s")
        if save.state == "failed" and not save.data_kept:
            raise Violation(
                f"{save} failed and removed its data (nothing committed), yet its record is in the store"
            )
        raw = self.store.peek(layout.record_key(namespace))
        assert raw is not None
        want = expected_bytes(save.label)
        items = record.decode_items(record.decode_record(raw, namespace), namespace)
        for item in items:
            parts = []
            for chunk in item.chunks:
                value = self.store.peek(layout.full_key(namespace, chunk.key))
                if value is None:
                    raise Violation(
                        f"the record of {namespace} ({save}, {save.state}) names chunk {chunk.key}, "
                        "which does not exist"
                    )
                parts.append(value)
            if b"".join(parts) != want.get(item.fqn):
                raise Violation(f"the record of {namespace} ({save}): {item.fqn!r} holds other bytes")
        if {item.fqn for item in items} != set(want):
            raise Violation(f"the record of {namespace} ({save}) lists {[i.fqn for i in items]}")

    # Actions -----------------------------------------------------------------------------------

    def _begin(self, text: str) -> None:
        self.trace.append(f"      t={self.store.ops} {self.sched.owner() or 'setup'} begins {text}")

    def _end(self, text: str) -> None:
        self.trace.append(f"      {self.sched.owner() or 'setup'} {text}")

    def _escaped(self, what: str, exc: BaseException) -> None:
        actor = self.sched.current()
        if isinstance(exc, Aborted) or self.sched.aborting or (actor is not None and actor.crashed):
            raise Aborted from exc  # the process is gone: what it was doing never finished
        if not isinstance(exc, KVCheckpointError):
            self.problems.append(f"{what} raised {type(exc).__name__} (not a KVCheckpointError): {exc}")

    def save(self, namespace: str, overwrite: bool, pending_ttl: float | None) -> None:
        owner = self.sched.owner()
        label = next(self._labels)
        save = Save(label, namespace, overwrite, owner or "setup", self.store.ops)
        self.saves.append(save)
        self._doing[owner] = save
        self._begin(f"{save} overwrite={overwrite} pending_ttl={pending_ttl}")
        options: dict[str, Any] = {} if pending_ttl is None else {"pending_ttl": pending_ttl}
        try:
            kvckpt.save(
                state(label),
                namespace,
                client=self.store,
                overwrite=overwrite,
                io_threads=1,
                chunk_bytes=CHUNK_BYTES,
                live_ttl=LIVE_TTL,
                **options,
            )
        except BaseException as exc:
            self._escaped(str(save), exc)
            save.state = "failed"
            save.data_kept = any(self.store.keys(f"{namespace}/{sid}/") for sid in save.save_ids)
            kept = "its data kept" if save.data_kept else "its data removed"
            self._end(f"{save} failed, {kept}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            save.state = "acked"
            self._end(f"{save} acknowledged")
            if save.committed_at is None:
                self.problems.append(f"{save} was acknowledged but its record never landed")
        finally:
            del self._doing[owner]

    def _deleting(self, namespaces: list[str], run: Callable[[], list[str]], what: str) -> None:
        """Run a deleter: while it runs, acknowledged saves there may go; after, those that
        committed before it ended may have gone, on purpose (``run`` says where it deleted)."""
        self._begin(what)
        for namespace in namespaces:
            self.at_risk[namespace] += 1
        where = namespaces
        try:
            where = run()
            self._end(f"{what} done: {where}")
        except BaseException as exc:
            self._escaped(what, exc)
            self._end(f"{what} failed: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            for namespace in namespaces:
                self.at_risk[namespace] -= 1
            for namespace in where:
                self.deleted_until[namespace] = self.store.ops

    def delete(self, namespace: str) -> None:
        self._deleting(
            [namespace],
            lambda: [namespace] if kvckpt.delete(namespace, client=self.store) else [],
            f"delete {namespace}",
        )

    def keep_last(self, n: int) -> None:
        before = {ns: s for ns in NAMESPACES if (s := self._record_save(ns)) is not None}

        def run() -> list[str]:
            doomed = kvckpt.keep_last(PREFIX, n, client=self.store)
            after = {ns: s for ns in NAMESPACES if (s := self._record_save(ns)) is not None}
            kept = [s for ns, s in before.items() if after.get(ns) is s]  # there all along
            self.keep_last_runs.append((kept, doomed))
            return [info.namespace for info in doomed]

        self._deleting(list(NAMESPACES), run, f"keep_last {n}")

    def gc(self) -> None:
        self._begin("gc")
        try:
            removed = kvckpt.gc(PREFIX, client=self.store)
            self._end(f"gc removed {[(o.namespace, o.save_id) for o in removed]}")
        except BaseException as exc:
            self._escaped("gc", exc)
            self._end(f"gc failed: {type(exc).__name__}: {str(exc)[:200]}")

    def drain(self) -> None:
        assert self.drainer is not None
        self._begin("a drain pass")
        try:
            status = self.drainer.run(once=True)
            self._end(f"drain pass ended with status {status}")
        except BaseException as exc:
            self._escaped("the drainer", exc)
            self._end(f"drain pass failed: {type(exc).__name__}: {str(exc)[:200]}")

    def idle(self) -> None:
        """A scheduling point that touches nothing: this actor waits while others run."""
        self.sched.point(Op("idle", ""))

    # The scenario ------------------------------------------------------------------------------

    def _plant_orphan(self, namespace: str) -> None:
        """What a save killed mid-write leaves: data of a generation no record names, no marker, and
        the ``.unfinished`` hint that makes the next save look for it."""
        save_id = self.new_save_id()
        self.store.put_many([(f"{namespace}/{save_id}/w/0/0", b"orphan!!")])
        self.store.put(layout.unfinished_key(namespace), save_id.encode())
        self.trace.append(f"      setup plants an orphaned generation {save_id} in {namespace}")

    def plan(self) -> list[Actor]:
        rng, profile = self.rng, self.profile
        self.trace.append(f"seed {self.seed}: profile {profile.name}, {self.faults}")
        for namespace in NAMESPACES:
            if rng.random() < 0.5:
                self.save(namespace, overwrite=False, pending_ttl=None)
        if rng.random() < 0.3:
            self._plant_orphan(rng.choice(NAMESPACES))
        if profile.filler:  # keys no actor cares about: longer SCANs, more saves begin during one
            count = rng.randint(1, profile.filler)
            self.store.put_many([(f"{PREFIX}/other/{n}", b"x") for n in range(count)])
            self.trace.append(f"      setup writes {count} unrelated keys under {PREFIX}/other/")
        actors: list[Actor] = []

        def actor(name: str, steps: list[Callable[[], None]], skew: float = 0.0) -> None:
            def body() -> None:
                for run in steps:
                    if self.sched.aborting or me.crashed:
                        return
                    run()

            weight = rng.choice([1.0, 1.0, 3.0])
            me = Actor(name, body, skew=skew, weight=weight)
            actors.append(me)
            self.trace.append(f"      {name}: skew {skew:+g} s, weight {weight:g}")

        def with_idle(run: Callable[[], None]) -> list[Callable[[], None]]:
            return [self.idle] * rng.randint(0, 6) + [run]

        def repeated(run: Callable[[], None], most: int) -> list[Callable[[], None]]:
            return [step for _ in range(rng.randint(1, most)) for step in with_idle(run)]

        for i in range(rng.randint(1, 3)):
            steps: list[Callable[[], None]] = []
            for _ in range(rng.randint(1, 2)):
                namespace, overwrite = rng.choice(NAMESPACES), rng.random() < 0.7
                pending = rng.choice([None, None, None, 40.0])
                steps += with_idle(functools.partial(self.save, namespace, overwrite, pending))
            actor(f"trainer{i + 1}", steps, skew=rng.choice(profile.skews))
        if rng.random() < profile.gc:
            actor("gc", repeated(self.gc, 3))
        if rng.random() < profile.keep_last:
            n = rng.choice([1, 2])
            actor("keep_last", with_idle(lambda: self.keep_last(n)))
        if rng.random() < profile.delete:
            namespace = rng.choice(NAMESPACES)
            actor("delete", with_idle(lambda: self.delete(namespace)))
        if rng.random() < profile.drain:
            self.drain_keep = rng.choice([None, None, 1, 2])
            self.drainer = kvckpt.Drainer(PREFIX, self.durable_url, client=self.store, keep=self.drain_keep)
            self.durable = DurableWatch(self, self.durable_url)
            actor("drainer", repeated(self.drain, 3))
        return actors

    # End of run --------------------------------------------------------------------------------

    def finish(self) -> None:
        """The end-of-run checks, with the network quiet and every actor done."""
        for actor_error in self.problems:
            raise Violation(actor_error)
        if self.drainer is not None:
            self._drain_to_the_end()
        self._check_keep_last()
        for namespace in NAMESPACES:
            acked = self.acked(namespace)
            if acked is None or self._record_save(namespace) is not acked:
                continue
            loaded = blank()
            try:
                kvckpt.load(loaded, namespace, client=self.store)
                kvckpt.verify(namespace, client=self.store, io_threads=1)
            except KVCheckpointError as exc:
                raise Violation(f"{acked}, acknowledged and still the record, does not load: {exc}") from exc
            self.compare(loaded, acked, f"kvckpt.load({namespace!r})")

    def _drain_to_the_end(self) -> None:
        assert self.drainer is not None and self.durable is not None
        self.trace.append("      a drainer (restarted) runs until nothing is due")
        drainer = kvckpt.Drainer(PREFIX, self.durable_url, client=self.store, keep=self.drain_keep)
        for _ in range(4):
            drainer.run(once=True)
            if drainer.due() is None:
                break
        copies = self.durable.check(self.drain_keep)
        drained = [s for c in copies if (s := self.by_save_id.get(c.save_id)) is not None]
        for namespace in NAMESPACES:
            save = self._record_save(namespace)
            if save is None or save in drained:
                continue
            assert save.committed_at is not None
            if all(d.committed_at is not None and d.committed_at < save.started for d in drained):
                raise Violation(
                    f"{save} was never drained, though everything "
                    f"drained ({', '.join(map(str, drained)) or 'nothing'}) committed before it began"
                )

    def _check_keep_last(self) -> None:
        if self.keep_last_runs:  # keep_last removes only what it chose, never a later overwrite
            chosen = {info.save_id for _, doomed in self.keep_last_runs for info in doomed}
            for who, gone in self.taken:
                if who == "keep_last" and not chosen & set(gone.save_ids):
                    raise Violation(
                        f"keep_last removed {gone}, which it had not chosen: the namespace was "
                        f"overwritten after keep_last listed it (it chose {sorted(chosen)})"
                    )
        for kept, doomed in self.keep_last_runs:
            for info in doomed:
                save = self.by_save_id.get(info.save_id)
                if save is None:
                    continue
                for other in kept:
                    if other.committed_at is not None and other.committed_at < save.started:
                        raise Violation(
                            f"keep_last removed {save} and kept {other}, which committed before "
                            f"save {save.label} began"
                        )


def run_seed(seed: int) -> Result:
    world = World(seed)
    failure: str | None = None
    try:
        with _patched(world):
            actors = world.plan()
            world.sched.run(actors, world.check)
            for actor in actors:
                if actor.error is not None:
                    raise HarnessError(f"{actor.name} raised {type(actor.error).__name__}: {actor.error}")
            world.finish()
    except (Violation, HarnessError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        fs = fsspec.filesystem("memory")
        with contextlib.suppress(FileNotFoundError):
            fs.rm(world.durable_url.removeprefix("memory://"), recursive=True)
    return Result(seed, failure, tuple(world.trace), world.sched.step)
