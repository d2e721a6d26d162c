"""What a crashed save leaves behind: seen by ls/info/verify, removed by gc, never a live save's data.

Saves run in real processes (tests/stalled_save.py) killed with SIGKILL mid-save, against a real
redis-server and a real etcd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import kvckpt
from kvckpt import layout
from kvckpt.errors import CorruptCheckpointError, StoreFullError
from tests.conftest import Backend
from tests.harness.servers import EtcdServer, RedisServer
from tests.ranks import run_ranks
from tests.stalled_save import STATE
from tests.test_cli import kvckpt_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parent.parent
DATA_KEYS = 8  # the values tests/stalled_save.py writes before it stalls


class Saver:
    """tests/stalled_save.py in its own process, stalled before its last value."""

    def __init__(self, url: str, live_ttl: float, go: Path, overwrite: bool = False) -> None:
        self.go = go
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.stalled_save", url, str(live_ttl), str(go)]
            + (["overwrite"] if overwrite else []),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "stalled", self.process.stderr.read() if self.process.stderr else line

    def finish(self) -> str:
        self.go.touch()
        out, err = self.process.communicate(timeout=120)
        assert self.process.returncode == 0, err
        return out

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.communicate(timeout=30)


def wait_for(condition: object, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def generations(backend: Backend, namespace: str) -> dict[str, list[str]]:
    """save_id → keys of that generation directly in ``namespace``."""
    found: dict[str, list[str]] = {}
    for key in backend.keys(namespace + "/"):
        first = key[len(namespace) + 1 :].split("/", 1)[0]
        if layout.GENERATION.fullmatch(first):
            found.setdefault(first, []).append(key)
    return found


def crashed_save(backend: Backend, namespace: str, tmp_path: Path, overwrite: bool = False) -> str:
    """Kill a save with SIGKILL once its data is in the store; return its generation."""
    before = set(generations(backend, namespace))
    saver = Saver(backend.id(namespace), 0.5, tmp_path / f"go-{namespace.replace('/', '_')}", overwrite)

    def written() -> bool:
        return any(
            len(keys) >= DATA_KEYS and backend.store.exists(layout.live_key(namespace, save_id))
            for save_id, keys in generations(backend, namespace).items()
        )

    wait_for(written, "the stalled save's data and marker")
    saver.kill()
    (save_id,) = set(generations(backend, namespace)) - before
    wait_for(lambda: not backend.store.exists(layout.live_key(namespace, save_id)), "the marker to lapse")
    return save_id


@pytest.fixture(params=["redis", "etcd"])
def real_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    from tests.conftest import _open_backend

    opened = _open_backend(request, request.param)
    yield opened
    opened.store.close()


def test_a_killed_save_is_listed_as_an_orphan_and_gc_removes_it_but_not_a_live_save(
    real_backend: Backend, namespace: str, tmp_path: Path
) -> None:
    backend = real_backend
    kvckpt.save({"w": torch.ones(3)}, backend.id(f"{namespace}/done"))
    dead = crashed_save(backend, f"{namespace}/crashed", tmp_path)
    live = Saver(backend.id(f"{namespace}/live"), 2.0, tmp_path / "go-live")
    time.sleep(5.0)  # well past its live_ttl: only its refreshed marker keeps it alive
    (live_id,) = generations(backend, f"{namespace}/live")
    live_keys = [k for keys in generations(backend, f"{namespace}/live").values() for k in keys]
    assert len(live_keys) == DATA_KEYS
    assert backend.store.exists(layout.live_key(f"{namespace}/live", live_id))  # refreshed, alive

    (orphan,) = kvckpt.list_orphans(backend.id(namespace))
    assert (orphan.namespace, orphan.save_id, orphan.num_keys) == (f"{namespace}/crashed", dead, DATA_KEYS)
    assert orphan.nbytes == sum(t.nbytes for name, t in STATE.items() if name != "zz_last")
    assert kvckpt.gc(backend.id(namespace), dry_run=True) == [orphan]
    assert generations(backend, f"{namespace}/crashed")  # a dry run removes nothing

    assert kvckpt.gc(backend.id(namespace)) == [orphan]

    assert generations(backend, f"{namespace}/crashed") == {}
    assert sorted(k for keys in generations(backend, f"{namespace}/live").values() for k in keys) == sorted(
        live_keys
    )
    assert "committed" in live.finish()
    state = {name: torch.zeros_like(t) for name, t in STATE.items()}
    kvckpt.load(state, backend.id(f"{namespace}/live"))
    assert all(torch.equal(state[n], STATE[n]) for n in STATE)
    kvckpt.verify(backend.id(f"{namespace}/done"))
    assert kvckpt.list_orphans(backend.id(namespace)) == []
    assert [i.namespace for i in kvckpt.list_checkpoints(backend.id(namespace))] == [
        f"{namespace}/done",
        f"{namespace}/live",  # saved with step=7: after the one without a step
    ]


def test_ls_info_verify_show_orphans_and_the_gc_command_removes_them(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    backend = Backend("redis", redis_server.url, {}, kvckpt.open_store(redis_server.url("inspect")))
    kvckpt.save({"w": torch.ones(3)}, redis_server.url(f"{namespace}/step1"))
    crashed_save(backend, f"{namespace}/step1", tmp_path, overwrite=True)  # replacing step1, killed
    crashed_save(backend, f"{namespace}/step2", tmp_path)
    held = kvckpt.list_orphans(redis_server.url(namespace))
    assert len(held) == 2

    listed = kvckpt_cli("ls", redis_server.url(namespace))
    assert listed.returncode == 0, listed.stderr
    assert "orphans: 2 saves that died left 2 orphaned generations holding 4.0 MiB" in listed.stdout
    assert f"`kvckpt gc {redis_server.url(namespace)}` removes them" in listed.stdout
    info = kvckpt_cli("info", redis_server.url(f"{namespace}/step1"))
    assert "orphans: 1 save that died left 1 orphaned generation holding 2.0 MiB" in info.stdout
    verify = kvckpt_cli("verify", redis_server.url(f"{namespace}/step1"))
    assert verify.returncode == 0 and "orphans: 1 save that died left 1 orphaned generation" in verify.stdout
    missing = kvckpt_cli("info", redis_server.url(f"{namespace}/step2"))
    assert missing.returncode == 1 and "1 save that died left 1 orphaned generation holding 2.0 MiB" in (
        missing.stderr
    )

    dry = kvckpt_cli("gc", "--dry-run", "--json", redis_server.url(namespace))
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and sorted(r["nbytes"] for r in report["removed"]) == [2 << 20, 2 << 20]
    assert len(kvckpt.list_orphans(redis_server.url(namespace))) == 2
    removed = kvckpt_cli("gc", redis_server.url(namespace))
    assert removed.returncode == 0, removed.stderr
    assert "removed what 2 saves that died left 2 orphaned generations holding 4.0 MiB" in removed.stdout
    assert kvckpt.list_orphans(redis_server.url(namespace)) == []
    assert "orphans" not in kvckpt_cli("ls", redis_server.url(namespace)).stdout
    kvckpt.verify(redis_server.url(f"{namespace}/step1"))


def test_a_retried_save_and_keep_last_reclaim_orphans(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    backend = Backend("redis", redis_server.url, {}, kvckpt.open_store(redis_server.url("inspect")))
    dead = crashed_save(backend, f"{namespace}/step5", tmp_path)
    kvckpt.save(dict(STATE), redis_server.url(f"{namespace}/step5"))  # the restarted job saves again
    assert dead not in generations(backend, f"{namespace}/step5")
    assert kvckpt.list_orphans(redis_server.url(namespace)) == []

    crashed_save(backend, f"{namespace}/step6", tmp_path)
    kvckpt.keep_last(redis_server.url(namespace), 1)
    assert kvckpt.list_orphans(redis_server.url(namespace)) == []
    assert [i.namespace for i in kvckpt.list_checkpoints(redis_server.url(namespace))] == [
        f"{namespace}/step5"
    ]


def test_a_save_whose_marker_lapsed_does_not_commit(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """What a save stalled for longer than live_ttl meets: gc may have taken its data, so no commit."""
    backend = Backend("redis", redis_server.url, {}, kvckpt.open_store(redis_server.url("inspect")))
    saver = Saver(redis_server.url(namespace), 30.0, tmp_path / "go")
    wait_for(lambda: len(generations(backend, namespace)) == 1, "the stalled save's marker")
    (save_id,) = generations(backend, namespace)
    backend.store.delete(layout.live_key(namespace, save_id))  # as if it had expired
    saver.go.touch()
    _, err = saver.process.communicate(timeout=120)
    assert saver.process.returncode != 0
    assert "CorruptCheckpointError" in err and "liveness marker lapsed" in err
    assert kvckpt.list_checkpoints(redis_server.url(namespace)) == []
    assert generations(backend, namespace) == {}  # it removed what it had written
    assert CorruptCheckpointError.__name__ in err


@pytest.fixture
def small_server() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--maxmemory", "24mb", "--maxmemory-policy", "noeviction"]) as server:
        yield server


def test_a_full_store_says_how_much_orphans_hold(small_server: RedisServer, tmp_path: Path) -> None:
    backend = Backend("redis", small_server.url, {}, kvckpt.open_store(small_server.url("inspect")))
    crashed_save(backend, "run/step1", tmp_path)
    with pytest.raises(StoreFullError) as raised:
        kvckpt.save({"big": torch.zeros(8 << 20)}, small_server.url("run/step2"))  # 32 MiB
    message = str(raised.value)
    assert "1 save that died left 1 orphaned generation holding 2.0 MiB under " in message
    assert f"`kvckpt gc {small_server.url('run')}`" in message
    assert raised.value.orphan_bytes == 2 << 20  # type: ignore[attr-defined]


def test_rank_local_checkpoints_are_listed_verified_and_kept(
    redis_server: RedisServer, namespace: str
) -> None:
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    for step in (1, 2):
        writer = kvckpt.KVStorageWriter(redis_server.url(f"{namespace}/step{step}"), step=step)
        dcp_save({"w": torch.full((4,), float(step))}, storage_writer=writer, use_collectives=False)
    infos = kvckpt.list_checkpoints(redis_server.url(namespace))
    assert [(i.step, i.rank_local, i.world_size) for i in infos] == [(1, True, 1), (2, True, 1)]
    assert kvckpt.verify(infos[-1].checkpoint_id).num_keys == 1
    assert kvckpt.info(infos[-1].checkpoint_id).entries[0].fqn == "w"
    assert kvckpt.keep_last(redis_server.url(namespace), 1) == infos[:1]
    assert kvckpt.latest(redis_server.url(namespace)) == infos[-1].checkpoint_id


def test_etcd_orphans_have_no_expiry_until_gc(
    etcd_server: EtcdServer, namespace: str, tmp_path: Path
) -> None:
    """On etcd pending data is written with its final expiry (none): only gc reclaims it."""
    store = kvckpt.open_store(etcd_server.url("inspect"))
    backend = Backend("etcd", etcd_server.url, {}, store)
    crashed_save(backend, f"{namespace}/s", tmp_path)
    assert len(kvckpt.gc(etcd_server.url(namespace))) == 1
    assert backend.keys(namespace + "/") == []
    store.close()


class GateOnRank1(DefaultSavePlanner):
    """Rank 1 stops before its second item until ``gate`` exists; picklable for spawned ranks."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate, self.resolved = gate, 0

    def resolve_data(self, write_item: Any) -> Any:
        if dist.get_rank() == 1:
            self.resolved += 1
            if self.resolved == 2:
                deadline = time.monotonic() + 120
                while not Path(self.gate).exists():
                    assert time.monotonic() < deadline, f"the test never opened {self.gate}"
                    time.sleep(0.02)
        return super().resolve_data(write_item)


