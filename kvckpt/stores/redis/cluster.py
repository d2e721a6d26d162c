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

A commit (``SET NX``, ``SET GET``) is sent once to the key's primary and fenced like on a standalone
server; only a redirection, after which nothing ran, sends it again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis.exceptions as rex

from kvckpt._buffers import key_str
from kvckpt.errors import ReplicationError, StoreUnavailableError
from kvckpt.store import Buffer, Capabilities, KVStore, RangeRead
from kvckpt.stores.redis.common import (
    ACL_RULES,
    REDIS_MAX_VALUE,
    check_settings,
    check_wait_args,
    expiry_commands,
    expiry_results,
    glob_escape,
    ms,
    password_of,
    px,
    replication_message,
    str_of,
    translated,
    wait_on,
)
from kvckpt.stores.redis.retry import GaveUp, RetryPolicy
from kvckpt.stores.redis.routing import Command, Router
from kvckpt.stores.redis.slots import Address, AddressRemap, SlotTable, key_slot
from kvckpt.stores.redis.transport import Endpoint, Reply, RespConnection, raise_first
from kvckpt.stores.redis.url import parse_cluster_url
from kvckpt.urls import StoreURL, tls_of

__all__ = ["CLUSTER_ACL_RULES", "RedisClusterStore", "key_slot"]

#: An ACL user on every node needs these too: the slot table, and ASKING while a slot migrates.
CLUSTER_ACL_RULES = (*ACL_RULES, "+cluster|slots", "+asking")
#: Failures that mean some slot has no node to serve it (after the retry policy gave up).
_UNSERVED = (rex.ClusterDownError, rex.TryAgainError, rex.AskError)


