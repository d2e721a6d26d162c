"""KVStore over a Redis Cluster (``redis+cluster://``), on kvckpt's RESP transport like standalone Redis:
the operations of kvckpt.stores.redis.operations over a channel that routes each command.

Data keys carry no hash tags, so a checkpoint spreads over all primaries and no command names two
keys. A batch is grouped by the primary serving each key's slot (kvckpt.stores.redis.slots) and sent
as one pipeline per node, the nodes in parallel threads, values straight from and into the caller's
memory as on a standalone server. Keys a node does not serve are finished this way:

- ASK (the slot is migrating and this key has moved, or is new): sent one by one to the importing
  node, each after ASKING, in the same round;
- MOVED: the slot's owner is taken from the reply and the key goes out again at once;
- CLUSTERDOWN, TRYAGAIN or a node that does not answer: the one retry policy decides (backoff,
  ``retries``, ``total_timeout``, each retry logged); the slot table is re-read from any node that
  answers and the keys go out again as per-node pipelines.

A commit (the commit script of kvckpt.stores.redis.commands, ``SET NX``, ``SET GET``) is sent once to
the key's primary and fenced like on a standalone server; only a redirection, after which nothing ran,
sends it again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import redis.exceptions as rex

from kvckpt.deadline import Deadline, current, using
from kvckpt.errors import InvalidStoreOptionError, ReplicationError, StoreUnavailableError
from kvckpt.store import Buffer, RangeRead
from kvckpt.stores.redis.commands import (
    ACL_RULES,
    Command,
    copy_into,
    getrange_command,
    ms,
    scan_pages,
    set_command,
    settings_of,
)
from kvckpt.stores.redis.failures import translated
from kvckpt.stores.redis.operations import Channel, RedisOperations, Server
from kvckpt.stores.redis.options import Options
from kvckpt.stores.redis.replicas import WaitOne
from kvckpt.stores.redis.retry import GaveUp
from kvckpt.stores.redis.routing import Router
from kvckpt.stores.redis.slots import AddressRemap, fence_key_on, key_slot
from kvckpt.stores.redis.transport import Reply, RespConnection, Transport, raise_first
from kvckpt.stores.redis.url import parse_cluster_url
from kvckpt.urls import StoreURL

__all__ = ["CLUSTER_ACL_RULES", "RedisClusterStore", "key_slot"]

logger = logging.getLogger(__name__)

#: An ACL user on every node needs these too: the slot table, and ASKING while a slot migrates.
CLUSTER_ACL_RULES = (*ACL_RULES, "+cluster|slots", "+asking")
#: Failures that mean some slot has no node to serve it (after the retry policy gave up).
_UNSERVED = (rex.ClusterDownError, rex.TryAgainError)


class RouterChannel(Channel):
    """Commands to the primary serving each key's slot, one RESP transport per node (routing.py)."""

    cluster = True

    def __init__(self, router: Router) -> None:
        self.router = router
        self.description = router.description

    @property
    def timeout(self) -> float | None:
        return self.router.policy.timeout

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        with translated(self.description, action, self.timeout, cluster=True):
            try:
                yield
            except (GaveUp, *_UNSERVED) as exc:
                cause = exc.__cause__ if isinstance(exc, GaveUp) else exc
                if not isinstance(cause, _UNSERVED):
                    raise
                raise StoreUnavailableError(
                    f"{self.description}: the cluster cannot serve every slot while {action} "
                    f"({type(cause).__name__}); check CLUSTER INFO on its nodes"
                ) from cause

    def commands(self, commands: Sequence[Command], what: str) -> list[Reply]:
        return self.router.commands(commands, what=what)

    def once(self, command: Command, key: str) -> Reply:
        return self.router.once(command, key)

    def time(self, key: str) -> Reply:
        node = self.router.owner(key, self.router.table())
        return self.router.transport(node).execute([("TIME",)], "reading the server's clock")[0]

    def write(self, items: Sequence[tuple[str, Buffer]], ttl: float | None) -> None:
        expiry = ms(ttl) if ttl is not None else None

        def send(conn: RespConnection, idxs: list[int]) -> Sequence[Reply]:
            return conn.set_many([items[i] for i in idxs], expiry)

        def command(i: int) -> Command:
            return set_command(items[i][0], items[i][1], ttl)

        raise_first(self.router.route([k for k, _ in items], send, command, writes=True, what="writing"))

    def read_into(self, reads: Sequence[RangeRead]) -> list[int]:
        def command(i: int) -> Command:
            return getrange_command(reads[i])

        def send(conn: RespConnection, idxs: list[int]) -> Sequence[Reply]:
            return conn.getrange_into([reads[i] for i in idxs])

        keys = [r.key for r in reads]
        replies = raise_first(self.router.route(keys, send, command, writes=False, what="reading"))
        counts = []
        for r, reply in zip(reads, replies, strict=True):
            if isinstance(reply, bytes):  # an ASK-ed key came back as bytes
                reply = copy_into(r.into, reply)
            counts.append(reply if isinstance(reply, int) else 0)
        return counts

    def scan(self, pattern: str) -> Iterator[Reply]:
        """SCAN every primary. A node that fails mid-scan is retried as the policy says, after the
        slot table is re-read (a promoted replica then serves its keys); nodes scanned whole are
        not scanned again."""
        scanned: set[str] = set()
        deadline = current()  # passed along, not installed: a generator would leak it to its caller
        failures = 0
        while True:
            name = ""
            try:
                for name in self.router.table(deadline).primaries:
                    if name in scanned:
                        continue
                    yield from scan_pages(partial(_listing, self.router.transport(name), deadline), pattern)
                    scanned.add(name)
                return
            except GaveUp as exc:
                failures = self.router.next_round(
                    failures, deadline, exc.__cause__ or exc, "listing keys", failed={name}
                )

    def servers(self) -> list[Server]:
        """Every node, replicas included (a promoted replica brings its own maxmemory-policy); the
        slot table is re-read first so a node that failed since is not asked. A node that does not
        answer is skipped with a warning: it stores nothing meanwhile, and the cluster marks it
        failed within cluster-node-timeout (a dead primary fails the writes themselves)."""

        def config_get(name: str) -> dict[str, str] | Exception:
            try:
                transport = self.router.transport(name)
                return settings_of(
                    transport.execute([("CONFIG", "GET", "maxmemory*")], "reading server settings")[0]
                )
            except rex.ResponseError as exc:  # NOPERM, a renamed CONFIG: check_settings skips it
                return exc

        def getter(settings: dict[str, str] | Exception) -> Callable[[], dict[str, str]]:
            def get() -> dict[str, str]:
                if isinstance(settings, Exception):
                    raise settings
                return settings

            return get

        table = self.router.refresh()
        nodes = [*table.primaries, *table.replicas()]
        outcomes = self.router.map(config_get, nodes)
        servers = []
        for name, outcome in zip(nodes, outcomes, strict=True):
            if isinstance(outcome, GaveUp):
                logger.warning(
                    "%s: node %s did not answer (%s); its maxmemory-policy is not checked",
                    self.description, name, type(outcome.__cause__).__name__,
                )  # fmt: skip
                continue
            if isinstance(outcome, Exception) and not isinstance(outcome, rex.ResponseError):
                raise outcome
            servers.append((f"{self.description} node {name}", getter(outcome)))
        return servers

    def wait_each(self, wait: WaitOne, fence_key: str | None) -> dict[str | None, int]:
        """Every primary that took this store's writes since the last wait, in parallel. A store that
        wrote nothing itself (the caller wrote through another instance) waits on every primary. A
        node that took writes but is no longer a primary was failed over: writes it had not
        replicated may be lost, so that is a ReplicationError too."""
        table = self.router.refresh()  # current primaries: failovers since the writes show
        serving = {owner for owner in table.owners if owner is not None}
        lost = sorted(self.router.written - serving)
        if lost:
            self.router.written.clear()  # reported once: a save after this one starts afresh
            raise ReplicationError(
                f"{self.description}: node(s) {', '.join(lost)} took writes but are no longer "
                "primaries (a failover?); writes they had not replicated may be lost: save again",
                nodes=lost,
            )
        nodes = sorted(self.router.written) or sorted(serving)

        def wait_node(name: str) -> int:
            def run(commands: list[tuple[Any, ...]]) -> list[Any]:
                return self.router.transport(name).execute(commands, "waiting for replicas")

            return wait(run, fence_key_on(fence_key, lambda slot: table.owner(slot) == name))

        acks: dict[str | None, int] = {}
        for name, outcome in zip(nodes, self.router.map(wait_node, nodes), strict=True):
            if isinstance(outcome, Exception):
                raise outcome
            acks[name] = outcome
        return acks

    def waited(self) -> None:
        self.router.written.clear()

    def close(self) -> None:
        self.router.close()


