"""A seeded scheduler that runs each actor in its own thread and lets exactly one proceed at a time.

An actor runs until its next store operation, where it parks (``point``); the scheduler waits until
every actor is parked or finished, checks the invariants, then draws from its one random generator
what happens next: which parked actor proceeds and what becomes of its operation (it runs, its reply
is lost, or, for a commit, it is delivered late), whether a late command arrives now, or whether an
actor is paused past the liveness TTL. Since nothing runs between these decisions but the one actor
granted, the seed fixes the whole schedule, and the trace of decisions replays exactly.

Threads an actor starts are attributed to it: the I/O pool of ``kvckpt.transfer.Transfer`` takes the
actor of the thread that made it (the harness patches the pool class), and so does the heartbeat
thread. An actor's threads take turns by construction (the caller waits for the pool), and a second
thread of one actor parking while another is parked is reported as a harness error rather than
left to chance.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tests.sim.store import Decision, Op

#: Real seconds an actor may take between two store operations before the run is declared stuck.
STUCK_SECONDS = 60.0


class Aborted(BaseException):
    """The run is over (an invariant failed) or the actor's process died: unwind the actor without
    touching the store."""


class HarnessError(AssertionError):
    """The simulation itself could not keep the schedule deterministic."""


@dataclass(frozen=True)
class Faults:
    """Per-step probabilities of what the network and the hosts do."""

    drop: float = 0.0  # an operation's reply is lost
    late: float = 0.0  # a commit is delivered late
    deliver: float = 0.2  # a late command arrives at this step
    pause: float = 0.0  # an actor is paused past the liveness TTL
    crash: float = 0.0  # an actor's process dies (kill -9): it never touches the store again


@dataclass(eq=False)
class Actor:
    """One process of the simulated system (a trainer, gc, the drainer, ...)."""

    name: str
    body: Callable[[], None]
    #: Its host's clock minus the store's, in seconds.
    skew: float = 0.0
    #: How often it is picked relative to the others.
    weight: float = 1.0
    state: str = "new"  # new, running, parked, done
    pending: Op | None = None
    grant: Decision | None = None
    held_until: int = 0
    crashed: bool = False
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


@dataclass
class _Late:
    actor: str
    op: Op
    run: Callable[[], str]


class Scheduler:
    def __init__(self, rng: random.Random, faults: Faults, trace: list[str]) -> None:
        self.rng = rng
        self.faults = faults
        self.trace = trace
        self.step = 0
        self.active = False
        self.aborting = False
        self.harness_errors: list[str] = []
        self.late: list[_Late] = []
        self.paused: Callable[[Actor], list[str]] = lambda actor: []
        #: The store's clock, shown in the trace: the time an operation granted now runs at is one more.
        self.clock: Callable[[], int] = lambda: 0
        self._cond = threading.Condition()
        self._local = threading.local()
        #: The actor granted the last step (None after a late delivery or a pause).
        self.last: Actor | None = None

    # Attribution -----------------------------------------------------------------------------

    def current(self) -> Actor | None:
        actor: Actor | None = getattr(self._local, "actor", None)
        return actor

    def adopt(self, actor: Actor | None) -> None:
        """Make the calling thread part of ``actor``."""
        self._local.actor = actor

    def owner(self) -> str | None:
        actor = self.current()
        return None if actor is None else actor.name

    # The actor's side ------------------------------------------------------------------------

    def point(self, op: Op) -> Decision:
        actor = self.current()
        if not self.active:
            return Decision.RUN
        if actor is None:
            self.harness_errors.append(
                f"{threading.current_thread().name} ran {op.name} {op.detail} but belongs to no actor"
            )
            return Decision.RUN
        with self._cond:
            if self.aborting or actor.crashed:
                raise Aborted
            if actor.state == "parked":
                self.harness_errors.append(f"{actor.name} reached two store operations at once")
                raise Aborted
            actor.state, actor.pending = "parked", op
            self._cond.notify_all()
            while actor.grant is None:
                self._cond.wait()
            decision, actor.grant = actor.grant, None
            actor.pending = None
        if decision is Decision.ABORT:
            raise Aborted
        return decision

    def defer(self, op: Op, run: Callable[[], str]) -> None:
        self.late.append(_Late(self.owner() or "?", op, run))

    def outcome(self, text: str) -> None:
        if self.active and self.trace:
            self.trace[-1] += f" -> {text}"

    def note(self, text: str) -> None:
        self.trace.append(f"      {text}")

    # The scheduler's side --------------------------------------------------------------------

    def _main(self, actor: Actor) -> None:
        self.adopt(actor)
        try:
            actor.body()
        except Aborted:
            pass
        except BaseException as exc:  # reported by the run as a failure of the harness or of kvckpt
            actor.error = exc
        finally:
            with self._cond:
                actor.state = "done"
                self._cond.notify_all()

    def _wait_parked(self, actors: Sequence[Actor]) -> None:
        with self._cond:
            if not self._cond.wait_for(
                lambda: all(a.state in ("parked", "done") for a in actors), timeout=STUCK_SECONDS
            ):
                stuck = [a.name for a in actors if a.state not in ("parked", "done")]
                raise HarnessError(f"{', '.join(stuck)} reached no store operation in {STUCK_SECONDS:g} s")

    def _grant(self, actor: Actor, decision: Decision) -> None:
        with self._cond:
            actor.grant, actor.state = decision, "running"
            self._cond.notify_all()
        self._wait_parked([actor])

    def run(self, actors: Sequence[Actor], check: Callable[[], None]) -> None:
        """Run ``actors`` to the end, calling ``check`` whenever all are parked or done."""
        self.active = True
        try:
            for actor in actors:  # one at a time: what an actor does before its first operation is its own
                actor.thread = threading.Thread(
                    target=self._main, args=(actor,), name=actor.name, daemon=True
                )
                actor.state = "running"
                actor.thread.start()
                self._wait_parked([actor])
            while True:
                self._check(check)
                parked = [a for a in actors if a.state == "parked"]
                if not parked:
                    break
                self.step += 1
                self._one_step(parked)
            while self.late:  # what is still in the network arrives in the end
                self.step += 1
                self._deliver(0)
                self._check(check)
        except BaseException:
            self._abort(actors)
            raise
        finally:
            self.active = False

    def _check(self, check: Callable[[], None]) -> None:
        if self.harness_errors:
            raise HarnessError("; ".join(self.harness_errors))
        check()

    def _one_step(self, parked: list[Actor]) -> None:
        rng, faults = self.rng, self.faults
        self.last = None
        if self.late and rng.random() < faults.deliver:
            self._deliver(rng.randrange(len(self.late)))
            return
        if rng.random() < faults.crash:
            actor = rng.choice(parked)
            expired = self.paused(actor)  # nothing refreshes its markers any more
            self.trace.append(
                f"#{self.step} t={self.clock()} CRASH {actor.name}: expired {', '.join(expired)}"
            )
            actor.crashed = True
            self._grant(actor, Decision.ABORT)
            return
        if rng.random() < faults.pause:
            # Most pauses land right before a commit, where a lapsed marker matters most.
            committing = [a for a in parked if a.pending is not None and a.pending.commit_like]
            actor = rng.choice(committing if committing and rng.random() < 0.7 else parked)
            expired = self.paused(actor)
            if expired:
                actor.held_until = self.step + rng.randint(10, 60)
                self.trace.append(
                    f"#{self.step} t={self.clock()} PAUSE {actor.name} past the liveness TTL until step "
                    f"{actor.held_until}: expired {', '.join(expired)}"
                )
                return
        ready = [a for a in parked if a.held_until <= self.step] or parked
        actor = rng.choices(ready, weights=[a.weight for a in ready])[0]
        op = actor.pending
        assert op is not None
        decision = Decision.RUN
        if op.commit_like and rng.random() < faults.late:
            decision = Decision.LATE
        elif op.name != "idle" and rng.random() < faults.drop:
            decision = Decision.DROP
        mark = "" if decision is Decision.RUN else f" [{decision.value}]"
        at = self.clock() + (op.name != "idle")
        self.trace.append(f"#{self.step} t={at} {actor.name}: {op.name} {op.detail}{mark}")
        self.last = actor
        self._grant(actor, decision)

    def _deliver(self, index: int) -> None:
        late = self.late.pop(index)
        what = f"{late.actor}'s {late.op.name} {late.op.detail}"
        self.trace.append(f"#{self.step} t={self.clock() + 1} LATE DELIVERY of {what}")
        self.trace[-1] += f" -> {late.run()}"

    def _abort(self, actors: Sequence[Actor]) -> None:
        with self._cond:
            self.aborting = True
            for actor in actors:
                if actor.state == "parked":
                    actor.grant, actor.state = Decision.ABORT, "running"
            self._cond.notify_all()
            self._cond.wait_for(lambda: all(a.state == "done" for a in actors), timeout=STUCK_SECONDS)
