"""A backend behind a FaultProxy, for the fault and race suites.

Each backend says how to address it through the proxy and directly, and which client bytes mark
each protocol step (the commit, a data write, a data read). A new backend joins every scenario by
adding a parameter to ``faulty`` and a ``Faulty`` built for it. On a Redis Cluster every node, replicas
included, has its own FaultProxy; the proxies share one set of faults (tests/harness/proxy.py), so
``Faulty.proxy`` acts on all of them as if the cluster sat behind one network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from kvckpt import layout
from kvckpt.stores.redis.commands import COMMIT_SCRIPT
from tests.harness.proxy import FaultProxy, resp_prefix
from tests.harness.servers import RedisCluster, RedisServer
from tests.helpers import bits_equal, random_tensor

#: Store options that make a dead link fail in about a second instead of the 30 s default.
QUICK = {"timeout": 1.0, "connect_timeout": 1.0, "retries": 2, "backoff": 0.01, "backoff_cap": 0.1}


@dataclass(frozen=True)
class Remap:
    """``address_remap`` for a Cluster store: each node's announced port to its proxy's port.

    A class, not a closure, so it pickles into the spawned processes of a multi-process test.
    """

    ports: dict[int, int]

    def __call__(self, address: tuple[str, int]) -> tuple[str, int]:
        return "127.0.0.1", self.ports[address[1]]


@dataclass
class Faulty:
    name: str
    proxy: FaultProxy  # on a Cluster one of the node proxies, acting on all (they share their faults)
    via_proxy: Callable[[str], str]
    direct: Callable[[str], str]
    raw: Any  # a redis-py-style client on the server itself, for inspection and tampering
    commit: Callable[[str], bytes]  # client bytes that start the commit of a namespace
    data_write: Callable[[str], bytes]  # client bytes in every data write of a namespace
    data_read: bytes  # client bytes that start a ranged data read
    #: Store options needed to reach the store through the proxies at all (a Cluster's address_remap).
    reach: dict[str, Any] = field(default_factory=dict)
    #: ``reach`` plus QUICK: the store options of the saves and loads under test.
    options: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.options = {**QUICK, **self.reach}

    def keys(self, namespace: str) -> set[str]:
        return {k.decode() for k in self.raw.scan_iter(match=f"{namespace}/*")}

    def record(self, namespace: str) -> bytes | None:
        value: bytes | None = self.raw.get(layout.record_key(namespace))
        return value

    def ttl_ms(self, key: str) -> int:
        return int(self.raw.pttl(key))


def commit_bytes(namespace: str) -> bytes:
    """What a Redis client sends to start the commit of ``namespace``: the commit script's EVAL."""
    return resp_prefix("EVAL", COMMIT_SCRIPT, "2", layout.record_key(namespace))


def redis_faulty(server: RedisServer, proxy: FaultProxy) -> Faulty:
    import redis

    return Faulty(
        name="redis",
        proxy=proxy,
        via_proxy=lambda ns: f"redis://127.0.0.1:{proxy.port}/0/{ns}",
        direct=server.url,
        raw=redis.Redis(port=server.port),
        commit=commit_bytes,
        data_write=lambda ns: f"{ns}/g".encode(),
        data_read=resp_prefix("GETRANGE"),
    )


def cluster_faulty(cluster: RedisCluster, stack: contextlib.ExitStack) -> Faulty:
    import redis

    cluster.wait_healthy()  # a test before may have failed a node over; start from a settled cluster
    first: FaultProxy | None = None
    proxies: dict[int, FaultProxy] = {}
    for node in cluster.live():
        proxies[node.port] = stack.enter_context(FaultProxy(node.port, network=first))
        first = first or proxies[node.port]
    assert first is not None
    startup = ",".join(f"127.0.0.1:{proxy.port}" for proxy in list(proxies.values())[:2])
    raw = redis.RedisCluster(host="127.0.0.1", port=cluster.live()[0].port)
    stack.callback(raw.close)
    return Faulty(
        name="redis+cluster",
        proxy=first,
        via_proxy=lambda ns: f"redis+cluster://{startup}/{ns}",
        direct=cluster.url,
        raw=raw,
        commit=commit_bytes,
        data_write=lambda ns: f"{ns}/g".encode(),
        data_read=resp_prefix("GETRANGE"),
        reach={"address_remap": Remap({port: proxy.port for port, proxy in proxies.items()})},
    )


