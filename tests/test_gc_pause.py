"""The cyclic collector stays on for the rest of the process while kvckpt waits on the store.

``gc.disable()`` is process-wide, and ``dcp.async_save`` with its default thread executor runs the
upload beside the training thread: a collector paused for a whole ``write_data`` would leave
training without it for as long as the upload takes. The upload is held at a FaultProxy, so it is
certainly still running while the training thread looks.
"""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import Future

import pytest
import torch
import torch.distributed.checkpoint as dcp

import kvckpt
from tests.harness.proxy import FaultProxy
from tests.harness.servers import RedisServer
from tests.helpers import bits_equal, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP: no process group, one process


def test_the_training_thread_keeps_the_collector_while_an_async_save_uploads(
    redis_server: RedisServer, namespace: str
) -> None:
    state = {f"w{i}": random_tensor((256,), torch.float32, seed=i) for i in range(4)}
    first_chunk = b"/.pack/0\r\n"  # the end of the key of the pack holding every w, as sent in RESP
    assert gc.isenabled()
    with FaultProxy(redis_server.port) as proxy:
        proxy.hold_on(first_chunk)
        future = dcp.async_save(
            state, storage_writer=kvckpt.KVStorageWriter(f"redis://127.0.0.1:{proxy.port}/0/{namespace}")
        )
        proxy.wait_for(lambda: proxy.held(first_chunk) > 0, what="the upload reaching the server")
        time.sleep(0.1)  # the writer thread is past building its batch: it waits on the store
        samples = []
        for _ in range(20):
            samples.append(gc.isenabled())
            time.sleep(0.01)
        assert isinstance(future, Future)  # the thread executor's, not a staging response
        still_uploading = not future.done()
        proxy.release()
        future.result(timeout=60)
    assert still_uploading
    assert samples == [True] * 20, f"the collector was off for {samples.count(False)} of 20 samples"
    assert gc.isenabled()

    loaded = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    dcp.load(loaded, storage_reader=kvckpt.KVStorageReader(redis_server.url(namespace)))
    assert all(bits_equal(loaded[name], tensor) for name, tensor in state.items())


def test_the_collector_stays_on_while_a_load_on_another_thread_waits(
    redis_server: RedisServer, namespace: str
) -> None:
    """A load never pauses the collector while it waits on the store: a drainer or a copy loads on a
    thread of its own, beside training that needs the collector."""
    state = {f"w{i}": random_tensor((256,), torch.float32, seed=i) for i in range(4)}
    kvckpt.save(state, redis_server.url(namespace))
    loaded = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    first_chunk = b"/.pack/0\r\n"
    failures: list[BaseException] = []

    def load(url: str) -> None:
        try:
            dcp.load(loaded, storage_reader=kvckpt.KVStorageReader(url))
        except BaseException as exc:
            failures.append(exc)

    with FaultProxy(redis_server.port) as proxy:
        proxy.hold_on(first_chunk)
        loader = threading.Thread(target=load, args=(f"redis://127.0.0.1:{proxy.port}/0/{namespace}",))
        loader.start()
        proxy.wait_for(lambda: proxy.held(first_chunk) > 0, what="the load's read reaching the server")
        time.sleep(0.1)
        samples = []
        for _ in range(20):
            samples.append(gc.isenabled())
            time.sleep(0.01)
        still_loading = loader.is_alive()
        proxy.release()
        loader.join(timeout=60)
    assert still_loading and not failures
    assert samples == [True] * 20, f"the collector was off for {samples.count(False)} of 20 samples"
    assert all(bits_equal(loaded[name], tensor) for name, tensor in state.items())


def test_deleting_and_reclaiming_decode_records_without_full_collections(
    redis_server: RedisServer, namespace: str
) -> None:
    """``kvckpt.delete`` and ``keep_last`` decode whole records (one object per item and chunk): with
    the collector on, a 10,000-item record triggered hundreds of collections, each walking every
    object of a training process (0.25-0.40 s per delete, 0.10 s paused)."""
    state = {f"w{i}": torch.full((2,), float(i)) for i in range(3000)}
    urls = [redis_server.url(f"{namespace}/step{n}") for n in (1, 2)]
    for step, url in enumerate(urls, 1):
        kvckpt.save(state, url, step=step)
    passes = 0

    def count(phase: str, info: dict[str, int]) -> None:
        nonlocal passes
        passes += phase == "start"

    old = gc.get_threshold()
    gc.set_threshold(100)  # a collection per 100 allocations: decoding 3,000 rows with it on triggers many
    gc.callbacks.append(count)
    try:
        assert [info.display_id for info in kvckpt.keep_last(redis_server.url(namespace), 1)] == [urls[0]]
        assert kvckpt.delete(urls[1])
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*old)
    assert passes < 100, f"{passes} collections while two 3,000-item records were decoded"
    assert gc.isenabled()
    assert kvckpt.list_checkpoints(redis_server.url(namespace)) == []
