"""One deadline per save, load, listing and gc (kvckpt.deadline), against real servers behind a
FaultProxy: a store that accepts connections but never answers fails the whole of it, cleanup
included, within ``total_timeout`` (etcd: ``timeout``), however many operations it would still make;
a store that keeps making progress is never cut, however long the whole takes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import kvckpt
from kvckpt import layout
from kvckpt.dcp.api import unwrapped_errors
from tests.faulty import Faulty, faulty
from tests.harness.etcd import EtcdServer
from tests.harness.proxy import FaultProxy
from tests.helpers import bits_equal, random_tensor

__all__ = ["faulty"]  # the fixture, imported for pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: The store may go this long without progress.
TOTAL = 2.0
#: One reply may take longer than that (so a single wait would already overrun the total).
REPLY = 5.0
#: What this loaded 2-core machine needs beyond TOTAL: thread wake-ups, DCP's own work, closing.
#: Measured: failures came 0.0-0.4 s after the deadline.
MARGIN = 1.5
CHUNK = 32 << 10


def big_state(tensors: int = 16) -> dict[str, Any]:
    """512 KiB per tensor: 16 chunks each, so a save is many batches."""
    return {f"t{i}": random_tensor((128, 1024), torch.float32, seed=i) for i in range(tensors)}


def stall_once(proxy: FaultProxy, written: Callable[[], bool]) -> threading.Thread:
    """Hang the store (accepting, never answering) as soon as ``written()`` says data has landed."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while not written() and time.monotonic() < deadline:
            time.sleep(0.005)
        proxy.stall()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def data_keys(keys: set[str]) -> bool:
    return any(f"/{layout.LIVE_NAME}/" not in k and not k.endswith(layout.UNFINISHED_NAME) for k in keys)


@pytest.fixture
def etcd_proxy(etcd_server: EtcdServer) -> Iterator[FaultProxy]:
    with FaultProxy(etcd_server.client_port) as proxy:
        yield proxy
        proxy.accept()


def hung_save(url: str, options: dict[str, Any], watcher: threading.Thread) -> tuple[str, float]:
    """Save through a store that hangs mid-write; the error's message and the seconds from the hang."""
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError) as info:
        kvckpt.save(
            big_state(),
            url,
            chunk_bytes=CHUNK,
            batch_bytes=2 * CHUNK,
            live_ttl=1.0,
            store_options=options,
        )
    failed = time.monotonic()
    watcher.join()
    assert failed - started > 0  # the hang came mid-save (watcher joined: it stalled the proxy)
    return str(info.value), failed - started


# Saves ------------------------------------------------------------------------------------------


def test_a_save_hung_mid_write_fails_within_total_timeout(faulty: Faulty, namespace: str) -> None:
    """The write times out at the deadline; removing the data, the liveness marker and
    ``.unfinished`` do not wait again (before: each waited a whole timeout). What is left is named
    in the error and goes to gc once the marker lapsed."""
    options = {**faulty.options, "timeout": REPLY, "total_timeout": TOTAL, "retries": 2}
    watcher = stall_once(faulty.proxy, lambda: data_keys(faulty.keys(namespace)))
    message, elapsed = hung_save(faulty.via_proxy(namespace), options, watcher)
    assert elapsed < TOTAL + MARGIN + 1.0, elapsed  # + the time the save ran before the hang
    assert "left to kvckpt.gc and expiry" in message and "its data" in message, message
    faulty.proxy.accept()
    assert faulty.record(namespace) is None  # failed = invisible
    time.sleep(1.5)  # the marker (live_ttl 1 s) lapses: gc may now decide
    removed = kvckpt.gc(faulty.direct(namespace), **faulty.reach)
    assert removed and not data_keys(faulty.keys(namespace))


def test_an_etcd_save_hung_mid_write_fails_within_timeout(
    etcd_server: EtcdServer, etcd_proxy: FaultProxy, namespace: str
) -> None:
    """etcd's ``timeout`` is both one call's bound and the time without progress the save allows."""
    inspect = kvckpt.open_store(etcd_server.url(namespace))
    watcher = stall_once(etcd_proxy, lambda: data_keys(set(inspect.scan_prefix(namespace + "/"))))
    url = f"etcd://127.0.0.1:{etcd_proxy.port}/{namespace}"
    message, elapsed = hung_save(url, {"timeout": TOTAL}, watcher)
    inspect.close()
    assert elapsed < TOTAL + MARGIN + 1.0, elapsed
    assert "left to kvckpt.gc and expiry" in message, message


