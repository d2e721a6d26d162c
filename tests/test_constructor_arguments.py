"""A wrong argument to a public constructor or function is one error, InvalidArgumentError, raised
where the argument was passed, naming it and what it takes.

Every constructor here connects lazily, so the address below is never dialled: each check must fire
before any server is involved (a test that reached a server would hang on port 1 or fail otherwise).
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

import kvckpt
from kvckpt.integrations.lightning import KVCheckpointIO
from kvckpt.stores.etcd.store import EtcdStore
from kvckpt.stores.redis import wrap_client

#: Nothing listens there; nothing below may try.
REDIS = "redis://127.0.0.1:1/0/run1/step1"
CLUSTER = "redis+cluster://127.0.0.1:1/run1/step1"
ETCD = "etcd://127.0.0.1:1/run1/step1"
FOLDER = tempfile.gettempdir()

Build = Callable[[], Any]

CASES: list[tuple[str, Build, str, str]] = [
    # (id, the call, the argument it must name, a regex its message must match)
    (
        "writer-chunk_bytes",
        lambda: kvckpt.KVStorageWriter(REDIS, chunk_bytes=0),
        "chunk_bytes",
        r"whole number >= 1",
    ),
    (
        "writer-block_bytes",
        lambda: kvckpt.KVStorageWriter(REDIS, block_bytes=-4),
        "block_bytes",
        r"whole number",
    ),
    (
        "writer-ttl",
        lambda: kvckpt.KVStorageWriter(REDIS, ttl=-1),
        "ttl",
        r"ttl=-1: expected a number of seconds",
    ),
    (
        "writer-step",
        lambda: kvckpt.KVStorageWriter(REDIS, step=-1),
        "step",
        r"step=-1: expected a whole number >= 0",
    ),
    ("writer-step-bool", lambda: kvckpt.KVStorageWriter(REDIS, step=True), "step", r"step=True"),
    ("writer-live_ttl", lambda: kvckpt.KVStorageWriter(REDIS, live_ttl=0), "live_ttl", r"seconds > 0"),
    ("writer-io_threads", lambda: kvckpt.KVStorageWriter(REDIS, io_threads=0), "io_threads", r"io_threads=0"),
    (
        "writer-batch_bytes",
        lambda: kvckpt.KVStorageWriter(REDIS, batch_bytes="16MiB"),  # type: ignore[arg-type]
        "batch_bytes",
        r"'16MiB'",
    ),
    ("writer-min_replicas", lambda: kvckpt.KVStorageWriter(REDIS, min_replicas=-1), "min_replicas", r">= 0"),
    (
        "writer-replica_timeout",
        lambda: kvckpt.KVStorageWriter(REDIS, replica_timeout=0),
        "replica_timeout",
        r"> 0",
    ),
    ("writer-pending_ttl", lambda: kvckpt.KVStorageWriter(REDIS, pending_ttl=-5), "pending_ttl", r"or None"),
    (
        "writer-store_options-not-a-dict",
        lambda: kvckpt.KVStorageWriter(REDIS, store_options="timeout=3"),  # type: ignore[arg-type]
        "store_options",
        r"store_options takes a dict.*got str",
    ),
    (
        "writer-store_options-typo",
        lambda: kvckpt.KVStorageWriter(REDIS, store_options={"timout": 3}),
        "timout",
        r"did you mean 'timeout'",
    ),
    (
        "writer-client",
        lambda: kvckpt.KVStorageWriter("run1", client=42),
        "client",
        r"redis-py-compatible client.*int",
    ),
    ("reader-io_threads", lambda: kvckpt.KVStorageReader(REDIS, io_threads=0), "io_threads", r"io_threads=0"),
    (
        "reader-group_bytes",
        lambda: kvckpt.KVStorageReader(REDIS, group_bytes=0),
        "group_bytes",
        r"whole number",
    ),
    (
        "reader-batch_bytes",
        lambda: kvckpt.KVStorageReader(REDIS, batch_bytes=-1),
        "batch_bytes",
        r"whole number",
    ),
    (
        "reader-store_options-type",
        lambda: kvckpt.KVStorageReader(REDIS, store_options={"retries": 1.5}),
        "retries",
        r"retries=1\.5: expected a whole number",
    ),
    ("redis-timeout", lambda: kvckpt.open_store(REDIS, timeout=0), "timeout", r"more than 0 seconds"),
    (
        "redis-option-typo",
        lambda: kvckpt.open_store(REDIS, conect_timeout=1),
        "conect_timeout",
        r"'connect_timeout'",
    ),
    ("redis-password", lambda: kvckpt.open_store(REDIS, password=123), "password", r"expected a string"),
    (
        "cluster-address_remap",
        lambda: kvckpt.open_store(CLUSTER, address_remap={"a": "b"}),
        "address_remap",
        r"expected a function",
    ),
    ("etcd-no-endpoint", lambda: EtcdStore([]), "endpoints", r"endpoint"),
    ("etcd-timeout", lambda: EtcdStore([("127.0.0.1", 1)], timeout=-1), "timeout", r"timeout=-1"),
    ("etcd-max_txn_ops", lambda: EtcdStore([("127.0.0.1", 1)], max_txn_ops=0), "max_txn_ops", r">= 1"),
    (
        "etcd-max_request_bytes",
        lambda: EtcdStore([("127.0.0.1", 1)], max_request_bytes=1024),
        "max_request_bytes",
        r"max_request_bytes=1024: expected a whole number >= 16385",
    ),
    (
        "etcd-max_total_bytes",
        lambda: kvckpt.open_store(ETCD, max_total_bytes=0),
        "max_total_bytes",
        r"or None",
    ),
    ("etcd-scan_page", lambda: kvckpt.open_store(ETCD, scan_page=0), "scan_page", r"scan_page=0"),
    ("etcd-option-typo", lambda: kvckpt.open_store(ETCD, timout=1), "timout", r"did you mean 'timeout'"),
    ("wrap_client", lambda: wrap_client("redis://127.0.0.1:1"), "client", r"leave client= out"),
    ("drainer-every", lambda: kvckpt.Drainer(REDIS, FOLDER, every=0), "every", r"every=0"),
    ("drainer-keep", lambda: kvckpt.Drainer(REDIS, FOLDER, keep=0), "keep", r"or None"),
    ("drainer-poll", lambda: kvckpt.Drainer(REDIS, FOLDER, poll=-1), "poll", r"poll=-1"),
    ("drainer-interval", lambda: kvckpt.Drainer(REDIS, FOLDER, interval=-1.0), "interval", r"seconds > 0"),
    ("drainer-max_rate", lambda: kvckpt.Drainer(REDIS, FOLDER, max_rate=0), "max_rate", r"bytes per second"),
    (
        "drainer-interval-and-every",
        lambda: kvckpt.Drainer(REDIS, FOLDER, every=2, interval=5.0),
        "interval",
        r"pass one of the two",
    ),
    (
        "drainer-storage_options",
        lambda: kvckpt.Drainer(REDIS, FOLDER, storage_options=["anon"]),  # type: ignore[arg-type]
        "storage_options",
        r"got list",
    ),
    ("lightning-typo", lambda: KVCheckpointIO(chunk_byte=1), "chunk_byte", r"did you mean 'chunk_bytes'"),
    ("lightning-overwrite", lambda: KVCheckpointIO(overwrite=False), "overwrite", r"sets 'overwrite' itself"),
    ("lightning-value", lambda: KVCheckpointIO(ttl=0), "ttl", r"ttl=0"),
    ("save-typo", lambda: kvckpt.save({}, REDIS, chunk_byte=1), "chunk_byte", r"kvckpt.save.*'chunk_bytes'"),
    ("save-value", lambda: kvckpt.save({}, REDIS, io_threads=0), "io_threads", r"io_threads=0"),
    ("load-typo", lambda: kvckpt.load({}, REDIS, verfy=False), "verfy", r"kvckpt.load.*'verify'"),
    ("register_backend", lambda: kvckpt.register_backend("Mem", "pkg:Store"), "scheme", r"lower-case"),
]


@pytest.mark.parametrize(("build", "argument", "message"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_a_wrong_argument_is_one_error_that_names_it(build: Build, argument: str, message: str) -> None:
    with pytest.raises(kvckpt.InvalidArgumentError, match=message) as raised:
        build()
    assert type(raised.value) is kvckpt.InvalidArgumentError
    assert argument in raised.value.options
    assert argument in str(raised.value)


def test_older_except_clauses_still_catch_it() -> None:
    """The checks raised ValueError (ranges) or InvalidStoreOptionError, a TypeError (unknown store
    options), before they shared one error; both clauses still catch it, and the old name is it."""
    assert kvckpt.InvalidStoreOptionError is kvckpt.InvalidArgumentError
    with pytest.raises(ValueError):
        kvckpt.KVStorageWriter(REDIS, chunk_bytes=0)
    with pytest.raises(TypeError):
        kvckpt.KVStorageWriter(REDIS, store_options={"timout": 3})
    with pytest.raises(kvckpt.KVCheckpointError):
        kvckpt.Drainer(REDIS, FOLDER, every=0)


def test_it_pickles_with_the_argument_named() -> None:
    """DCP gathers a rank's exception to the coordinator by pickling it."""
    with pytest.raises(kvckpt.InvalidArgumentError) as raised:
        kvckpt.KVStorageReader(REDIS, io_threads=0)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert type(copy) is kvckpt.InvalidArgumentError
    assert copy.options == ["io_threads"]
    assert str(copy) == str(raised.value)


def test_good_arguments_still_build() -> None:
    """The checks refuse only what is wrong: None where it means "no limit", floats for seconds."""
    writer = kvckpt.KVStorageWriter(REDIS, ttl=None, pending_ttl=None, live_ttl=0.5, step=0, min_replicas=0)
    assert writer.checkpoint_id == REDIS
    assert kvckpt.KVStorageReader(REDIS, io_threads=1, store_options={"timeout": 0.5}).checkpoint_id == REDIS
    assert kvckpt.Drainer(REDIS, FOLDER, interval=30, keep=None, max_rate=1e6).interval == 30
    assert EtcdStore([("127.0.0.1", 1)], max_total_bytes=None, timeout=1).max_total_bytes is None
    assert KVCheckpointIO(ttl=60.0, chunk_bytes=1 << 20).writer_options == {
        "ttl": 60.0,
        "chunk_bytes": 1 << 20,
    }
