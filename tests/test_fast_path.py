"""RedisStore's RESP transport (kvckpt.stores.redis.transport) on real redis-servers, alone and under DCP.

The transport moves every data byte, so it is tested where a hand-written protocol client breaks:
buffer and chunk boundaries, replies split across recv calls, ranges at odd offsets, error replies in
the middle of a pipeline, and connections that die mid-reply (which must fail, never half-succeed).
"""

from __future__ import annotations

import array
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import kvckpt
from kvckpt.registry import open_store
from kvckpt.store import KVStore, RangeRead
from kvckpt.stores.redis import resp, transport, wrap_client
from kvckpt.stores.redis.client import ClientStore
from kvckpt.stores.redis.standalone import RedisStore
from kvckpt.testing.conformance import StoreTests
from tests.harness.raw import RedisRaw
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Sizes around every threshold the fast path switches on.
EDGES = sorted(
    {
        0,
        1,
        2,
        transport.DIRECT_SEND - 1,
        transport.DIRECT_SEND,
        transport.DIRECT_SEND + 1,
        resp.READ_BUFFER - 1,
        resp.READ_BUFFER,
        resp.READ_BUFFER + 3,
        transport.READ_PIECE - 1,
        transport.READ_PIECE + 1,
        2 * transport.READ_PIECE,
        transport.SEND_BUFFER + 5,
        (4 << 20) + 7,
    }
)


_BLOCK = bytes((i * 131 + (i >> 8)) & 0xFF for i in range(65521))  # prime length: no period in 2^k


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes where every position differs from its neighbours, so an offset slip shows."""
    start = seed % len(_BLOCK)
    block = _BLOCK[start:] + _BLOCK[:start]
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture(params=["tcp", "unix"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[RedisStore]:
    url = redis_server.url("fp") if request.param == "tcp" else redis_server.unix_url("fp", db=2)
    opened = open_store(url)
    assert isinstance(opened, RedisStore)
    yield opened
    opened.close()


@pytest.fixture
def tiny_buffers(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Read buffer, direct-receive threshold and range piece small enough that every reply spans many
    recv calls and every range many GETRANGEs."""
    read_buffer, direct, piece = request.param
    monkeypatch.setattr(resp, "READ_BUFFER", read_buffer)
    monkeypatch.setattr(resp, "DIRECT_RECV", direct)
    monkeypatch.setattr(transport, "READ_PIECE", piece)


# Which path a store takes ----------------------------------------------------------------------


def test_urls_open_the_transport_and_injected_clients_keep_theirs(redis_server: RedisServer) -> None:
    for url in (
        redis_server.url("x"),
        redis_server.unix_url("x"),
        f"rediss://127.0.0.1:{redis_server.port}/0/x",  # TLS runs over the same transport
    ):
        assert type(open_store(url)) is RedisStore
    assert type(wrap_client(redis.Redis(port=redis_server.port))) is ClientStore


class TestGenericPathOnRealServer(StoreTests):
    """The redis-py path (an injected client) stays correct against a real server too."""

    picklable = False

    @pytest.fixture
    def raw(self, redis_server: RedisServer) -> RedisRaw:
        return RedisRaw(redis.Redis(port=redis_server.port))

    @pytest.fixture
    def store(self, redis_server: RedisServer) -> Iterator[KVStore]:
        client = redis.Redis(port=redis_server.port)
        yield ClientStore(client=client)
        client.close()


# Bytes in, bytes out ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tiny_buffers",
    [(256 << 10, 64 << 10, 1 << 20), (64, 1 << 40, 1 << 20), (7, 3, 100_003)],
    indirect=True,
    ids=str,
)
def test_values_around_every_boundary_round_trip(
    store: RedisStore, namespace: str, tiny_buffers: None
) -> None:
    values = {f"{namespace}/v{size}": pattern(size, seed=size % 251) for size in EDGES}
    store.put_many([(k, memoryview(v)) for k, v in values.items()])  # one batch: small and large mixed
    assert store.get_many(list(values)) == list(values.values())
    targets = {k: bytearray(len(v)) for k, v in values.items()}
    counts = store.read_into_many([RangeRead(k, 0, memoryview(t)) for k, t in targets.items()])
    assert counts == [len(v) for v in values.values()]
    assert all(targets[k] == v for k, v in values.items())