def two_rank_save(rank: int, world_size: int, url: str, gate: str) -> None:
    state = {f"r{rank}.w{i}": torch.full((4096,), float(i + 10 * rank)) for i in range(3)}  # per rank
    kvckpt.save(state, url, planner=GateOnRank1(gate), chunk_bytes=4096, batch_bytes=4096)
    loaded = {key: torch.zeros(4096) for key in state}
    kvckpt.load(loaded, url)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.slow
def test_gc_leaves_every_rank_of_a_live_save_alone(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """Ranks other than the coordinator write under generations of their own; while the save runs,
    gc must not take them for orphans (only the coordinator keeps a liveness marker)."""
    url, gate = redis_server.url(namespace), tmp_path / "gate"
    store = kvckpt.open_store(redis_server.url("inspect"))
    found: list[object] = []

    def collect_midway() -> None:
        try:

            def two_generations() -> bool:
                data = [k for k in store.scan_prefix(f"{namespace}/") if f"/{layout.LIVE_NAME}/" not in k]
                return len({k.split("/")[2] for k in data}) >= 2

            wait_for(two_generations, "both ranks writing", seconds=120)
            found.append(kvckpt.gc(redis_server.url(namespace)))
        finally:
            gate.touch()

    thread = threading.Thread(target=collect_midway)
    thread.start()
    run_ranks(two_rank_save, 2, url, str(gate))
    thread.join()
    assert found == [[]]
    assert kvckpt.list_orphans(redis_server.url(namespace)) == []


def _scans(server: RedisServer) -> int:
    """SCAN commands the server has run so far (INFO commandstats)."""
    import redis

    client: Any = redis.Redis(port=server.port)
    try:
        return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))
    finally:
        client.close()


def test_a_save_lists_keys_only_after_a_save_there_died(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    """Finding orphans is a SCAN of the whole keyspace on Redis (0.6 s per million keys); a save
    pays it only when the namespace's ``.unfinished`` marker says an earlier save never committed."""
    url = redis_server.url(f"{namespace}/step1")
    before = _scans(redis_server)
    kvckpt.save(dict(STATE), url)
    kvckpt.save(dict(STATE), url, overwrite=True)
    assert _scans(redis_server) == before
    backend = Backend("redis", redis_server.url, {}, kvckpt.open_store(redis_server.url("inspect")))
    assert not backend.store.exists(layout.unfinished_key(f"{namespace}/step1"))  # cleared by the commit

    dead = crashed_save(backend, f"{namespace}/step1", tmp_path, overwrite=True)
    assert backend.store.exists(layout.unfinished_key(f"{namespace}/step1"))
    kvckpt.save(dict(STATE), url, overwrite=True)  # the restarted job: looks, and reclaims
    assert _scans(redis_server) > before
    assert dead not in generations(backend, f"{namespace}/step1")
    assert not backend.store.exists(layout.unfinished_key(f"{namespace}/step1"))
