"""The durable tier keeps a complete copy of every name through replacements cut short, and the
drainer orders checkpoints by the store's clock, not the saving host's.

Against a real redis-server, local folders and S3 (moto's server mode). Kills are real: a drainer in
a child process exits with ``os._exit`` at the chosen moment, leaving what kill -9 would leave.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

import kvckpt
from kvckpt.cli.local_server import RedisServer
from kvckpt.tiered import tiers
from tests.harness.proxy import FaultProxy
from tests.ranks import ROOT
from tests.s3_server import MotoServer
from tests.test_drain import HELD, assert_is_step, blank, state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: A store that is gone fails at once instead of retrying.
FAIL_FAST = {"retries": 0}


@pytest.fixture(params=["folder", "s3"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A durable prefix, its fsspec storage options and the environment a child process needs."""
    if request.param == "folder":
        return str(tmp_path / "durable"), {}, {}
    moto: MotoServer = request.getfixturevalue("moto_server")
    prefix: str = request.getfixturevalue("s3_prefix")
    return f"{prefix}/run", moto.storage_options(), moto.environment()


def loaded_step(checkpoint_id: str, options: dict[str, Any]) -> int:
    loaded = blank()
    kvckpt.load(loaded, checkpoint_id, no_dist=True, storage_options=options)
    step = loaded["trainer"]["step"]
    assert_is_step(loaded, step)
    return int(step)


def names_under(prefix: str, options: dict[str, Any]) -> list[str]:
    """Every entry directly under the prefix, hidden staging folders included."""
    destination = tiers.Destination(prefix, options)
    destination.fs.invalidate_cache()
    return sorted(p.rstrip("/").rpartition("/")[2] for p in destination.fs.ls(destination.root, detail=False))


def drained_then_saved_again(server: RedisServer, prefix: str, options: dict[str, Any]) -> None:
    """``run/last`` holds step 2 in the store, and its earlier generation (step 1) is drained."""
    kvckpt.save(state(1), server.url("run/last"), no_dist=True, step=1)
    assert kvckpt.Drainer(server.url("run"), prefix, storage_options=options).run(once=True) == 0
    kvckpt.save(state(2), server.url("run/last"), no_dist=True, step=2, overwrite=True)


def test_an_overwrite_whose_copy_dies_midway_leaves_the_old_copy_restorable(
    durable: tuple[str, dict[str, Any], dict[str, str]],
) -> None:
    prefix, options, _ = durable
    results: list[int] = []
    with RedisServer() as server:
        drained_then_saved_again(server, prefix, options)
        with FaultProxy(server.port) as proxy:
            proxy.hold_on(HELD)
            drainer = kvckpt.Drainer(
                f"redis://127.0.0.1:{proxy.port}/0/run",
                prefix,
                group_bytes=1 << 20,
                store_options=FAIL_FAST,
                storage_options=options,
            )
            worker = threading.Thread(target=lambda: results.append(drainer.run(once=True)))
            worker.start()
            try:
                proxy.wait_for(lambda: proxy.held() > 0, what="the drainer reading the second tensor")
                (during,) = kvckpt.durable_checkpoints(prefix, storage_options=options)
                assert during.step == 1  # half of the replacement is written: the old copy still counts
                server.stop()  # the store dies mid-copy
                proxy.cut()
            finally:
                proxy.release()
                worker.join(60)
    assert results == [1]
    (copy,) = kvckpt.durable_checkpoints(prefix, storage_options=options)
    assert copy.checkpoint_id == tiers.Destination(prefix, options).url("last")
    assert copy.step == 1 and loaded_step(copy.checkpoint_id, options) == 1
    restorable = kvckpt.newest_restorable(server.url("run"), prefix, storage_options=options, **FAIL_FAST)
    assert restorable == copy.checkpoint_id


#: A drainer that exits as kill -9 would once the replacement of ``last`` is half-way onto its name:
#: on a folder, between the rename that moves the old copy aside and the one that moves the new copy
#: in; on an object store, after the first staged file was copied onto the name.
KILLED_WHILE_INSTALLING = """
import os, sys
import s3fs
import kvckpt
from kvckpt.tiered import tiers

source, prefix = sys.argv[1:3]
final = tiers.Destination(prefix).path("last")
real_rename, real_copy = os.rename, s3fs.S3FileSystem._cp_file

def rename(src, dst, *args, **kwargs):
    real_rename(src, dst, *args, **kwargs)
    if os.fspath(src) == final:
        os._exit(137)

async def copy(self, path1, path2, **kwargs):
    await real_copy(self, path1, path2, **kwargs)
    if self._strip_protocol(path2).startswith(final + "/"):
        os._exit(137)

os.rename, s3fs.S3FileSystem._cp_file = rename, copy
sys.exit(kvckpt.Drainer(source, prefix).run(once=True))
"""