@pytest.mark.parametrize(
    "tiny_buffers", [(256 << 10, 64 << 10, 1 << 20), (16, 5, 4099)], indirect=True, ids=str
)
def test_ranges_at_odd_offsets_missing_keys_and_short_values(
    store: RedisStore, namespace: str, tiny_buffers: None
) -> None:
    value = pattern((2 << 20) + 13)
    store.put_many([(f"{namespace}/v", value), (f"{namespace}/small", b"abc")])
    spans = [(0, 1), (1, 4095), (4097, 70_001), (65_535, 300_000), (len(value) - 3, 3), (12345, 1)]
    spans += [(3, (1 << 20) + 5), (0, len(value))]
    reads = [RangeRead(f"{namespace}/v", off, memoryview(bytearray(n))) for off, n in spans]
    reads += [
        RangeRead(f"{namespace}/v", len(value) - 10, memoryview(bytearray(3 << 20))),  # runs past the end
        RangeRead(f"{namespace}/v", len(value) + 5, memoryview(bytearray(8))),  # starts past the end
        RangeRead(f"{namespace}/missing", 0, memoryview(bytearray(70_000))),
        RangeRead(f"{namespace}/v", 5, memoryview(bytearray(0))),
        RangeRead(f"{namespace}/small", 1, memoryview(bytearray(10))),
    ]
    counts = store.read_into_many(reads)
    assert counts == [n for _, n in spans] + [10, 0, 0, 0, 2]
    for (off, n), read in zip(spans, reads, strict=False):
        assert bytes(read.into) == value[off : off + n]
    past = reads[len(spans)].into
    assert bytes(past[:10]) == value[-10:] and not any(past[10:])
    assert bytes(reads[-1].into[:2]) == b"bc"


def test_wide_item_buffers_are_filled_bytewise(store: RedisStore, namespace: str) -> None:
    values = array.array("d", range(100_000))  # 8-byte items: offsets and counts are still in bytes
    store.put_many([(f"{namespace}/t", memoryview(values))])
    target = array.array("d", bytes(8000))
    (count,) = store.read_into_many([RangeRead(f"{namespace}/t", 8 * 500, memoryview(target))])
    assert count == 8000
    assert target == array.array("d", range(500, 1500))


def test_thousands_of_small_values_in_one_batch(store: RedisStore, namespace: str) -> None:
    items = [(f"{namespace}/s/{i}", pattern(4096 + i % 7, seed=i)) for i in range(3000)]
    store.put_many(items, ttl=60)
    buffers = [bytearray(len(v)) for _, v in items]
    counts = store.read_into_many(
        [RangeRead(k, 0, memoryview(b)) for (k, _), b in zip(items, buffers, strict=True)]
    )
    assert counts == [len(v) for _, v in items]
    assert all(b == v for b, (_, v) in zip(buffers, items, strict=True))
    assert store.expire_many([k for k, _ in items[:2]] + [f"{namespace}/nope"], None) == [True, True, False]
    store.delete_many([k for k, _ in items])
    assert store.get_many([items[0][0], items[-1][0]]) == [None, None]


# Errors in the middle of a pipeline -----------------------------------------------------------


def test_error_reply_mid_pipeline_raises_and_keeps_the_connection_in_step(
    store: RedisStore, redis_server: RedisServer, namespace: str
) -> None:
    raw = redis.Redis(port=redis_server.port, db=store.endpoint.db)
    value = pattern(200_000)
    store.put_many([(f"{namespace}/a", value), (f"{namespace}/c", value)])
    raw.rpush(f"{namespace}/b", "not a string")
    reads = [RangeRead(f"{namespace}/{k}", 0, memoryview(bytearray(len(value)))) for k in "abc"]
    with pytest.raises(kvckpt.KVCheckpointError, match="WRONGTYPE") as info:
        store.read_into_many(reads)
    assert not isinstance(info.value, kvckpt.StoreUnavailableError)
    assert bytes(reads[2].into) == value  # the replies after the error were read, in order
    again = bytearray(len(value))
    assert store.read_into_many([RangeRead(f"{namespace}/c", 0, memoryview(again))]) == [len(value)]
    assert again == value
    raw.close()


def test_out_of_memory_mid_batch_is_store_full() -> None:
    with RedisServer(extra_args=["--maxmemory", "3mb"]) as server:
        full = open_store(server.url("oom"))
        try:
            with pytest.raises(kvckpt.StoreFullError, match="out of memory"):
                full.put_many([(f"oom/{i}", pattern(1 << 20)) for i in range(8)])
            full.delete_many([f"oom/{i}" for i in range(8)])
            full.put_many([("oom/after", b"fits")])  # the connection is still usable
            assert full.get("oom/after") == b"fits"
        finally:
            full.close()


