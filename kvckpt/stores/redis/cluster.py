"""Redis Cluster backend: a checkpoint's keys spread over every shard, batches run per node in parallel.

Data keys carry no hash tags, so a checkpoint spreads over all primaries and no command here names two
keys. A batch is grouped by the node that serves each key's slot and sent as one pipeline per node, the
nodes in parallel threads. Keys a node refuses with a redirection are finished another way:

- ASK (the slot is migrating and the key has moved, or is new) and TRYAGAIN: sent one by one through
  redis-py's cluster client, which follows ASK with ASKING and retries TRYAGAIN;
- MOVED, CLUSTERDOWN or a node that does not answer: the slot table is refreshed and those keys go out
  again as per-node pipelines, a few rounds with a short backoff, then fail as StoreUnavailableError.

redis-py's own ClusterPipeline would also get redirections right (it re-sends failed commands one by one),
but it writes and reads the nodes one after another from a single thread.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import redis
import redis.exceptions as rex
from redis.cluster import ClusterNode

from kvckpt._buffers import key_bytes, key_str
from kvckpt.errors import KVCheckpointError, ReplicationError, StoreUnavailableError
from kvckpt.store import Buffer
from kvckpt.stores.redis.client import ClientStore, pipeline_runner
from kvckpt.stores.redis.common import (
    ACL_RULES,
    check_wait_args,
    glob_escape,
    password_of,
    replication_message,
    wait_on,
)
from kvckpt.stores.redis.retry import RetryPolicy
from kvckpt.stores.redis.url import parse_cluster_url
from kvckpt.urls import StoreURL, tls_of

logger = logging.getLogger(__name__)

SLOTS = 16384
#: An ACL user on every node needs these too: redis-py reads the slot table and the command table.
CLUSTER_ACL_RULES = (*ACL_RULES, "+cluster|slots", "+command")
#: Errors after which a node's keys are re-routed with a fresh slot table (MovedError is an AskError).
_REROUTE = (rex.MovedError, rex.ClusterDownError, rex.ConnectionError, rex.TimeoutError)
#: Errors that concern one key in a migrating slot: finished one by one by the cluster client.
_ONE_BY_ONE = (rex.AskError, rex.TryAgainError)

Command = tuple[Any, ...]  # ("SET", key, value, ...): the key is always args[1]
T = TypeVar("T")


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot of ``key`` (CRC16/XMODEM of the hash tag or key, in C via binascii)."""
    data = key_bytes(key) if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


