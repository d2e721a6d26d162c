"""Routing for the Redis Cluster store: the slot table, a RESP transport per node, and batches that
reach every key wherever it lives (the rules are in kvckpt.stores.redis.cluster's docstring)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import redis.exceptions as rex

from kvckpt._buffers import key_str
from kvckpt.deadline import Deadline, current, scope, using
from kvckpt.stores.redis.commands import Command
from kvckpt.stores.redis.retry import GaveUp, RetryPolicy
from kvckpt.stores.redis.slots import Address, AddressRemap, SlotTable, key_slot, node_name
from kvckpt.stores.redis.transport import Endpoint, Reply, RespConnection, Transport, raise_first

logger = logging.getLogger("kvckpt.stores.redis.cluster")

#: Redirections followed in a row before a key counts as failing (a slot moving again and again).
MAX_REDIRECTS = 5
#: Replies after which the slot table is re-read and the key sent again after a backoff.
RETRY_REPLIES = (rex.ClusterDownError, rex.TryAgainError)

#: Commands that change a key: the nodes they reach are waited on by wait_for_replicas.
_WRITES = frozenset({"SET", "GETDEL", "PEXPIRE", "PERSIST", "UNLINK"})
T = TypeVar("T")
#: Sends the commands of some batch indices on one connection; a reply (or error reply) per index.
Send = Callable[[RespConnection, list[int]], Sequence[Reply]]


@dataclass
class _Left:
    """What one round of a routed batch left to do."""

    todo: list[int] = field(default_factory=list)
    asks: dict[tuple[str, Address], list[int]] = field(default_factory=dict)  # by importing node
    dead: set[str] = field(default_factory=set)  # nodes that did not answer
    failure: BaseException | None = None


@contextlib.contextmanager
def naming(nodes: set[str]) -> Iterator[None]:
    """Name ``nodes`` in a GaveUp raised inside, so the error says which node to look at."""
    try:
        yield
    except GaveUp as gave_up:
        gave_up.node = gave_up.node or ", ".join(sorted(nodes)) or None
        raise


def _kind(exc: BaseException) -> str:
    """A failure's name in logs: a socket error is a ConnectionError whatever errno it had."""
    if isinstance(exc, TimeoutError | rex.TimeoutError):
        return "TimeoutError"
    if isinstance(exc, OSError | rex.ConnectionError):
        return "ConnectionError"
    return type(exc).__name__