#: The backends every scenario runs on. A test that means nothing on some of them narrows the list
#: with ``@pytest.mark.parametrize("faulty", [...], indirect=True)`` and says why.
BACKENDS = ["redis", "redis+cluster"]


@pytest.fixture(params=BACKENDS)
def faulty(request: pytest.FixtureRequest) -> Iterator[Faulty]:
    with contextlib.ExitStack() as stack:
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            proxy = stack.enter_context(FaultProxy(server.port))
            backend = redis_faulty(server, proxy)
            stack.callback(backend.raw.close)
        else:
            backend = cluster_faulty(request.getfixturevalue("redis_cluster"), stack)
        yield backend
        backend.proxy.release()  # heal what the test left: the servers are the session's
        backend.proxy.accept()


@dataclass
class Proxied:
    """A Redis server, or every node of a Redis Cluster, behind FaultProxies: the same faults for
    both Redis stores (a Cluster store reaches the proxies through ``address_remap``)."""

    name: str
    url: Callable[[str], str]
    proxies: list[FaultProxy]
    options: dict[str, Any]

    def refuse(self) -> None:
        """Every node looks down: open links dropped, new ones refused."""
        for proxy in self.proxies:
            proxy.refuse()
            proxy.cut()

    def stall(self) -> None:
        """Every node accepts but never answers."""
        for proxy in self.proxies:
            proxy.stall()


@pytest.fixture(params=["redis", "redis+cluster"])
def proxied(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Proxied]:
    with contextlib.ExitStack() as stack:
        if request.param == "redis":
            proxy = stack.enter_context(FaultProxy(redis_server.port))
            yield Proxied("redis", lambda ns: f"redis://127.0.0.1:{proxy.port}/0/{ns}", [proxy], {})
            return
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        by_port = {node.port: stack.enter_context(FaultProxy(node.port)) for node in cluster.live()}

        def remap(address: tuple[str, int]) -> tuple[str, int]:
            return "127.0.0.1", by_port[address[1]].port

        startup = ",".join(f"127.0.0.1:{p.port}" for p in list(by_port.values())[:2])
        proxies = list(by_port.values())
        yield Proxied(
            "redis+cluster", lambda ns: f"redis+cluster://{startup}/{ns}", proxies, {"address_remap": remap}
        )


def state(generation: int, tensors: int = 4) -> dict[str, Any]:
    """~1 MiB per tensor, every tensor tagged with its generation so a mix is visible."""
    out: dict[str, Any] = {
        f"layer{i}.w": random_tensor((256, 1024), torch.float32, seed=100 * generation + i)
        for i in range(tensors)
    }
    out["gen"] = torch.full((16,), generation, dtype=torch.int64)
    out["step"] = generation
    return out


def blank(tensors: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {f"layer{i}.w": torch.zeros(256, 1024) for i in range(tensors)}
    out["gen"] = torch.zeros(16, dtype=torch.int64)
    out["step"] = -1
    return out


def same(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    """Bit-exact equality of two flat state dicts."""
    if set(expected) != set(actual):
        return False
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            if not bits_equal(value, actual[key]):
                return False
        elif value != actual[key]:
            return False
    return True


def generation_of(loaded: dict[str, Any], tensors: int = 4) -> int:
    """The one generation every value of a loaded state came from; AssertionError on a mix."""
    gens = {int(v) for v in loaded["gen"]} | {loaded["step"]}
    assert len(gens) == 1, f"a mix of generations: {gens}"
    (gen,) = gens
    assert same(state(gen, tensors), loaded), f"generation {gen} loaded with foreign tensor data"
    return gen
