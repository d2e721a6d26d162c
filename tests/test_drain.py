"""The drainer against a real redis-server, local folders and S3 (moto's server mode over HTTP).

Mid-copy moments are reached with a FaultProxy between the drainer and Redis that parks the read of
one tensor: the copy is then exactly half done, with its first group already at the destination.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

import kvckpt
from kvckpt.tiered import tiers
from tests.harness.proxy import FaultProxy
from tests.harness.servers import RedisServer, free_port
from tests.helpers import bits_equal, random_tensor
from tests.ranks import ROOT
from tests.s3_server import MotoServer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Two tensors of 1 MiB: with a 1 MiB buffer each is its own group (and file), read in 256 KiB slices.
HELD = b"second_tensor/"


def state(step: int) -> dict[str, Any]:
    return {
        "first": random_tensor((256, 1024), torch.float32, seed=step),
        "second_tensor": random_tensor((512, 512), torch.bfloat16, seed=100 + step),
        "scalar": torch.tensor(float(step)),
        "trainer": {"step": step, "name": "run-ü"},
    }


def blank() -> dict[str, Any]:
    return {
        "first": torch.zeros(256, 1024),
        "second_tensor": torch.zeros(512, 512, dtype=torch.bfloat16),
        "scalar": torch.tensor(0.0),
        "trainer": {"step": None, "name": None},
    }


def assert_is_step(loaded: dict[str, Any], step: int) -> None:
    expected = state(step)
    for fqn in ("first", "second_tensor", "scalar"):
        assert bits_equal(loaded[fqn], expected[fqn]), fqn
    assert loaded["trainer"] == expected["trainer"]


def save_steps(server: RedisServer, namespace: str, steps: list[int]) -> None:
    for step in steps:
        kvckpt.save(state(step), server.url(f"{namespace}/step{step}"), no_dist=True)


@pytest.fixture(params=["folder", "s3"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A durable prefix and its fsspec storage options: a local folder, or a bucket on moto."""
    if request.param == "folder":
        return str(tmp_path / "durable"), {}
    moto: MotoServer = request.getfixturevalue("moto_server")
    prefix: str = request.getfixturevalue("s3_prefix")
    return f"{prefix}/run", moto.storage_options()


def stock_load(checkpoint_id: str, options: dict[str, Any]) -> dict[str, Any]:
    """Load with DCP's own readers only (the drained copy is a plain DCP checkpoint)."""
    loaded = blank()
    local = checkpoint_id.startswith("/")
    reader = FileSystemReader(checkpoint_id) if local else FsspecReader(checkpoint_id, **options)
    dcp_load(loaded, storage_reader=reader, no_dist=True)
    return loaded


def test_drains_every_nth_keeps_newest_k_and_loads_with_stock_readers(
    redis_server: RedisServer, namespace: str, durable: tuple[str, dict[str, Any]]
) -> None:
    prefix, options = durable
    save_steps(redis_server, namespace, [1, 2, 3])
    every2 = kvckpt.Drainer(redis_server.url(namespace), prefix, every=2, keep=2, storage_options=options)
    assert every2.run(once=True) == 0
    assert [c.name for c in kvckpt.durable_checkpoints(prefix, storage_options=options)] == ["step2"]
    save_steps(redis_server, namespace, [4, 5, 6])  # 3 more: step4 and step6 are due, only step6 copied
    assert every2.run(once=True) == 0
    save_steps(redis_server, namespace, [7, 8])
    assert every2.run(once=True) == 0
    drained = kvckpt.durable_checkpoints(prefix, storage_options=options)
    assert [c.name for c in drained] == ["step6", "step8"]  # step2 went: keep=2
    assert drained[-1].source == redis_server.url(f"{namespace}/step8")
    assert drained[-1].save_id == kvckpt.info(redis_server.url(f"{namespace}/step8")).save_id
    assert_is_step(stock_load(drained[-1].checkpoint_id, options), 8)
    loaded = blank()
    kvckpt.load(loaded, drained[0].checkpoint_id, no_dist=True, storage_options=options)
    assert_is_step(loaded, 6)
    every1 = kvckpt.Drainer(redis_server.url(namespace), prefix, storage_options=options)
    assert every1.run(once=True) == 0  # nothing newer than step8: nothing copied
    assert [c.name for c in kvckpt.durable_checkpoints(prefix, storage_options=options)] == ["step6", "step8"]


