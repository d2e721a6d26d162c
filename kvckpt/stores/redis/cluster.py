"""KVStore over a Redis Cluster (``redis+cluster://``), on kvckpt's RESP transport like standalone Redis.

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

A commit (the commit script of kvckpt.stores.redis.base, ``SET NX``, ``SET GET``) is sent once to the
key's primary and fenced like on a standalone server; only a redirection, after which nothing ran,
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
from kvckpt.stores.redis.base import Command, Options, RespStore, read_settings, scan_keys
from kvckpt.stores.redis.common import (
    ACL_RULES,
    check_settings,
    check_wait_args,
    fewest_acks,
    glob_escape,
    ms,
    px,
    translated,
    wait_on,
)
from kvckpt.stores.redis.retry import GaveUp
from kvckpt.stores.redis.routing import Router
from kvckpt.stores.redis.slots import AddressRemap, colocated_key, fence_key_on, key_slot
from kvckpt.stores.redis.transport import Reply, RespConnection, Transport, raise_first
from kvckpt.stores.redis.url import parse_cluster_url
from kvckpt.urls import StoreURL

__all__ = ["CLUSTER_ACL_RULES", "RedisClusterStore", "key_slot"]

logger = logging.getLogger(__name__)

#: An ACL user on every node needs these too: the slot table, and ASKING while a slot migrates.
CLUSTER_ACL_RULES = (*ACL_RULES, "+cluster|slots", "+asking")
#: Failures that mean some slot has no node to serve it (after the retry policy gave up).
_UNSERVED = (rex.ClusterDownError, rex.TryAgainError)


class RedisClusterStore(RespStore):
    """KVStore over a Redis Cluster: one RESP transport per node, one retry policy for all."""

    parse_url = staticmethod(parse_cluster_url)

    def __init__(self, router: Router) -> None:
        self._router = router
        self.policy = router.policy
        self.description = router.description

    @classmethod
    def from_url(
        cls, url: StoreURL, *, address_remap: AddressRemap | None = None, **options: Any
    ) -> RedisClusterStore:
        """``url.hosts`` are startup nodes (one that answers is enough); ``options`` are those of every
        Redis URL (kvckpt.stores.redis.base.Options). ``address_remap`` maps each address the nodes
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

    def close(self) -> None:
        self._router.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"router": self._router}  # the router pickles without its sockets

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _commands(self, commands: Sequence[Command], what: str) -> list[Reply]:
        return self._router.commands(commands, what=what)

    def _once(self, command: Command, key: str) -> Reply:
        return self._router.once(command, key)

    def _time(self, key: str) -> Reply:
        node = self._router.owner(key, self._router.table())
        return self._router.transport(node).execute([("TIME",)], "reading the server's clock")[0]

    def colocated(self, key: str, anchor: str) -> str:
        """``key`` with a hash tag that puts it in ``anchor``'s slot, so the commit script may name
        both (a script's keys must share a slot)."""
        return colocated_key(key, anchor)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        with translated(self.description, action, self.policy.timeout, cluster=True):
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

    # KVStore --------------------------------------------------------------------------------

    def read_into_many(self, reads: Sequence[RangeRead]) -> list[int]:
        todo = [i for i, r in enumerate(reads) if len(r.into)]
        counts = [0] * len(reads)
        if not todo:
            return counts

        def command(j: int) -> Command:
            r = reads[todo[j]]
            return ("GETRANGE", r.key, r.offset, r.offset + r.into.nbytes - 1)

        def send(conn: RespConnection, idxs: list[int]) -> Sequence[Reply]:
            return conn.getrange_into([reads[todo[j]] for j in idxs])

        with self._errors("reading"):
            replies = raise_first(
                self._router.route([reads[i].key for i in todo], send, command, writes=False, what="reading")
            )
        for i, reply in zip(todo, replies, strict=True):
            if isinstance(reply, bytes):  # an ASK-ed key came back as bytes
                into = reads[i].into.cast("B") if reads[i].into.format != "B" else reads[i].into
                into[: len(reply)] = reply[: into.nbytes]
                reply = min(len(reply), into.nbytes)
            counts[i] = int(reply) if isinstance(reply, int) else 0
        return counts

    def put_many(self, items: Sequence[tuple[str, Buffer]], *, ttl: float | None = None) -> None:
        if not items:
            return
        expiry = ms(ttl) if ttl is not None else None

        def send(conn: RespConnection, idxs: list[int]) -> Sequence[Reply]:
            return conn.set_many([items[i] for i in idxs], expiry)

        def command(i: int) -> Command:
            return ("SET", items[i][0], items[i][1], *px(ttl))

        with self._errors("writing"):
            raise_first(self._router.route([k for k, _ in items], send, command, writes=True, what="writing"))

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        """SCAN every primary. A node that fails mid-scan is retried as the policy says, after the
        slot table is re-read (a promoted replica then serves its keys); keys already yielded are
        not yielded again."""
        pattern = glob_escape(prefix) + "*"
        seen: set[str] = set()  # a key migrating during the scan can show up on two nodes
        scanned: set[str] = set()
        deadline = current()  # passed along, not installed: a generator would leak it to its caller
        failures = 0
        with self._errors("listing keys"):
            while True:
                name = ""
                try:
                    for name in self._router.table(deadline).primaries:
                        if name in scanned:
                            continue
                        execute = partial(_listing, self._router.transport(name), deadline)
                        for key in scan_keys(execute, prefix, pattern):
                            if key not in seen:
                                seen.add(key)
                                yield key
                        scanned.add(name)
                    return
                except GaveUp as exc:
                    failures = self._router.next_round(
                        failures, deadline, exc.__cause__ or exc, "listing keys", failed={name}
                    )

    # Server safety --------------------------------------------------------------------------

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Every node, replicas included (a promoted replica brings its own maxmemory-policy); the
        slot table is re-read first so a node that failed since is not asked. A node that does not
        answer is skipped with a warning: it stores nothing meanwhile, and the cluster marks it
        failed within cluster-node-timeout (a dead primary fails the writes themselves)."""

        def config_get(name: str) -> dict[str, str] | Exception:
            try:
                return read_settings(self._router.transport(name))
            except rex.ResponseError as exc:  # NOPERM, a renamed CONFIG: check_settings skips it
                return exc

        def getter(settings: dict[str, str] | Exception) -> Callable[[], dict[str, str]]:
            def get() -> dict[str, str]:
                if isinstance(settings, Exception):
                    raise settings
                return settings

            return get

        with self._errors("reading server settings"):
            table = self._router.refresh()
            nodes = [*table.primaries, *table.replicas()]
            outcomes = self._router.map(config_get, nodes)
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
            return check_settings(servers, allow_eviction)

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """WAIT on every primary that took this store's writes since the last call, in parallel.

        Returns the fewest acknowledgements. A store that wrote nothing itself (the caller wrote through
        another instance) waits on every primary. A node that took writes but is no longer a primary
        was failed over: writes it had not replicated may be lost, so that is a ReplicationError too.
        """
        check_wait_args(replicas, timeout)
        with self._errors("waiting for replicas"):
            # Current primaries: failovers since the writes show.
            table = self._router.refresh()
            serving = {owner for owner in table.owners if owner is not None}
            lost = sorted(self._router.written - serving)
            if lost:
                self._router.written.clear()  # reported once: a save after this one starts afresh
                raise ReplicationError(
                    f"{self.description}: node(s) {', '.join(lost)} took writes but are no longer "
                    "primaries (a failover?); writes they had not replicated may be lost: save again",
                    nodes=lost,
                )
            nodes = sorted(self._router.written) or sorted(serving)

            def wait(name: str) -> int:
                def run(commands: list[tuple[Any, ...]]) -> list[Any]:
                    return self._router.transport(name).execute(commands, "waiting for replicas")

                return wait_on(
                    run,
                    replicas,
                    timeout,
                    fence_key_on(fence_key, lambda slot: table.owner(slot) == name),
                    self.policy.timeout,
                )

            outcomes = self._router.map(wait, nodes)
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
        acks = {name: n for name, n in zip(nodes, outcomes, strict=True) if isinstance(n, int)}
        fewest = fewest_acks(self.description, acks, replicas, timeout)
        self._router.written.clear()
        return fewest


def _listing(transport: Transport, deadline: Deadline, commands: list[Command]) -> list[Reply]:
    """One SCAN page from one node, within the listing's ``deadline``."""
    with using(deadline):
        return transport.execute(commands, "listing keys")