def test_wrong_password_is_unavailable_and_names_no_secret() -> None:
    with RedisServer(extra_args=["--requirepass", "right-horse"]) as server:
        wrong = open_store(f"redis://:battery-staple@127.0.0.1:{server.port}/0/x")
        with pytest.raises(kvckpt.StoreUnavailableError, match="authentication failed") as info:
            wrong.put_many([("x/k", b"v")])
        assert "battery-staple" not in str(info.value)
        right = open_store(f"redis://:right-horse@127.0.0.1:{server.port}/3/x")
        right.put_many([("x/k", b"v")])
        assert redis.Redis(port=server.port, password="right-horse", db=3).get("x/k") == b"v"
        right.close()


# Connections that die -------------------------------------------------------------------------


class DyingSocket:
    """A real socket that fails after ``budget`` received bytes (shared across the connections)."""

    def __init__(self, sock: socket.socket, budget: list[int], how: str) -> None:
        self._sock, self._budget, self._how = sock, budget, how

    def recv_into(self, buffer: memoryview, *args: Any) -> int:
        if self._budget[0] <= 0:
            if self._how == "eof":
                return 0
            raise ConnectionResetError(104, "Connection reset by peer")
        view = memoryview(buffer)[: self._budget[0]]
        got = self._sock.recv_into(view)
        self._budget[0] -= got
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.fixture
def dying(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[int]]]:
    """Budgets of received bytes, one per new connection (a connection without one is healthy)."""
    budgets: list[list[int]] = []
    real_connect = transport.RespConnection.connect

    def connect(self: transport.RespConnection, wait: float | None = None) -> None:
        real_connect(self, wait)
        if budgets:
            assert self._sock is not None
            self._sock = DyingSocket(self._sock, budgets.pop(0), "reset" if len(budgets) % 2 else "eof")  # type: ignore[assignment]

    monkeypatch.setattr(transport.RespConnection, "connect", connect)
    yield budgets


def test_reply_cut_once_is_read_again_whole(
    store: RedisStore, namespace: str, dying: list[list[int]]
) -> None:
    value = pattern(8 << 20)
    store.put_many([(f"{namespace}/big", value)])
    store.close()  # drop pooled connections so the next one is the dying one
    dying.append([3 << 20])
    target = bytearray(len(value))
    assert store.read_into_many([RangeRead(f"{namespace}/big", 0, memoryview(target))]) == [len(value)]
    assert target == value


@pytest.mark.parametrize("budget", [0, 5, 1 << 20])
def test_connection_dying_on_every_try_fails_reads(
    store: RedisStore, namespace: str, dying: list[list[int]], budget: int
) -> None:
    store.put_many([(f"{namespace}/big", pattern(4 << 20))])
    store.close()
    dying.extend([[budget] for _ in range(store.policy.retries + 1)])
    with pytest.raises(kvckpt.StoreUnavailableError, match="cannot reach Redis while reading"):
        store.read_into_many([RangeRead(f"{namespace}/big", 0, memoryview(bytearray(4 << 20)))])
    assert not dying  # every attempt was made on a fresh connection


def test_server_killed_mid_read_is_unavailable() -> None:
    """SIGKILL while a read waits on the server: StoreUnavailableError, not a short or empty result."""
    with RedisServer() as server:
        store = open_store(server.unix_url("kill"), connect_timeout=1.0)
        store.put_many([("kill/a", pattern(1 << 20))])
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # the read below is sent, and waits for its reply
        outcome: list[Any] = []

        def read() -> None:
            try:
                outcome.append(store.read_into_many([RangeRead("kill/a", 0, memoryview(bytearray(1 << 20)))]))
            except Exception as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)
        os.kill(server.process.pid, signal.SIGKILL)
        reader.join(20)
        assert len(outcome) == 1 and isinstance(outcome[0], kvckpt.StoreUnavailableError), outcome
        store.close()


# Through DCP ------------------------------------------------------------------------------------


class _BoxPlanner:
    """The two LoadPlanner calls KVStorageReader makes, for hand-built ReadItems."""

    def __init__(self, targets: dict[str, torch.Tensor]) -> None:
        self.targets = targets
        self.committed: list[str] = []

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.targets[item.dest_index.fqn]

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        self.committed.append(item.dest_index.fqn)