class RedisClusterStore(RedisOperations):
    """KVStore over a Redis Cluster: one RESP transport per node, one retry policy for all."""

    channel: RouterChannel
    parse_url = staticmethod(parse_cluster_url)
    #: The options ``from_url`` takes (kvckpt.target checks them before anything connects).
    store_options = Options

    def __init__(self, router: Router) -> None:
        self.policy = router.policy
        super().__init__(RouterChannel(router))

    @classmethod
    def from_url(
        cls, url: StoreURL, *, address_remap: AddressRemap | None = None, **options: Any
    ) -> RedisClusterStore:
        """``url.hosts`` are startup nodes (one that answers is enough); ``options`` are those of every
        Redis URL (kvckpt.stores.redis.options.Options). ``address_remap`` maps each address the nodes
        announce, ``(host, port)``, to the one to connect to (NAT, port forwarding); startup nodes are
        used as given."""
        if address_remap is not None and not callable(address_remap):
            raise InvalidStoreOptionError(
                f"store option address_remap: expected a function (host, port) -> (host, port), got "
                f"{type(address_remap).__name__}",
                options=["address_remap"],
            )
        settings = Options(**options)
        router = Router(url.hosts, settings.endpoint(url), settings.policy(), str(url.server), address_remap)
        return cls(router)

    def __getstate__(self) -> dict[str, Any]:
        return {"router": self.channel.router}  # the router pickles without its sockets

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def _listing(transport: Transport, deadline: Deadline, commands: list[Command]) -> list[Reply]:
    """One SCAN page from one node, within the listing's ``deadline``."""
    with using(deadline):
        return transport.execute(commands, "listing keys")