def test_a_long_healthy_save_is_not_cut(faulty: Faulty, namespace: str) -> None:
    """A slow store that keeps making progress: each data write waits ``pace`` seconds, well within
    total_timeout, but the save's I/O lasts several times longer. It succeeds: the deadline bounds
    the time without progress, not the whole save."""
    total, pace = 1.0, 0.35
    faulty.proxy.hold_on(faulty.data_write(namespace))
    stop = threading.Event()

    def throttle() -> None:  # what was held (on a Cluster: each node's part) goes on every ``pace`` s
        while not stop.wait(pace):
            faulty.proxy.release(matching=faulty.data_write(namespace))

    pacer = threading.Thread(target=throttle, daemon=True)
    pacer.start()
    state = big_state(4)
    options = {**faulty.options, "total_timeout": total}
    started = time.monotonic()
    try:
        kvckpt.save(
            state,
            faulty.via_proxy(namespace),
            chunk_bytes=CHUNK,
            batch_bytes=8 * CHUNK,
            io_threads=1,
            store_options=options,
        )
    finally:
        stop.set()
        pacer.join()
        faulty.proxy.release()
    assert time.monotonic() - started > 2 * total  # the test means something only if so
    loaded = {name: torch.zeros_like(t) for name, t in state.items()}
    kvckpt.load(loaded, faulty.direct(namespace))
    assert all(bits_equal(state[name], loaded[name]) for name in state)


# Loads, listings, gc ----------------------------------------------------------------------------


def test_a_load_hung_mid_read_fails_within_total_timeout(faulty: Faulty, namespace: str) -> None:
    """Reads queued behind hung ones start after the deadline and fail at once (before: each wave of
    reads waited a whole timeout)."""
    kvckpt.save(big_state(), faulty.direct(namespace), chunk_bytes=CHUNK)
    faulty.proxy.hold_on(faulty.data_read)  # the record arrives; every data read hangs
    options = {**faulty.options, "timeout": REPLY, "total_timeout": TOTAL}
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError):
        kvckpt.load(big_state(), faulty.via_proxy(namespace), batch_bytes=CHUNK, store_options=options)
    assert time.monotonic() - started < TOTAL + MARGIN


def test_an_etcd_load_hung_mid_read_fails_within_timeout(
    etcd_server: EtcdServer, etcd_proxy: FaultProxy, namespace: str
) -> None:
    kvckpt.save(big_state(), etcd_server.url(namespace), chunk_bytes=CHUNK)
    url = f"etcd://127.0.0.1:{etcd_proxy.port}/{namespace}"
    reader = kvckpt.KVStorageReader(url, batch_bytes=CHUNK, store_options={"timeout": TOTAL})
    reader.prefetch_metadata()  # connected, the record read: the hang comes mid-load
    etcd_proxy.stall()
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError), unwrapped_errors():
        dcp.load(big_state(), storage_reader=reader, no_dist=True)
    assert time.monotonic() - started < TOTAL + MARGIN


MANAGE: dict[str, Callable[[str, dict[str, Any]], object]] = {
    "list_checkpoints": lambda url, options: kvckpt.list_checkpoints(url, **options),
    "latest": lambda url, options: kvckpt.latest(url, **options),
    "info": lambda url, options: kvckpt.info(url, **options),
    "gc": lambda url, options: kvckpt.gc(url, **options),
    "keep_last": lambda url, options: kvckpt.keep_last(url, 0, **options),
}


@pytest.mark.parametrize("operation", list(MANAGE))
def test_a_listing_or_gc_on_a_hung_store_fails_within_total_timeout(
    faulty: Faulty, namespace: str, operation: str
) -> None:
    kvckpt.save(big_state(2), faulty.direct(f"{namespace}/a"), chunk_bytes=CHUNK)
    faulty.proxy.stall()
    options = {**faulty.options, "timeout": REPLY, "total_timeout": TOTAL}
    target = f"{namespace}/a" if operation == "info" else namespace
    started = time.monotonic()
    with pytest.raises(kvckpt.StoreUnavailableError):
        MANAGE[operation](faulty.via_proxy(target), options)
    assert time.monotonic() - started < TOTAL + MARGIN