def test_dcp_partial_reads_at_odd_offsets_across_chunks(redis_server: RedisServer, namespace: str) -> None:
    """Row slices of a saved tensor, as a resharding load asks for them: odd byte ranges that cross
    chunk and checksum-block boundaries, widened to whole blocks and verified."""
    url = redis_server.unix_url(namespace)
    weight = random_tensor((1000, 37), torch.float32, seed=5)
    kvckpt.save({"w": weight}, url, chunk_bytes=10_007, block_bytes=4099)
    reader = kvckpt.KVStorageReader(url)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    rows = {"a": (7, 12), "b": (333, 1), "c": (990, 10), "d": (0, 1000), "e": (270, 271)}
    targets = {name: torch.zeros(n, 37) for name, (_, n) in rows.items()}
    items = [
        ReadItem(
            type=LoadItemType.TENSOR,
            dest_index=MetadataIndex(name),
            dest_offsets=torch.Size([0, 0]),
            storage_index=MetadataIndex("w", torch.Size([0, 0])),
            storage_offsets=torch.Size([start, 0]),
            lengths=torch.Size([n, 37]),
        )
        for name, (start, n) in rows.items()
    ]
    planner = _BoxPlanner(targets)
    reader.read_data(LoadPlan(items), planner).wait()  # type: ignore[arg-type]
    assert sorted(planner.committed) == sorted(rows)
    for name, (start, n) in rows.items():
        assert bits_equal(targets[name], weight[start : start + n]), name
    reader.target.store.close()


@pytest.mark.parametrize("link", ["tcp", "unix"])
def test_dcp_round_trip_with_chunks_at_odd_sizes(
    redis_server: RedisServer, namespace: str, link: str
) -> None:
    url = redis_server.url(namespace) if link == "tcp" else redis_server.unix_url(namespace)
    state: dict[str, Any] = {
        "big": random_tensor((513, 1031), torch.float32, seed=1),  # ~2 MiB over chunks of 300,001 bytes
        "edge": random_tensor((transport.DIRECT_SEND + 1,), torch.uint8, seed=2),
        "many": {str(i): random_tensor((i + 1,), torch.bfloat16, seed=i) for i in range(300)},
        "step": 7,
    }
    kvckpt.save(state, url, chunk_bytes=300_001, block_bytes=65_537, io_threads=3)
    loaded: dict[str, Any] = {
        "big": torch.zeros(513, 1031),
        "edge": torch.zeros(transport.DIRECT_SEND + 1, dtype=torch.uint8),
        "many": {k: torch.zeros_like(v) for k, v in state["many"].items()},
        "step": 0,
    }
    kvckpt.load(loaded, url, io_threads=3)
    assert bits_equal(loaded["big"], state["big"]) and bits_equal(loaded["edge"], state["edge"])
    assert all(bits_equal(loaded["many"][k], v) for k, v in state["many"].items())
    assert loaded["step"] == 7


def test_dcp_save_cut_off_commits_nothing(
    redis_server: RedisServer, namespace: str, dying: list[list[int]]
) -> None:
    url = redis_server.url(namespace)
    raw = redis.Redis(port=redis_server.port)
    state = {f"t{i}": torch.full((1 << 18,), float(i)) for i in range(8)}  # 8 MiB in 1 MiB values
    dying.extend([[0] for _ in range(16)])  # replies to the SETs never arrive on any connection
    with pytest.raises(kvckpt.StoreUnavailableError):
        kvckpt.save(state, url, chunk_bytes=1 << 20)
    dying.clear()
    assert raw.get(f"{namespace}/.metadata") is None
    assert all(raw.pttl(k) > 0 for k in raw.scan_iter(match=f"{namespace}/*"))  # only expiring leftovers
    raw.close()


def test_dcp_load_cut_off_is_unavailable(
    redis_server: RedisServer, namespace: str, dying: list[list[int]]
) -> None:
    url = redis_server.unix_url(namespace)
    state = {"w": random_tensor((1024, 1024), torch.float32)}
    kvckpt.save(state, url)
    dying.extend([[1 << 20] for _ in range(16)])
    with pytest.raises(kvckpt.StoreUnavailableError, match="while reading"):
        kvckpt.load({"w": torch.zeros(1024, 1024)}, url)


@pytest.mark.parametrize("injected", [False, True], ids=["url", "injected-client"])
def test_user_without_password_authenticates_as_that_user(injected: bool) -> None:
    """``redis://user@host`` logs in as ``user`` (AUTH user ""), as an injected redis-py client does."""
    with RedisServer() as server:
        admin: Any = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "ckpt-np", "reset", "on", "nopass", "~np/*", "+@all")
        admin.close()
        url = f"redis://ckpt-np@127.0.0.1:{server.port}/0/np"
        client = redis.Redis(port=server.port, username="ckpt-np")
        store = ClientStore(client=client) if injected else open_store(url)
        store.put_many([("np/a", b"inside")])
        assert store.get_many(["np/a"]) == [b"inside"]
        with pytest.raises(kvckpt.KVCheckpointError, match="no permissions"):  # as default it could
            store.put_many([("elsewhere/a", b"outside")])
        store.close()