class RedisClusterStore(KVStore):
    """KVStore over a Redis Cluster: one RESP transport per node, one retry policy for all."""

    capabilities = Capabilities(max_value_bytes=REDIS_MAX_VALUE, native_ranges=True, ttl=True)
    parse_url = staticmethod(parse_cluster_url)

    def __init__(
        self,
        startup: Sequence[Address],
        endpoint: Endpoint,
        policy: RetryPolicy,
        description: str,
        address_remap: AddressRemap | None = None,
        max_workers: int = 16,
    ) -> None:
        self._router = Router(startup, endpoint, policy, description, address_remap, max_workers)
        self.policy = policy
        self.description = description

    @classmethod
    def from_url(
        cls,
        url: StoreURL,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        total_timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.05,
        backoff_cap: float = 1.0,
        password: str | None = None,
        address_remap: AddressRemap | None = None,
    ) -> RedisClusterStore:
        """``url.hosts`` are startup nodes (one that answers is enough); the options are those of
        ``redis://`` URLs (kvckpt.stores.redis.standalone). ``address_remap`` maps each address the
        nodes announce, ``(host, port)``, to the one to connect to."""
        tls = tls_of(url)
        endpoint = Endpoint(
            username=url.username,
            password=password_of(url, password),
            timeout=timeout,
            connect_timeout=connect_timeout,
            tls=tls is not None,
            ca=tls.ca if tls else None,
            cert=tls.cert if tls else None,
            key=tls.key if tls else None,
        )
        policy = RetryPolicy(retries, backoff, backoff_cap, timeout, connect_timeout, total_timeout)
        return cls(url.hosts, endpoint, policy, str(url.server), address_remap)

    def close(self) -> None:
        self._router.close()

    def __getstate__(self) -> dict[str, Any]:
        router = self._router
        names = ("startup", "endpoint", "policy", "description", "address_remap", "max_workers")
        return {name: getattr(router, name) for name in names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

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

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("reading"):
            replies = self._router.commands([("GET", key) for key in keys], writes=False, what="reading")
        return [r if isinstance(r, bytes) else None for r in replies]

    def value_sizes(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        with self._errors("reading sizes"):
            replies = self._router.commands(
                [("STRLEN", key) for key in keys], writes=False, what="reading sizes"
            )
        return [int(n) if isinstance(n, int) else 0 for n in replies]

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

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        with self._errors("writing"):
            if create:
                return self._router.once(("SET", key, value, "NX", *px(ttl))) is not None
            self._router.commands([("SET", key, value, *px(ttl))], writes=True, what="writing")
            return True

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        with self._errors("writing"):
            previous = self._router.once(("SET", key, value, "GET", *px(ttl)))
        return previous if isinstance(previous, bytes) else None

    def take(self, key: str) -> bytes | None:
        with self._errors("deleting"):
            (value,) = self._router.commands([("GETDEL", key)], writes=True, what="deleting")
        return value if isinstance(value, bytes) else None

    def expire_many(self, keys: Sequence[str], ttl: float | None) -> list[bool]:
        if not keys:
            return []
        with self._errors("setting expiry"):
            replies = self._router.commands(expiry_commands(keys, ttl), writes=True, what="setting expiry")
        return expiry_results(replies, ttl)

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            with self._errors("deleting"):
                self._router.commands([("UNLINK", key) for key in keys], writes=True, what="deleting")

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        """SCAN every primary; a node that fails mid-scan gets one rescan after a table refresh."""
        pattern = glob_escape(prefix) + "*"
        seen: set[str] = set()  # a key migrating during the scan can show up on two nodes
        with self._errors("listing keys"):
            for attempt in range(2):
                try:
                    for name in self._router.table().primaries:
                        for key in self._scan_node(name, pattern):
                            if key.startswith(prefix) and key not in seen:
                                seen.add(key)
                                yield key
                    return
                except GaveUp:
                    if attempt:
                        raise
                    self._router.refresh(time.monotonic())

    def _scan_node(self, name: str, pattern: str) -> Iterator[str]:
        cursor: Reply = b"0"
        while True:
            command = ("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            (reply,) = self._router.transport(name).execute([command], "listing keys")  # type: ignore[list-item]
            assert isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)
            cursor = reply[0]
            for raw in reply[1]:
                yield key_str(raw if isinstance(raw, bytes) else str(raw))
            if cursor in (b"0", "0", 0):
                return

    # Server safety --------------------------------------------------------------------------

    def check_server_settings(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Every node, replicas included (a promoted replica brings its own maxmemory-policy); the
        slot table is re-read first so a node that failed since the last command is not asked."""

        def config_get(name: str) -> Callable[[], dict[str, str]]:
            def get() -> dict[str, str]:
                (reply,) = self._router.transport(name).execute(
                    [("CONFIG", "GET", "maxmemory*")], "reading settings"
                )
                assert isinstance(reply, list)
                return {str_of(k): str_of(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}

            return get

        with self._errors("reading server settings"):
            table = self._router.refresh(time.monotonic())
            nodes = [*table.primaries, *table.replicas()]
            return check_settings(
                [(f"{self.description} node {n}", config_get(n)) for n in nodes], allow_eviction
            )

    def _fence_on(self, name: str, fence_key: str | None, table: SlotTable) -> str | None:
        """A key for WAIT's fencing write that ``name`` owns: ``fence_key`` plus a hash tag."""
        if fence_key is None:
            return None
        for tag in range(100_000):
            key = f"{fence_key}{{{tag}}}"
            if table.owner(key_slot(key)) == name:
                return key
        return None  # a node owning no slot: WAIT falls back to PING

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """WAIT on every primary that took this store's writes since the last call, in parallel.

        Returns the fewest acknowledgements. A store that wrote nothing itself (the caller wrote through
        another instance) waits on every primary. A node that took writes but is no longer a primary
        was failed over: writes it had not replicated may be lost, so that is a ReplicationError too.
        """
        check_wait_args(replicas, timeout)
        with self._errors("waiting for replicas"):
            table = self._router.refresh(
                time.monotonic()
            )  # current primaries: failovers since the writes show
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
                    run, replicas, timeout, self._fence_on(name, fence_key, table), self.policy.timeout
                )

            outcomes = self._router.map(wait, nodes)
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
        acks = {name: n for name, n in zip(nodes, outcomes, strict=True) if isinstance(n, int)}
        short = {name: n for name, n in acks.items() if n < replicas}
        if short:
            name, acked = min(short.items(), key=lambda item: item[1])
            raise ReplicationError(
                replication_message(f"{self.description} primary {name}", acked, replicas, timeout),
                acked=acked,
                wanted=replicas,
                nodes=sorted(short),
            )
        self._router.written.clear()
        return min(acks.values(), default=replicas)