class Router:
    """Where each key goes, and sending it there; shared by the threads of one store."""

    def __init__(
        self,
        startup: Sequence[Address],
        endpoint: Endpoint,
        policy: RetryPolicy,
        description: str,
        address_remap: AddressRemap | None = None,
        max_workers: int = 16,
    ) -> None:
        self.startup = tuple(startup)
        self.endpoint = endpoint  # every node's connection settings; host and port are each node's
        self.policy = policy
        self.description = description
        self.address_remap = address_remap
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._loading = threading.Lock()
        self._table: SlotTable | None = None
        self._transports: dict[str, Transport] = {}
        self._executor: ThreadPoolExecutor | None = None
        #: Primaries that took writes since the store last waited for replicas.
        self.written: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        names = ("startup", "endpoint", "policy", "description", "address_remap", "max_workers")
        return {name: getattr(self, name) for name in names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            transports, self._transports = self._transports, {}
        for transport in transports.values():
            transport.close()

    # Nodes and the slot table ---------------------------------------------------------------

    def transport(self, name: str, address: Address | None = None) -> Transport:
        transport = self._transports.get(name)
        if transport is None:
            host, port = address or self.table().addresses[name]
            with self._lock:
                transport = self._transports.get(name)
                if transport is None:
                    endpoint = replace(self.endpoint, host=host, port=port)
                    # Retries happen here, around whole rounds, so a dead node's keys are re-routed.
                    once = replace(self.policy, retries=0)
                    transport = Transport(endpoint, once, f"{self.description} node {name}")
                    self._transports[name] = transport
        return transport

    def table(self, deadline: Deadline | None = None) -> SlotTable:
        table = self._table
        if table is not None:
            return table
        deadline = deadline or current()
        with self._loading:  # I/O threads start at once: one of them reads the table
            failures = 0
            while self._table is None:
                try:
                    self.refresh(deadline)
                except GaveUp as exc:
                    failure = exc.__cause__ or exc
                    with naming({node_name(a) for a in self.startup}):
                        self.policy.pause(
                            failures, deadline, failure, where=self.description, what="reading the slot table"
                        )
                    failures += 1
            return self._table

    def refresh(self, deadline: Deadline | None = None, *, avoid: frozenset[str] = frozenset()) -> SlotTable:
        """Re-read the slot table from the first node that answers (known nodes, then startup ones).

        Asks no node whose reply could not arrive before ``deadline`` (kvckpt.deadline). When none
        answers the old table stays (the next round fails and the policy gives up); without one, this
        raises.
        """
        deadline = deadline or current()
        known = self._table
        candidates: list[Address] = []
        if known is not None:
            names = sorted(known.addresses, key=lambda n: (n in avoid, n not in known.primaries))
            candidates += [known.addresses[n] for n in names]
        candidates += [a for a in self.startup if a not in candidates]  # as given: never remapped
        failure: BaseException | None = None
        for address in candidates:
            if failure is not None and deadline.remaining(self.policy.total_timeout) < self.policy.timeout:
                break
            transport = self.transport(node_name(address), address)
            try:
                with using(deadline):
                    (reply,) = transport.execute([("CLUSTER", "SLOTS")], "reading the slot table")
            except GaveUp as exc:
                failure = exc.__cause__ or exc
                continue
            except rex.BusyLoadingError as exc:  # a restarted node still loading its data: ask another
                failure = exc
                continue
            table = SlotTable.parse(reply, address, self.address_remap)
            self._table = table
            return table
        if known is not None:
            return known
        assert failure is not None
        raise GaveUp(len(candidates), deadline.idle()) from failure

    def owner(self, key: str, table: SlotTable) -> str:
        owner = table.owner(key_slot(key))
        if owner is None:
            raise rex.ClusterDownError(f"CLUSTERDOWN Hash slot {key_slot(key)} is not served")
        return owner

    def redirected(self, error: rex.AskError, replier: str) -> tuple[str, Address]:
        host = error.host or self.table().addresses.get(replier, ("", 0))[0]
        address: Address = (host, error.port)
        if self.address_remap is not None:
            address = self.address_remap(address)
        return node_name(address), address

    def moved(self, error: rex.MovedError, replier: str) -> None:
        """The slot table with what a MOVED reply says: that slot's new owner."""
        self._table = self.table().moved(error.slot_id, self.redirected(error, replier)[1])

    # Routing --------------------------------------------------------------------------------

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T | Exception]:
        """``fn`` over ``items`` in parallel threads; an exception is returned in place of a result."""

        def guarded(item: Any) -> T | Exception:
            try:
                return fn(item)
            except Exception as exc:
                return exc

        if len(items) <= 1:
            return [guarded(item) for item in items]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="kvckpt-cluster")
            executor = self._executor
        # Each in a copy of the caller's context: the operation's deadline (kvckpt.deadline) goes along.
        futures = [executor.submit(contextvars.copy_context().run, guarded, item) for item in items]
        return [future.result() for future in futures]

    def route(
        self, keys: Sequence[str], send: Send, command: Callable[[int], Command], *, writes: bool, what: str
    ) -> list[Reply]:
        """A reply per key: ``send`` per owning primary, ASK-ed keys through ``command`` with ASKING.

        Raises the first error reply that is not about routing, or GaveUp once the policy stops.
        """
        with scope() as deadline:  # one for the rounds and every node's batch (kvckpt.deadline)
            return self._route(keys, send, command, writes, what, deadline)

    def _route(
        self,
        keys: Sequence[str],
        send: Send,
        command: Callable[[int], Command],
        writes: bool,
        what: str,
        deadline: Deadline,
    ) -> list[Reply]:
        replies: list[Reply] = [None] * len(keys)
        todo = list(range(len(keys)))
        failures = redirects = 0
        while todo:
            table = self.table(deadline)
            groups: dict[str, list[int]] = {}
            for i in todo:
                groups.setdefault(self.owner(keys[i], table), []).append(i)
            left = _Left()
            items = list(groups.items())
            batches = self.map(lambda g: self.transport(g[0]).run(lambda conn: send(conn, g[1]), what), items)
            for (name, idxs), outcome in zip(items, batches, strict=True):
                self._take_replies(left, replies, name, idxs, outcome, writes)
            if left.asks:
                count = sum(len(idxs) for idxs in left.asks.values())
                logger.debug(
                    "%s: %d key(s) in migrating slots sent one by one after ASKING", self.description, count
                )
                asked = list(left.asks.items())
                results = self.map(lambda a: self._asking(a[0], [command(i) for i in a[1]], what), asked)
                for ((name, _), idxs), outcome in zip(asked, results, strict=True):
                    self._take_replies(left, replies, name, idxs, outcome, writes)
            todo, failure = left.todo, left.failure
            if not todo:
                break
            reason = _kind(failure) if failure else "MovedError"
            logger.debug("%s: %d key(s) re-routed after %s", self.description, len(todo), reason)
            if failure is None and redirects < MAX_REDIRECTS:
                redirects += 1  # MOVED only: the table already says where the keys went
                continue
            failure = failure or rex.ClusterDownError("CLUSTERDOWN the keys' slots keep moving")
            failures = self.next_round(failures, deadline, failure, what, failed=left.dead)
        return replies

    def next_round(
        self, failures: int, deadline: Deadline, failure: BaseException, what: str, failed: set[str]
    ) -> int:
        """After a round that ``failed`` on those nodes: back off (or give up, as the policy says,
        naming them), re-read the slot table from another node, and give up if another round could
        not finish in time. Returns the number of failed rounds so far."""
        with naming(failed):
            self.policy.pause(failures, deadline, failure, where=self.description, what=what)
            self.refresh(deadline, avoid=frozenset(failed))
            if deadline.remaining(self.policy.total_timeout) < self.policy.timeout:
                raise GaveUp(failures + 1, deadline.idle()) from failure
        return failures + 1

    def _take_replies(
        self,
        left: _Left,
        replies: list[Reply],
        name: str,
        idxs: list[int],
        outcome: Sequence[Reply] | Exception,
        writes: bool,
    ) -> None:
        """File ``name``'s replies to ``idxs``: done, redirected, or to send again in another round."""
        if isinstance(outcome, GaveUp):
            left.todo += idxs
            left.failure = outcome.__cause__ or outcome
            left.dead.add(name)
            return
        if isinstance(outcome, Exception):
            raise outcome
        for i, reply in zip(idxs, outcome, strict=True):
            if isinstance(reply, rex.MovedError):
                self.moved(reply, name)
                left.todo.append(i)
            elif isinstance(reply, rex.AskError):
                left.asks.setdefault(self.redirected(reply, name), []).append(i)
            elif isinstance(reply, RETRY_REPLIES):
                left.todo.append(i)
                left.failure = reply
            elif isinstance(reply, rex.RedisError):
                raise reply
            else:
                replies[i] = reply
        if writes:
            self.written.add(name)

    def _asking(self, node: tuple[str, Address], commands: list[Command], what: str) -> list[Reply]:
        """``commands`` on the node importing their slot, each after ASKING (it lasts one command)."""
        interleaved = [c for command in commands for c in (("ASKING",), command)]
        replies = self.transport(*node).run(lambda conn: conn.execute(interleaved), what)
        return replies[1::2]

    def commands(self, commands: Sequence[Command], *, what: str) -> list[Reply]:
        """Small single-key commands, routed; raises the first error reply."""
        writes = any(str(c[0]).upper() in _WRITES for c in commands)
        keys = [key_str(c[1]) if isinstance(c[1], bytes) else str(c[1]) for c in commands]
        replies = self.route(
            keys, lambda conn, idxs: conn.execute([commands[i] for i in idxs]), commands.__getitem__,
            writes=writes, what=what,
        )  # fmt: skip
        return raise_first(replies)

    def once(self, command: Command, key: str) -> Reply:
        """A commit of ``key``, sent once to the key's primary; sent again only after a redirection
        or when connecting failed (nothing was sent then)."""
        with scope() as deadline:
            return self._once(command, key, deadline)

    def _once(self, command: Command, key: str, deadline: Deadline) -> Reply:
        asking: tuple[str, Address] | None = None
        failures = 0
        for _ in range(MAX_REDIRECTS + self.policy.retries + 1):
            name = asking[0] if asking else self.owner(key, self.table(deadline))
            try:
                reply = self.transport(*(asking or (name,))).once(command, asking=asking is not None)
            except rex.MovedError as moved:
                self.moved(moved, name)
                asking = None
                continue
            except rex.AskError as ask:
                asking = self.redirected(ask, name)
                continue
            except (GaveUp, *RETRY_REPLIES) as exc:
                reason = exc.__cause__ or exc if isinstance(exc, GaveUp) else exc
                failures = self.next_round(failures, deadline, reason, "committing", failed={name})
                asking = None
                continue
            self.written.add(name)
            return reply
        raise GaveUp(failures, deadline.idle()) from rex.ClusterDownError(
            "CLUSTERDOWN the record's slot keeps moving"
        )