def test_a_drainer_killed_while_a_replacement_takes_the_name_leaves_a_complete_copy(
    durable: tuple[str, dict[str, Any], dict[str, str]],
) -> None:
    prefix, options, env = durable
    with RedisServer() as server:
        drained_then_saved_again(server, prefix, options)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        child = subprocess.run(
            [sys.executable, "-c", KILLED_WHILE_INSTALLING, server.url("run"), prefix],
            env={**os.environ, **env, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 137, child.stderr
        destination = tiers.Destination(prefix, options)
        destination.fs.invalidate_cache()
        marker = f"{destination.path('last')}/{tiers.MARKER}"
        assert not destination.fs.exists(marker)  # the name itself holds no complete copy now
        (copy,) = kvckpt.durable_checkpoints(prefix, storage_options=options)  # but a staged one is found
        assert copy.name == "last" and copy.step == 2 and loaded_step(copy.checkpoint_id, options) == 2
        redis.Redis(port=server.port).flushall()  # the store loses everything too
        restorable = kvckpt.newest_restorable(server.url("run"), prefix, storage_options=options)
        assert restorable == copy.checkpoint_id

        assert kvckpt.Drainer(server.url("run"), prefix, storage_options=options).run(once=True) == 0
    (copy,) = kvckpt.durable_checkpoints(prefix, storage_options=options)
    assert copy.checkpoint_id == destination.url("last")
    assert copy.step == 2 and loaded_step(copy.checkpoint_id, options) == 2
    assert names_under(prefix, options) == ["last"] and destination.partials() == []


def test_a_replaced_copy_left_beside_its_name_by_an_earlier_drainer_is_moved_into_place(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """What a drainer that nested the copy it moved aside (``.NAME.old-XXXXXXXX/NAME``) left when
    killed between its two renames: both copies complete under staging names, none at the name."""
    prefix = tmp_path / "durable"
    kvckpt.save(state(1), redis_server.url(f"{namespace}/last"), no_dist=True, step=1)
    assert kvckpt.Drainer(redis_server.url(namespace), str(prefix)).run(once=True) == 0
    kvckpt.save(state(2), redis_server.url(f"{namespace}/last"), no_dist=True, step=2, overwrite=True)
    assert kvckpt.Drainer(redis_server.url(namespace), str(prefix)).run(once=True) == 0
    (prefix / ".last.old-abcd1234").mkdir()
    (prefix / "last").rename(prefix / ".last.old-abcd1234" / "last")  # step 2, moved aside
    kvckpt.delete(redis_server.url(f"{namespace}/last"))

    (copy,) = kvckpt.durable_checkpoints(prefix)
    assert copy.step == 2 and loaded_step(copy.checkpoint_id, {}) == 2
    assert kvckpt.Drainer(redis_server.url(namespace), str(prefix)).run(once=True) == 0
    (copy,) = kvckpt.durable_checkpoints(prefix)
    assert copy.checkpoint_id == str(prefix / "last") and loaded_step(copy.checkpoint_id, {}) == 2
    assert sorted(os.listdir(prefix)) == ["last"]


#: Saves step 2 from a host whose clock is an hour behind: the record's ``created`` says so.
SAVED_BEHIND = """
import sys, time
real = time.time
time.time = lambda: real() - 3600
import kvckpt
from tests.test_drain import state

url, step = sys.argv[1], sys.argv[2]
kvckpt.save(state(2), url, no_dist=True, step=None if step == "none" else 2)
"""


@pytest.mark.parametrize("with_step", [True, False], ids=["step", "no-step"])
def test_a_checkpoint_saved_by_a_host_whose_clock_is_behind_is_drained(
    redis_server: RedisServer, namespace: str, tmp_path: Path, with_step: bool
) -> None:
    url, prefix = redis_server.url(namespace), str(tmp_path / "durable")
    kvckpt.save(state(1), redis_server.url(f"{namespace}/step1"), no_dist=True, step=1 if with_step else None)
    assert kvckpt.Drainer(url, prefix).run(once=True) == 0
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    saved = subprocess.run(
        [
            sys.executable,
            "-c",
            SAVED_BEHIND,
            redis_server.url(f"{namespace}/step2"),
            "2" if with_step else "none",
        ],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert saved.returncode == 0, saved.stderr
    infos = kvckpt.list_checkpoints(url)
    assert [i.namespace.rpartition("/")[2] for i in infos] == ["step1", "step2"]  # the store's order
    assert infos[1].created < infos[0].created - 3000  # what the saving host's clock said

    assert kvckpt.Drainer(url, prefix).run(once=True) == 0
    assert [c.name for c in kvckpt.durable_checkpoints(prefix)] == ["step1", "step2"]
    for step in (1, 2):
        kvckpt.delete(redis_server.url(f"{namespace}/step{step}"))
    restorable = kvckpt.newest_restorable(url, prefix)
    assert restorable == os.path.join(prefix, "step2") and loaded_step(restorable, {}) == 2


def test_copies_drained_before_commit_clocks_were_recorded_are_listed_by_commit_time(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    prefix = tmp_path / "durable"
    for step in (1, 2):
        kvckpt.save(state(step), redis_server.url(f"{namespace}/step{step}"), no_dist=True)
        assert kvckpt.Drainer(redis_server.url(namespace), str(prefix)).run(once=True) == 0
    for name in ("step1", "step2"):
        marker = prefix / name / tiers.MARKER
        body = json.loads(marker.read_text())
        body.pop("commit_clock", None)
        marker.write_text(json.dumps(body))
    drained = kvckpt.durable_checkpoints(prefix)
    assert [(c.name, c.commit_clock) for c in drained] == [("step1", None), ("step2", None)]
    assert drained[0].created < drained[1].created