class RedisClusterStore(ClientStore):
    """KVStore over a Redis Cluster (``redis+cluster://`` or an injected ``redis.RedisCluster``)."""

    cluster = True
    parse_url = staticmethod(parse_cluster_url)

    def __init__(
        self,
        *,
        client: Any = None,
        client_kwargs: dict[str, Any] | None = None,
        description: str = "injected redis cluster client",
        policy: RetryPolicy | None = None,
        max_workers: int = 16,
    ) -> None:
        if client is None and client_kwargs is None:
            raise TypeError("RedisClusterStore needs client= or client_kwargs=")
        super().__init__(client=client, description=description)
        self._injected = client is not None
        self._client_kwargs = client_kwargs or {}
        self.policy = policy or RetryPolicy()
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._written: set[str] = set()  # primaries written since the last wait_for_replicas
        self._written_unknown = False  # some write went through a redirection: WAIT on every primary

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
        **client_kwargs: Any,
    ) -> RedisClusterStore:
        """``url.hosts`` are startup nodes (one reachable is enough); ``retries`` bounds re-routing
        rounds and redis-py's own retries, with the same backoff (one RetryPolicy). Other keywords go
        to ``redis.RedisCluster`` (e.g. ``address_remap=``)."""
        policy = RetryPolicy(retries, backoff, backoff_cap, timeout, connect_timeout, total_timeout)
        tls = tls_of(url)
        files = {"ssl_ca_certs": tls.ca, "ssl_certfile": tls.cert, "ssl_keyfile": tls.key} if tls else {}
        kwargs: dict[str, Any] = {
            "username": url.username,
            "password": password_of(url, password),
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": replace(policy, retries=max(1, retries)).redis_py(),  # redis-py follows MOVED
            "health_check_interval": 0,
            "startup_nodes": list(url.hosts),
            "socket_keepalive": True,
            **({"ssl": True} if tls else {}),
            **{name: path for name, path in files.items() if path},
            **client_kwargs,
        }
        return cls(client_kwargs=kwargs, description=str(url.server), policy=policy)

    # Connection lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:  # I/O threads connect lazily at once: a second client would leak
                if self._client is None:
                    kwargs = dict(self._client_kwargs)
                    nodes = [ClusterNode(h, p) for h, p in kwargs.pop("startup_nodes")]  # type: ignore[no-untyped-call]
                    self._client = redis.RedisCluster(startup_nodes=nodes, **kwargs)
        return self._client

    def _once(self, *args: Any, **options: Any) -> Any:
        try:
            return super()._once(*args, **options)
        except (rex.AskError, rex.MovedError, rex.TryAgainError):
            # Redirected: nothing ran on that node. The cluster client follows the redirection
            # (only while the record's slot migrates, when its own retry policy applies).
            return self.client.execute_command(*args, **options)

    def _commit_client(self, key: str) -> Any:
        """The key's primary as a plain redis.Redis, so the commit is sent once and can be fenced
        (RedisCluster re-sends on its own after a lost reply)."""
        client = self.client
        return client.get_redis_connection(client.nodes_manager.get_node_from_slot(key_slot(key)))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._client is not None and not self._injected:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        if self._injected:
            return super().__getstate__()  # raises: an injected client does not cross processes
        state = self.__dict__.copy()
        state.update(_client=None, _executor=None, _written=set(), _written_unknown=False)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _reply_timeout(self) -> float | None:
        return self.policy.timeout

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        with super()._errors(action):
            try:
                yield
            except (rex.ClusterDownError, rex.RedisClusterException) as exc:
                if "Cluster mode is not enabled" in str(exc) or "cluster support disabled" in str(exc):
                    raise KVCheckpointError(
                        f"{self.description} is not a Redis Cluster; use redis://host:port/DB/NAMESPACE "
                        f"(the server said: {exc})"
                    ) from exc
                raise StoreUnavailableError(
                    f"{self.description}: the cluster cannot serve every slot while {action} "
                    f"({type(exc).__name__}); check CLUSTER INFO on its nodes"
                ) from exc

    # Per-node batches -----------------------------------------------------------------------

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T | BaseException]:
        """``fn`` over ``items`` in parallel threads; an exception is returned in place of a result."""

        def guarded(item: Any) -> T | BaseException:
            try:
                return fn(item)
            except Exception as exc:
                return exc

        if len(items) <= 1:
            return [guarded(item) for item in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix="kvckpt-cluster")
        return list(self._executor.map(guarded, items))

    def _by_node(self, commands: Sequence[Command], todo: Sequence[int]) -> list[tuple[Any, Any, list[int]]]:
        """(node client, node, command indices) per primary, by each key's slot in the cached table."""
        client = self.client
        nodes_by_slot: dict[int, Any] = {}
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i in todo:
            slot = key_slot(commands[i][1])
            node = nodes_by_slot.get(slot)
            if node is None:
                node = nodes_by_slot[slot] = client.nodes_manager.get_node_from_slot(slot)
            groups.setdefault(node.name, (node, []))[1].append(i)
        return [(client.get_redis_connection(node), node, idxs) for node, idxs in groups.values()]

    def _run(self, commands: Sequence[Command], *, writes: bool) -> list[Any]:
        """Replies to ``commands`` (single-key each) in order; raises the first non-routing error."""
        client = self.client
        replies: list[Any] = [None] * len(commands)
        todo: list[int] = list(range(len(commands)))
        one_by_one: list[int] = []
        for attempt in range(self.policy.retries + 1):
            groups = self._by_node(commands, todo)

            def send(group: tuple[Any, Any, list[int]]) -> list[Any]:
                node_client, _, idxs = group
                pipe = node_client.pipeline(transaction=False)
                for i in idxs:
                    pipe.execute_command(*commands[i])
                return list(pipe.execute(raise_on_error=False))

            todo, failure = [], None
            for (_, node, idxs), outcome in zip(groups, self._map(send, groups), strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, _REROUTE):
                        raise outcome
                    todo += idxs
                    failure = outcome
                    continue
                for i, reply in zip(idxs, outcome, strict=True):
                    if isinstance(reply, _REROUTE):
                        todo.append(i)
                        failure = reply
                    elif isinstance(reply, _ONE_BY_ONE):
                        one_by_one.append(i)
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        replies[i] = reply
                if writes:
                    self._written.add(node.name)
            if not todo:
                break
            logger.debug(
                "%s: %d key(s) re-routed after %s (round %d)",
                self.description,
                len(todo),
                type(failure).__name__,
                attempt + 1,
            )
            assert failure is not None
            if attempt == self.policy.retries:
                if not isinstance(failure, rex.MovedError):
                    raise failure
                one_by_one += todo  # still MOVED: let the cluster client follow the redirections
                break
            time.sleep(self.policy.delay(attempt))
            client.nodes_manager.initialize()
        if one_by_one:
            logger.debug(
                "%s: %d key(s) in migrating slots sent one by one", self.description, len(one_by_one)
            )
            self._written_unknown |= writes
            for i in sorted(one_by_one):
                replies[i] = client.execute_command(*commands[i])
        return replies

    # KVStore --------------------------------------------------------------------------------

    def put(self, key: str, value: Buffer, *, create: bool = False, ttl: float | None = None) -> bool:
        written = super().put(key, value, create=create, ttl=ttl)
        self._note_write(key)
        return written

    def swap(self, key: str, value: Buffer, *, ttl: float | None = None) -> bytes | None:
        previous = super().swap(key, value, ttl=ttl)
        self._note_write(key)
        return previous

    def _fence_on(self, node: Any, fence_key: str | None) -> str | None:
        """A key for WAIT's fencing write that ``node`` owns: ``fence_key`` plus a hash tag."""
        if fence_key is None:
            return None
        owner = self.client.nodes_manager.get_node_from_slot
        for tag in range(100_000):
            key = f"{fence_key}{{{tag}}}"
            if owner(key_slot(key)).name == node.name:
                return key
        return None  # a node owning no slot: WAIT falls back to PING

    def _note_write(self, key: str) -> None:
        with contextlib.suppress(Exception):  # only bookkeeping for WAIT: unknown means "every primary"
            self._written.add(self.client.nodes_manager.get_node_from_slot(key_slot(key)).name)
            return
        self._written_unknown = True

    def scan_prefix(self, prefix: str) -> Iterator[str]:
        """SCAN every primary; a node that fails mid-scan gets one rescan after a topology refresh."""
        pattern = glob_escape(prefix) + "*"
        seen: set[str] = set()  # a key migrating during the scan can show up on two nodes
        with self._errors("listing keys"):
            for attempt in range(2):
                try:
                    for node in self.client.get_primaries():
                        node_client = self.client.get_redis_connection(node)
                        for raw in node_client.scan_iter(match=pattern, count=1000):
                            key = key_str(raw)
                            if key.startswith(prefix) and key not in seen:
                                seen.add(key)
                                yield key
                    return
                except (rex.ConnectionError, rex.TimeoutError):
                    if attempt:
                        raise
                    self.client.nodes_manager.initialize()

    # Server safety --------------------------------------------------------------------------

    def _servers(self) -> list[tuple[str, Any]]:
        """Every node, replicas included: a promoted replica brings its own maxmemory-policy.

        The slot table is re-read first so a node that failed since the last command is not asked.
        """
        client = self.client
        client.nodes_manager.initialize()
        nodes = client.get_nodes()
        return [(f"{self.description} node {n.name}", client.get_redis_connection(n)) for n in nodes]

    def wait_for_replicas(self, replicas: int, timeout: float, fence_key: str | None = None) -> int:
        """WAIT on every primary that took this store's writes since the last call, in parallel.

        Returns the fewest acknowledgements. A store that wrote nothing itself (the caller wrote through
        another instance) waits on every primary. A node that took writes but is no longer a primary
        was failed over: writes it had not replicated may be lost, so that is a ReplicationError too.
        """
        check_wait_args(replicas, timeout)
        with self._errors("waiting for replicas"):
            client = self.client
            client.nodes_manager.initialize()  # current primaries: failovers since the writes show
            if self._written_unknown or not self._written:
                nodes = list(client.get_primaries())
            else:
                primaries = {n.name: n for n in client.get_primaries()}
                lost = sorted(self._written - primaries.keys())
                if lost:
                    self._written.clear()  # reported once: a save after this one starts afresh
                    raise ReplicationError(
                        f"{self.description}: node(s) {', '.join(lost)} took writes but are no longer "
                        "primaries (a failover?); writes they had not replicated may be lost: save again",
                        nodes=lost,
                    )
                nodes = [primaries[name] for name in sorted(self._written)]
            waits = [(client.get_redis_connection(n), self._fence_on(n, fence_key)) for n in nodes]
            outcomes = self._map(
                lambda cw: wait_on(pipeline_runner(cw[0]), replicas, timeout, cw[1], self.policy.timeout),
                waits,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        acks = {node.name: outcome for node, outcome in zip(nodes, outcomes, strict=True)}
        short = {name: n for name, n in acks.items() if isinstance(n, int) and n < replicas}
        if short:
            name, acked = min(short.items(), key=lambda item: item[1])
            raise ReplicationError(
                replication_message(f"{self.description} primary {name}", acked, replicas, timeout),
                acked=acked,
                wanted=replicas,
                nodes=sorted(short),
            )
        self._written.clear()
        self._written_unknown = False
        return min((n for n in acks.values() if isinstance(n, int)), default=replicas)
