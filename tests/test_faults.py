"""Network faults, restarts and a full server, against real servers (docs/reliability.md).

A failed save raises a kvckpt error, never becomes visible and never damages the checkpoint already
committed under its id; a failed load raises within the configured timeout instead of returning;
idempotent reads and data writes are retried within bounds; the commit is sent exactly once.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed.checkpoint as dcp

import kvckpt
from kvckpt import layout
from kvckpt.dcp.api import unwrapped_errors
from tests.faulty import QUICK, Faulty, Proxied, blank, commit_bytes, faulty, proxied, same, state
from tests.harness.proxy import FaultProxy, resp_prefix
from tests.harness.servers import REDIS_CHECKPOINT_SETTINGS, RedisServer

__all__ = ["faulty", "proxied"]  # the fixtures, imported for pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PENDING = 900.0  # pending_ttl of the saves under test, seconds
CHUNK = 256 << 10

CUTS: dict[str, Callable[[Faulty, str, bool], None]] = {
    # 1.5 MB into ~4 MB of tensor data: some chunks landed, the rest never will
    "during-data": lambda f, ns, down: f.proxy.cut_after_bytes(1_500_000, refuse_after=down),
    "before-commit": lambda f, ns, down: f.proxy.cut_on(f.commit(ns), refuse_after=down),
    "during-commit": lambda f, ns, down: f.proxy.cut_on(f.commit(ns), refuse_after=down, partial=True),
}


def save(faulty: Faulty, namespace: str, generation: int, **options: Any) -> None:
    store_options = {**faulty.options, **options.pop("store_options", {})}
    kvckpt.save(
        state(generation),
        faulty.via_proxy(namespace),
        chunk_bytes=CHUNK,
        batch_bytes=4 * CHUNK,
        pending_ttl=PENDING,
        store_options=store_options,
        **options,
    )


def load_direct(faulty: Faulty, namespace: str) -> dict[str, Any]:
    loaded = blank()
    kvckpt.load(loaded, faulty.direct(namespace))
    return loaded


def generations(faulty: Faulty, namespace: str) -> set[str]:
    keys = [k.removeprefix(f"{namespace}/") for k in faulty.keys(namespace)]
    return {k.split("/")[0] for k in keys if not k.endswith(layout.RECORD_NAME)}  # chunks and packs


# Saves ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", list(CUTS))
def test_save_cut_with_store_down_keeps_previous(faulty: Faulty, namespace: str, point: str) -> None:
    kvckpt.save(state(1), faulty.direct(namespace))
    record, keys = faulty.record(namespace), faulty.keys(namespace)
    CUTS[point](faulty, namespace, True)
    with pytest.raises(kvckpt.StoreUnavailableError) as info:
        save(faulty, namespace, 2, overwrite=True)
    assert faulty.proxy.fired == 1
    faulty.proxy.accept()  # the server is back
    assert faulty.record(namespace) == record
    assert same(state(1), load_direct(faulty, namespace))
    left = faulty.keys(namespace) - keys
    markers = {k for k in left if k.startswith(f"{namespace}/{layout.LIVE_NAME}/")}
    assert all(0 < faulty.ttl_ms(k) <= 60_000 for k in markers)  # the dead save's marker lapses
    unfinished = layout.unfinished_key(namespace)  # tells the next save to look for what this left
    assert unfinished in left and 0 < faulty.ttl_ms(unfinished) <= PENDING * 1000
    left -= markers | {unfinished}
    assert left, "the cut was meant to land after some data"
    if point == "during-data":  # nothing made permanent: it all expires on its own
        assert all(0 < faulty.ttl_ms(k) <= PENDING * 1000 for k in left)
    else:  # the commit's fate could not be read back: its data is kept, and the error says so
        assert "unknown" in str(info.value)
        assert all(faulty.ttl_ms(k) == -1 for k in left)


@pytest.mark.parametrize("point", ["before-commit", "during-commit"])
def test_commit_cut_with_store_back_removes_data(faulty: Faulty, namespace: str, point: str) -> None:
    kvckpt.save(state(1), faulty.direct(namespace))
    record, keys = faulty.record(namespace), faulty.keys(namespace)
    CUTS[point](faulty, namespace, False)
    with pytest.raises(kvckpt.StoreUnavailableError, match="did not take effect"):
        save(faulty, namespace, 2, overwrite=True)
    assert faulty.proxy.fired == 1
    assert faulty.proxy.seen(faulty.commit(namespace)) == 1  # not re-sent
    assert faulty.record(namespace) == record
    assert faulty.keys(namespace) == keys
    assert same(state(1), load_direct(faulty, namespace))


@pytest.mark.parametrize("overwrite", [False, True], ids=["create", "overwrite"])
def test_lost_commit_reply_is_read_back_not_resent(faulty: Faulty, namespace: str, overwrite: bool) -> None:
    """The server ran the commit but its reply never arrived: the save succeeds, sent once."""
    if overwrite:
        kvckpt.save(state(1), faulty.direct(namespace))
    faulty.proxy.drop_reply_on(faulty.commit(namespace))
    save(faulty, namespace, 2, overwrite=overwrite)
    assert faulty.proxy.fired == 1
    assert faulty.proxy.seen(faulty.commit(namespace)) == 1
    assert same(state(2), load_direct(faulty, namespace))
    assert len(generations(faulty, namespace)) == 1  # the replaced generation was still retired


def test_commit_held_past_timeout_can_never_land_late(faulty: Faulty, namespace: str) -> None:
    """The commit sits in the network past the timeout; the writer fences it before giving up."""
    kvckpt.save(state(1), faulty.direct(namespace))
    record, keys = faulty.record(namespace), faulty.keys(namespace)
    faulty.proxy.hold_on(faulty.commit(namespace), times=1)
    with pytest.raises(kvckpt.StoreUnavailableError, match="did not take effect"):
        save(faulty, namespace, 2, overwrite=True)
    faulty.proxy.release()  # the held commit finally reaches the server...
    faulty.proxy.wait_for(lambda: faulty.proxy.held() == 0, what="release")
    time.sleep(0.3)
    assert faulty.record(namespace) == record  # ...on a connection the server already closed
    assert faulty.keys(namespace) == keys
    assert same(state(1), load_direct(faulty, namespace))


def test_a_failed_finish_leaves_no_live_marker(faulty: Faulty, namespace: str) -> None:
    """Settling the data's expiry fails: the save is over, so its liveness marker must go at once,
    not be refreshed for as long as the writer object lives (gc skips the namespace meanwhile)."""
    writer = kvckpt.KVStorageWriter(
        faulty.via_proxy(namespace), live_ttl=1.0, store_options={**faulty.options, "retries": 0}
    )
    faulty.proxy.cut_on(resp_prefix("PERSIST"))
    with pytest.raises(BaseException, match="StoreUnavailableError"):  # DCP's own wrapper
        dcp.save(state(2), storage_writer=writer, no_dist=True)
    time.sleep(2.0)  # two live_ttl: a marker still refreshed would be there
    assert not [k for k in faulty.keys(namespace) if "/.live/" in k]
    assert writer is not None  # the writer lives on, as a training loop keeps it


def test_transient_cut_during_data_is_retried(faulty: Faulty, namespace: str) -> None:
    faulty.proxy.cut_after_bytes(1_500_000)
    save(faulty, namespace, 2)
    assert faulty.proxy.fired == 1
    assert same(state(2), load_direct(faulty, namespace))


def test_without_retries_a_transient_cut_fails_and_cleans_up(faulty: Faulty, namespace: str) -> None:
    faulty.proxy.cut_after_bytes(1_500_000)
    with pytest.raises(kvckpt.StoreUnavailableError):
        save(faulty, namespace, 2, store_options={"retries": 0})
    assert faulty.proxy.fired == 1
    assert faulty.record(namespace) is None
    assert faulty.keys(namespace) == set()  # the store answered again: the failed rank removed its data


@pytest.mark.parametrize("retries", [0, 3])
def test_retries_are_bounded_and_configurable(
    faulty: Faulty, namespace: str, retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="kvckpt")
    store = kvckpt.open_store(faulty.via_proxy(namespace), **{**faulty.options, "retries": retries})
    try:
        assert store.get(f"{namespace}/k") is None
        faulty.proxy.refuse()
        faulty.proxy.cut()
        before = faulty.proxy.accepted
        with pytest.raises(kvckpt.StoreUnavailableError, match="cannot reach"):
            store.get(f"{namespace}/k")
        if faulty.name == "redis+cluster":  # a round is counted by its log line: between rounds
            # the slot table is re-read from any node that answers, so connections outnumber rounds
            rounds = 1 + len([r for r in caplog.records if "retry" in r.getMessage()])
            assert rounds == retries + 1 and faulty.proxy.accepted - before >= rounds
        else:
            assert faulty.proxy.accepted - before == retries + 1
    finally:
        store.close()


def test_backoff_is_configurable(faulty: Faulty, namespace: str) -> None:
    """Two retries with a fixed 0.3 s backoff, each wait from 0.15 to 0.3 s (equal jitter), wait at
    least 0.3 s in all (a lower bound: noise only adds)."""
    options = {**faulty.options, "retries": 2, "backoff": 0.3, "backoff_cap": 0.3}
    store = kvckpt.open_store(faulty.via_proxy(namespace), **options)
    faulty.proxy.refuse()
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError):
        store.get(f"{namespace}/k")
    assert time.monotonic() - started >= 0.3
    store.close()


#: Every bulk operation of the KVStore interface, as one call on a store.
BULK: dict[str, Callable[[Any, str], object]] = {
    "get_many": lambda store, ns: store.get_many([f"{ns}/a", f"{ns}/b"]),
    "read_into_many": lambda store, ns: store.read_into_many(
        [kvckpt.RangeRead(f"{ns}/a", 0, memoryview(bytearray(8)))]
    ),
    "put_many": lambda store, ns: store.put_many([(f"{ns}/a", b"x"), (f"{ns}/b", b"y")], ttl=60),
    "expire_many": lambda store, ns: store.expire_many([f"{ns}/a"], 60),
    "persist_many": lambda store, ns: store.expire_many([f"{ns}/a"], None),
    "delete_many": lambda store, ns: store.delete_many([f"{ns}/a", f"{ns}/b"]),
    "scan_prefix": lambda store, ns: list(store.scan_prefix(f"{ns}/")),
}


@pytest.mark.parametrize("operation", list(BULK))
def test_every_bulk_operation_follows_the_backoff(
    proxied: Proxied, namespace: str, operation: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two retries with a fixed 0.3 s backoff, each logged waiting from 0.15 to 0.3 s (equal jitter),
    and at least 0.3 s spent (a lower bound); on a Cluster too, whose store re-reads the slot table
    between rounds."""
    import logging

    caplog.set_level(logging.INFO, logger="kvckpt")
    options = {**QUICK, **proxied.options, "retries": 2, "backoff": 0.3, "backoff_cap": 0.3}
    store = kvckpt.open_store(proxied.url(namespace), **options)
    if proxied.name == "redis+cluster":
        store.get(f"{namespace}/warm")  # the slot table is read and links are open before the fault
    proxied.refuse()
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError, match="cannot reach"):
        BULK[operation](store, namespace)
    elapsed = time.monotonic() - started
    store.close()
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    waits = [float(m.rsplit(" in ", 1)[1].rstrip("s")) for m in retries]
    assert len(waits) == 2 and all(0.15 <= w <= 0.3 for w in waits), retries
    assert elapsed >= 0.3