def test_a_checkpoint_saved_again_under_its_name_is_drained_again(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    url, prefix = redis_server.url(namespace), str(tmp_path / "durable")
    save_steps(redis_server, namespace, [1])
    assert kvckpt.Drainer(url, prefix).run(once=True) == 0
    kvckpt.save(state(2), redis_server.url(f"{namespace}/step1"), no_dist=True, overwrite=True)
    assert kvckpt.Drainer(url, prefix).run(once=True) == 0
    (copy,) = kvckpt.durable_checkpoints(prefix)
    assert_is_step(stock_load(copy.checkpoint_id, {}), 2)
    assert sorted(os.listdir(prefix)) == ["step1"]  # no staging or retired folder left behind


def drainer_process(
    source: str, prefix: str, env: dict[str, str], log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """``kvckpt drain --once`` in a child process, its stderr (the drain log) going to ``log``."""
    command = [sys.executable, "-m", "kvckpt", "drain", "--once", "--buffer-mib", "1", *extra, source, prefix]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with open(log, "wb") as sink:
        return subprocess.Popen(command, env={**os.environ, **env, "PYTHONPATH": path}, stderr=sink)


def child_env(request: pytest.FixtureRequest, prefix: str) -> dict[str, str]:
    if prefix.startswith("s3://"):
        moto: MotoServer = request.getfixturevalue("moto_server")
        return moto.environment()
    return {}


def partial_is_there(prefix: str, options: dict[str, Any]) -> bool:
    """The first group of the copy reached the destination (in a staging folder or in place)."""
    destination = tiers.Destination(prefix, options)
    return any(destination.fs.find(p) for p in destination.partials())


@pytest.mark.slow
def test_a_drainer_killed_mid_copy_leaves_nothing_complete_and_the_next_one_redoes_it(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    namespace: str,
    durable: tuple[str, dict[str, Any]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix, options = durable
    save_steps(redis_server, namespace, [1])
    with FaultProxy(redis_server.port) as proxy:
        proxy.hold_on(HELD)
        source = f"redis://127.0.0.1:{proxy.port}/0/{namespace}"
        child = drainer_process(source, prefix, child_env(request, prefix), tmp_path / "killed.log")
        try:
            proxy.wait_for(lambda: proxy.held() > 0, what="the drainer reading the second tensor")
            proxy.wait_for(lambda: partial_is_there(prefix, options), what="the first group written")
            assert kvckpt.durable_checkpoints(prefix, storage_options=options) == []
            child.send_signal(signal.SIGKILL)
            assert child.wait(30) == -signal.SIGKILL
        finally:
            child.kill()
            child.wait()
            proxy.release()
    assert kvckpt.durable_checkpoints(prefix, storage_options=options) == []
    step1 = tiers.Destination(prefix, options).url("step1")
    stock = FileSystemReader(step1) if step1.startswith("/") else FsspecReader(step1, **options)
    with pytest.raises(FileNotFoundError):  # a stock reader sees no checkpoint either
        stock.read_metadata()

    with caplog.at_level(logging.INFO, logger="kvckpt.drain"):  # the restarted drainer
        assert (
            kvckpt.Drainer(redis_server.url(namespace), prefix, storage_options=options).run(once=True) == 0
        )
    assert "a copy that was cut short" in caplog.text and "drained" in caplog.text
    (copy,) = kvckpt.durable_checkpoints(prefix, storage_options=options)
    assert tiers.Destination(prefix, options).partials() == []
    assert_is_step(stock_load(copy.checkpoint_id, options), 1)


def test_a_checkpoint_deleted_mid_copy_is_skipped_and_nothing_is_left(
    redis_server: RedisServer,
    namespace: str,
    durable: tuple[str, dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix, options = durable
    save_steps(redis_server, namespace, [1])
    results: list[int] = []
    with FaultProxy(redis_server.port) as proxy:
        proxy.hold_on(HELD)
        drainer = kvckpt.Drainer(
            f"redis://127.0.0.1:{proxy.port}/0/{namespace}",
            prefix,
            group_bytes=1 << 20,
            storage_options=options,
        )
        with caplog.at_level(logging.WARNING, logger="kvckpt.drain"):
            worker = threading.Thread(target=lambda: results.append(drainer.run(once=True)))
            worker.start()
            try:
                proxy.wait_for(lambda: proxy.held() > 0, what="the drainer reading the second tensor")
                assert kvckpt.delete(redis_server.url(f"{namespace}/step1"))
            finally:
                proxy.release()
                worker.join(60)
    assert results == [0]
    assert "deleted or replaced in the store during the copy" in caplog.text
    assert kvckpt.durable_checkpoints(prefix, storage_options=options) == []
    destination = tiers.Destination(prefix, options)
    assert destination.partials() == []
    assert not destination.fs.exists(destination.path("step1"))


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_finishes_the_copy_in_progress_and_a_second_one_abandons_it(
    redis_server: RedisServer, namespace: str, tmp_path: Path, signals: int
) -> None:
    prefix = str(tmp_path / "durable")
    save_steps(redis_server, namespace, [1])
    with FaultProxy(redis_server.port) as proxy:
        proxy.hold_on(HELD)
        log_path = tmp_path / "drain.log"
        child = drainer_process(f"redis://127.0.0.1:{proxy.port}/0/{namespace}", prefix, {}, log_path)
        try:
            proxy.wait_for(lambda: proxy.held() > 0, what="the drainer reading the second tensor")
            child.send_signal(signal.SIGTERM)
            proxy.wait_for(
                lambda: "finishing the copy" in log_path.read_text(), what="the first signal handled"
            )
            if signals == 2:
                child.send_signal(signal.SIGTERM)
                proxy.wait_for(lambda: child.poll() is None, what="")  # still waiting on the held read
            proxy.release()
            child.wait(60)
        finally:
            child.kill()
            child.wait()
    log = log_path.read_text()
    drained = kvckpt.durable_checkpoints(prefix)
    if signals == 1:
        assert child.returncode == 0, log
        assert [c.name for c in drained] == ["step1"]
        assert_is_step(stock_load(drained[0].checkpoint_id, {}), 1)
    else:
        assert child.returncode == 128 + signal.SIGTERM, log
        assert "abandoned" in log
        assert drained == [] and tiers.Destination(prefix).partials() == []
        assert not os.path.exists(os.path.join(prefix, "step1"))


def test_newest_restorable_takes_the_store_first_and_the_durable_tier_when_the_store_lost_it(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    url, prefix = redis_server.url(namespace), str(tmp_path / "durable")
    assert kvckpt.newest_restorable(url, prefix) is None
    save_steps(redis_server, namespace, [1, 2])
    assert kvckpt.Drainer(url, prefix, every=2).run(once=True) == 0
    assert kvckpt.newest_restorable(url, prefix) == redis_server.url(f"{namespace}/step2")  # same: memory
    save_steps(redis_server, namespace, [3])
    assert kvckpt.newest_restorable(url, prefix) == redis_server.url(f"{namespace}/step3")
    for step in (1, 2, 3):
        kvckpt.delete(redis_server.url(f"{namespace}/step{step}"))
    restorable = kvckpt.newest_restorable(url, prefix)
    assert restorable == os.path.join(prefix, "step2")
    loaded = blank()
    kvckpt.load(loaded, restorable, no_dist=True)
    assert_is_step(loaded, 2)
    unreachable = f"redis://127.0.0.1:{free_port()}/0/{namespace}"  # nothing listens there
    assert kvckpt.newest_restorable(unreachable, prefix) == restorable


def test_newest_restorable_orders_both_tiers_by_recorded_step(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """A checkpoint committed later but recording an earlier step (a copy, a re-save after a
    rollback) is not the newest, in the store as across tiers."""
    url, prefix = redis_server.url(namespace), str(tmp_path / "durable")
    kvckpt.save(state(4), redis_server.url(f"{namespace}/step4"), no_dist=True, step=4)
    assert kvckpt.Drainer(url, prefix).run(once=True) == 0
    assert [c.step for c in kvckpt.durable_checkpoints(prefix)] == [4]
    kvckpt.delete(redis_server.url(f"{namespace}/step4"))
    kvckpt.save(state(3), redis_server.url(f"{namespace}/step3"), no_dist=True, step=3)  # committed last
    assert kvckpt.newest_restorable(url, prefix) == os.path.join(prefix, "step4")
    kvckpt.save(state(5), redis_server.url(f"{namespace}/step5"), no_dist=True, step=5)
    assert kvckpt.newest_restorable(url, prefix) == redis_server.url(f"{namespace}/step5")


def test_load_of_a_path_without_a_checkpoint_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(kvckpt.CheckpointNotFoundError, match="not a kvckpt URL, nor a DCP checkpoint"):
        kvckpt.load(blank(), str(tmp_path / "nothing"), no_dist=True)


def test_drain_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["--every", "0"], ["--every", "2", "--interval", "5"], ["--storage-option", "novalue"]):
        done = subprocess.run(
            [sys.executable, "-m", "kvckpt", "drain", *args, "redis://127.0.0.1:1/0/x", str(tmp_path)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2, (args, done.stderr)


def test_the_tiered_example_resumes_from_the_drained_copy_after_flushall(tmp_path: Path) -> None:
    from examples.tiered import main

    durable = str(tmp_path / "durable")
    with RedisServer() as server:  # its own server: FLUSHALL must not reach other tests' keys
        url = server.url("run1")
        first: list[str] = []
        second: list[str] = []
        assert main(["--url", url, "--durable", durable, "--steps", "5"], first.append) == 0
        assert kvckpt.Drainer(url, durable, every=2).run(once=True) == 0  # takes step4
        uninterrupted = first[-1]
        redis.Redis(port=server.port).flushall()
        assert main(["--url", url, "--durable", durable, "--steps", "5"], second.append) == 0
    assert second[0] == f"resumed from {os.path.join(durable, 'step4')} at step 4"
    assert second[1] == uninterrupted  # step 5 again, from the drained state: the same loss


def test_drainer_refuses_bad_settings_with_typed_errors(tmp_path: Path) -> None:
    source = "redis://127.0.0.1:1/0/run1"
    bad_settings: list[dict[str, Any]] = [
        {"every": 0},
        {"keep": 0},
        {"max_rate": 0},
        {"interval": -1.0},
        {"every": 2, "interval": 5.0},
    ]
    for bad in bad_settings:
        with pytest.raises(kvckpt.KVCheckpointError):
            kvckpt.Drainer(source, tmp_path, **bad)
    with pytest.raises(kvckpt.KVCheckpointError, match="is a kvckpt store URL"):
        kvckpt.Drainer(source, "redis://127.0.0.1:1/0/durable")


def test_a_damaged_checkpoint_is_not_drained(
    redis_server: RedisServer, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_steps(redis_server, namespace, [1])
    client = redis.Redis(port=redis_server.port)
    (chunk,) = [k for k in client.scan_iter(f"{namespace}/step1/*second_tensor*")][:1]
    client.setrange(chunk, 1000, b"\xff\x00\xff")  # same length, other bytes: only checksums can tell
    prefix = str(tmp_path / "durable")
    with caplog.at_level(logging.ERROR, logger="kvckpt.drain"):
        assert kvckpt.Drainer(redis_server.url(namespace), prefix).run(once=True) == 1
    assert "damaged in the store" in caplog.text and "checksum mismatch" in caplog.text
    assert kvckpt.durable_checkpoints(prefix) == [] and tiers.Destination(prefix).partials() == []
    assert not os.path.exists(os.path.join(prefix, "step1"))


def test_load_of_an_id_neither_kvckpt_nor_fsspec_opens_is_a_typed_error() -> None:
    for bad in ("memcached://h/0/ns", "rediss+cluster://h:1/ns"):
        with pytest.raises(kvckpt.InvalidCheckpointIdError, match="neither a kvckpt URL"):
            kvckpt.load(blank(), bad, no_dist=True)