@pytest.mark.parametrize("operation", ["get", "read_into_many", "put_many", "scan_prefix"])
def test_a_hung_server_fails_within_the_total_timeout(
    proxied: Proxied, namespace: str, operation: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server (or every Cluster node) that accepts but never answers: at most total_timeout /
    timeout attempts, each retry logged, and a message that says so instead of advising a longer
    timeout. A Cluster store asks no node for a new slot table that could not answer in time."""
    import logging

    caplog.set_level(logging.INFO, logger="kvckpt")
    options = {
        **QUICK,
        **proxied.options,
        "timeout": 0.5,
        "retries": 10,
        "backoff": 0.01,
        "total_timeout": 1.2,
    }
    store = kvckpt.open_store(proxied.url(namespace), **options)
    if proxied.name == "redis+cluster":
        store.get(f"{namespace}/warm")
    proxied.stall()
    calls: dict[str, Callable[[Any, str], object]] = {**BULK, "get": lambda store, ns: store.get(f"{ns}/a")}
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError) as info:
        calls[operation](store, namespace)
    elapsed = time.monotonic() - started
    store.close()
    assert elapsed < 1.2 + 1.0  # total_timeout, and slack for a loaded machine (hung: 7 s and more)
    if proxied.name == "redis+cluster":
        assert "the last at node 127.0.0.1:" in str(info.value)  # which node to look at
    message = str(info.value)
    assert "did not answer" in message and "raise timeout" not in message
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) <= 1  # 0.5 s + 0.5 s fit in 1.2 s; a third attempt would not
    assert all("TimeoutError" in r.getMessage() for r in retries)


def test_a_hung_server_is_retried_when_the_total_allows(
    faulty: Faulty, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="kvckpt")
    options = {**faulty.options, "timeout": 0.3, "retries": 2, "backoff": 0.01, "total_timeout": 30}
    store = kvckpt.open_store(faulty.via_proxy(namespace), **options)
    faulty.proxy.stall()
    with pytest.raises(kvckpt.StoreUnavailableError, match="did not answer"):
        store.get(f"{namespace}/a")
    store.close()
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2


def test_a_hung_server_error_says_how_long_it_waited_not_the_longer_timeout(
    faulty: Faulty, namespace: str
) -> None:
    """The deadline cuts an operation's wait to what is left of ``total_timeout``: the error reports
    that wait (1 s here), not the per-operation ``timeout`` of 20 s that never ran out."""
    options = {**faulty.options, "timeout": 20, "retries": 0, "total_timeout": 1.0}
    store = kvckpt.open_store(faulty.via_proxy(namespace), **options)
    faulty.proxy.stall()
    with pytest.raises(kvckpt.StoreUnavailableError, match="did not answer") as info:
        store.get(f"{namespace}/a")
    store.close()
    message = str(info.value)
    assert "20s" not in message, message
    waited = re.search(
        r"did not answer while reading \(TimeoutError after 1 attempt\(s\) in (\d+\.\d)s", message
    )
    assert waited is not None, message
    assert 0.9 <= float(waited.group(1)) < 3.0, message


# Loads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("down", [True, False], ids=["store-down", "blip"])
def test_cut_during_load(faulty: Faulty, namespace: str, down: bool) -> None:
    kvckpt.save(state(1), faulty.direct(namespace), chunk_bytes=CHUNK)
    faulty.proxy.cut_on(faulty.data_read, refuse_after=down)
    loaded = blank()
    if down:
        with pytest.raises(kvckpt.StoreUnavailableError):
            kvckpt.load(loaded, faulty.via_proxy(namespace), store_options=faulty.options)
    else:  # an idempotent read: retried on a new connection
        kvckpt.load(loaded, faulty.via_proxy(namespace), store_options=faulty.options)
        assert same(state(1), loaded)
    assert faulty.proxy.fired == 1


@pytest.mark.parametrize("where", ["data-reads", "whole-server"])
def test_stalled_load_fails_within_the_timeout(faulty: Faulty, namespace: str, where: str) -> None:
    kvckpt.save(state(1), faulty.direct(namespace), chunk_bytes=CHUNK)
    if where == "data-reads":
        faulty.proxy.hold_on(faulty.data_read)  # the record arrives; every data read hangs
    else:
        faulty.proxy.stall()  # nothing moves at all, connections stay open
    options = {**faulty.options, "timeout": 1.0, "retries": 1}
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError, match="TimeoutError"):
        kvckpt.load(blank(), faulty.via_proxy(namespace), store_options=options)
    elapsed = time.monotonic() - started
    if where == "data-reads":
        assert faulty.proxy.seen(faulty.data_read) >= 2  # the read was retried once, then given up
    # (retries + 1) attempts of timeout each; the 30 s default timeout would blow far past this
    assert elapsed < 15, elapsed


# Server restart and memory --------------------------------------------------------------------


def test_restart_between_save_and_load_is_not_found(namespace: str) -> None:
    with RedisServer() as server:
        url = server.url(namespace)
        kvckpt.save(state(1), url)
        reader = kvckpt.KVStorageReader(url)
        assert reader.target.store.get(layout.record_key(namespace)) is not None  # a pooled connection
        server.stop()
        server.start()  # same port, no persistence
        with pytest.raises(kvckpt.CheckpointNotFoundError):
            kvckpt.load(blank(), url)
        with pytest.raises(kvckpt.CheckpointNotFoundError):  # the stale connection reconnects
            reader.read_metadata()


class RestartingPlanner(kvckpt.SafeLoadPlanner):
    """Runs ``restart`` once the load has read the record and planned, before any data is read."""

    def __init__(self, restart: Callable[[], None]) -> None:
        super().__init__()
        self.restart = restart

    def create_local_plan(self) -> Any:
        plan = super().create_local_plan()
        self.restart()
        return plan


def test_restart_mid_load_is_reported_as_changed(namespace: str) -> None:
    with RedisServer() as server:
        url = server.url(namespace)
        kvckpt.save(state(1), url)

        def restart() -> None:  # the record was read; the server comes back empty
            server.stop()
            server.start()

        with pytest.raises(kvckpt.CheckpointChangedError, match="deleted"), unwrapped_errors():
            dcp.load(blank(), storage_reader=kvckpt.KVStorageReader(url), planner=RestartingPlanner(restart))


def test_out_of_memory_mid_save(namespace: str) -> None:
    settings = {**REDIS_CHECKPOINT_SETTINGS, "maxmemory": "12mb"}
    with RedisServer(settings=settings) as server:
        import redis

        raw = redis.Redis(port=server.port)
        url = server.url(namespace)
        kvckpt.save(state(1, tensors=1), url)
        record, keys = raw.get(layout.record_key(namespace)), set(raw.scan_iter())
        with pytest.raises(kvckpt.StoreFullError, match="out of memory"):
            kvckpt.save(state(2, tensors=16), url, overwrite=True, chunk_bytes=CHUNK)
        assert raw.get(layout.record_key(namespace)) == record
        assert set(raw.scan_iter()) == keys  # the partial data was removed
        loaded = blank(tensors=1)
        kvckpt.load(loaded, url)
        assert same(state(1, tensors=1), loaded)
        kvckpt.save(state(3, tensors=1), url, overwrite=True)  # the memory is usable again
        raw.close()


# A writer killed mid-save ---------------------------------------------------------------------


def _save_in_child(url: str, reach: dict[str, Any]) -> None:
    kvckpt.save(state(2), url, chunk_bytes=CHUNK, batch_bytes=CHUNK, pending_ttl=PENDING, store_options=reach)


@pytest.mark.slow
def test_killed_writer_leaves_only_expiring_data(faulty: Faulty, namespace: str) -> None:
    faulty.proxy.hold_on(faulty.data_write(namespace), times=1)  # one batch hangs; others land
    child = multiprocessing.get_context("spawn").Process(
        target=_save_in_child, args=(faulty.via_proxy(namespace), faulty.reach)
    )
    child.start()
    try:
        faulty.proxy.wait_for(lambda: faulty.proxy.held() == 1, what="a held data write")
        faulty.proxy.wait_for(lambda: len(faulty.keys(namespace)) >= 2, what="some data written")
    finally:
        child.kill()
        child.join(30)
    assert faulty.record(namespace) is None
    left = faulty.keys(namespace)
    assert left and all(0 < faulty.ttl_ms(k) <= PENDING * 1000 for k in left)


def test_proxy_is_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(6379, upstream_host="10.0.0.1")


# Credentials on failure paths -----------------------------------------------------------------

SECRET = "pw-Fault-7Q-never-shown"


def test_password_absent_from_failure_errors_and_logs(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Errors and log lines written while things go wrong carry no password either."""
    import logging

    caplog.set_level(logging.DEBUG)
    with RedisServer(extra_args=["--requirepass", SECRET]) as server, FaultProxy(server.port) as proxy:
        url = f"redis://default:{SECRET}@127.0.0.1:{proxy.port}/0/{namespace}"
        seen: list[BaseException] = []
        kvckpt.save(state(1), url)
        for fault in ("data", "commit"):
            if fault == "data":
                proxy.cut_after_bytes(1_500_000, refuse_after=True)
            else:
                proxy.cut_on(commit_bytes(namespace), refuse_after=True)
            with pytest.raises(kvckpt.StoreUnavailableError) as info:
                kvckpt.save(state(2), url, overwrite=True, chunk_bytes=CHUNK, store_options=QUICK)
            seen.append(info.value)
            proxy.accept()
        proxy.hold_on(resp_prefix("GETRANGE"))
        with pytest.raises(kvckpt.StoreUnavailableError) as info:
            kvckpt.load(blank(), url, store_options={**QUICK, "retries": 0})
        seen.append(info.value)
        proxy.release()
    texts = [caplog.text]
    for error in seen:
        while error is not None:  # the whole chain, redis-py's own errors included
            texts += [str(error), repr(error), repr(vars(error))]
            error = error.__cause__ or error.__context__  # type: ignore[assignment]
    assert len(texts) > 6 and not any(SECRET in text for text in texts)
