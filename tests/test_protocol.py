"""The commit rule of docs/protocol.md against real servers: each way it was once broken, reproduced.

- a save stalled (SIGSTOP) past ``live_ttl`` at its commit while gc removed its data;
- gc racing a commit after its scan missed the save's liveness marker;
- a commit delayed in the network past its timeout, under the least-privilege ACL (no CLIENT KILL);
- a host whose clock is behind deciding which checkpoint is the newest.

Each fails on the code before the rule (an unconditional commit, deciders that read records before
they looked for markers, host clocks in the order) and passes with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

import kvckpt
from kvckpt import layout
from kvckpt.dcp import writer
from kvckpt.stores.redis.commands import ACL_RULES
from kvckpt.stores.redis.slots import key_slot
from tests.faulty import QUICK, Faulty, blank, faulty, same, state
from tests.harness.proxy import FaultProxy, resp_prefix
from tests.harness.servers import RedisServer, redis_call

__all__ = ["faulty"]  # the fixture, imported for pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Bytes only a commit sends: the start of every record (its msgpack "format" entry).
COMMIT = b"\xa6format\xa6kvckpt"
#: Store options for clients held at the proxy on purpose: they must not time out meanwhile.
PATIENT = {"timeout": 30.0, "total_timeout": 60.0}


def _save_in_child(
    url: str, options: dict[str, Any], generation: int, clock_skew: float, **save: Any
) -> None:
    """Save from another process, as another host would; ``clock_skew`` seconds off its clock.
    Exits 0 when the save was acknowledged, 3 when it raised a kvckpt error."""
    if clock_skew:  # the host's clock as kvckpt reads it (libraries keep theirs: grpc's deadlines)
        real = time.time
        writer.time = types.SimpleNamespace(time=lambda: real() + clock_skew)  # type: ignore[assignment,attr-defined]
    try:
        kvckpt.save(state(generation), url, store_options=options, **save)
    except kvckpt.KVCheckpointError as exc:
        print(f"child: {type(exc).__name__}: {exc}", flush=True)
        os._exit(3)
    os._exit(0)


def _child(url: str, options: dict[str, Any], generation: int, clock_skew: float = 0.0, **save: Any) -> Any:
    process = multiprocessing.get_context("spawn").Process(
        target=_save_in_child, args=(url, options, generation, clock_skew), kwargs=save
    )
    process.start()
    return process


def _verified(url: str) -> dict[str, Any]:
    kvckpt.verify(url)
    loaded = blank()
    kvckpt.load(loaded, url)
    return loaded


def test_a_save_stalled_past_live_ttl_at_its_commit_never_commits(faulty: Faulty, namespace: str) -> None:
    """The saving process stops (SIGSTOP) with its commit on the wire; its marker lapses and gc
    removes its data; then the commit arrives. It must change nothing: the old checkpoint stays."""
    checkpoint = f"{namespace}/last"
    kvckpt.save(state(1), faulty.direct(checkpoint))
    faulty.proxy.hold_on(COMMIT, times=1)
    options = {**faulty.options, **PATIENT}
    child = _child(faulty.via_proxy(checkpoint), options, 2, overwrite=True, live_ttl=1.0)
    try:
        faulty.proxy.wait_for(lambda: faulty.proxy.held(COMMIT) == 1, what="the held commit")
        assert child.pid is not None
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while any("/.live/" in key for key in faulty.keys(checkpoint)):
            assert time.monotonic() < deadline, "the stopped save's liveness marker never lapsed"
            time.sleep(0.1)
        removed = kvckpt.gc(faulty.direct(namespace))
        assert len(removed) == 1  # the stopped save's generation: no record names it, no marker
        faulty.proxy.release()  # the commit reaches the server, long after the marker lapsed
        faulty.proxy.wait_for(lambda: faulty.proxy.held() == 0, what="release")
    finally:
        if child.pid is not None:
            os.kill(child.pid, signal.SIGCONT)
        child.join(60)
    assert child.exitcode == 3  # the save was refused, not acknowledged
    assert same(state(1), _verified(faulty.direct(checkpoint)))


def _first_node_namespace(faulty: Faulty, prefix: str) -> tuple[str, set[int]]:
    """A checkpoint namespace below ``prefix`` whose record lives on the primary a scan of the
    Cluster visits first, and the slots that primary serves."""
    store = kvckpt.open_store(faulty.via_proxy(prefix), **faulty.options)
    try:
        table = store.channel.router.table()  # type: ignore[attr-defined]
    finally:
        store.close()
    first = table.primaries[0]
    slots = {slot for slot, owner in enumerate(table.owners) if owner == first}
    for i in range(10_000):
        namespace = f"{prefix}/ck{i}"
        if key_slot(layout.record_key(namespace)) in slots:
            return namespace, slots
    raise AssertionError("no namespace maps to the first primary")


@pytest.mark.parametrize("faulty", ["redis+cluster"], indirect=True)  # a scan visits nodes in turn
def test_gc_racing_a_commit_never_deletes_it(
    faulty: Faulty, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc scans the Cluster node by node. A save starts after gc scanned the node of its marker but
    before it scanned its data, and commits after gc read the records: gc must not delete it."""
    checkpoint, first_slots = _first_node_namespace(faulty, namespace)
    # The generation id decides where a marker named after it lands: keep it on the first node too.
    save_id = next(
        f"g20261207T000000-{i:08x}"
        for i in range(1 << 20)
        if key_slot(layout.live_key(checkpoint, f"g20261207T000000-{i:08x}")) in first_slots
    )
    monkeypatch.setattr(layout, "new_save_id", lambda: save_id)
    scan, fresh, marker_check = resp_prefix("SCAN"), resp_prefix("SCAN", "0"), b"/.live/*"
    proxy, options = faulty.proxy, {**faulty.options, **PATIENT}
    outcome: dict[str, Any] = {}

    def run(name: str, action: Any) -> threading.Thread:
        def target() -> None:
            try:
                outcome[name] = action()
            except BaseException as exc:
                outcome[name] = exc

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    def next_scan() -> None:
        proxy.wait_for(lambda: proxy.held(scan) == 1 or "gc" in outcome, what=f"gc's next SCAN ({outcome})")
        assert "gc" not in outcome, outcome

    proxy.hold_on(scan)
    proxy.hold_on(COMMIT, times=1)
    try:
        gc = run("gc", lambda: kvckpt.gc(faulty.via_proxy(namespace), **options))
        next_scan()  # the first node's scan begins
        proxy.release(1, matching=scan)
        next_scan()
        while proxy.held(fresh) == 0:  # that node's further pages
            proxy.release(1, matching=scan)
            next_scan()
        # gc waits to scan the second node: the save starts now, and stops at its commit.
        save = run("save", lambda: kvckpt.save(state(2), faulty.via_proxy(checkpoint), store_options=options))
        proxy.wait_for(lambda: proxy.held(COMMIT) == 1, what="the save's commit")
        data = [k for k in faulty.keys(checkpoint) if f"/{save_id}/" in k]  # chunks and packs
        assert any(key_slot(k) not in first_slots for k in data), "no data on a node scanned later"
        while proxy.held(marker_check) == 0:  # gc scans the rest, reads the records, then checks
            proxy.release(1, matching=scan)  # for markers: the save commits right before that check
            next_scan()
        proxy.release(1, matching=COMMIT)
        save.join(60)
        assert not isinstance(outcome["save"], BaseException), outcome["save"]
    finally:
        proxy.release()
        with contextlib.suppress(Exception):
            gc.join(60)
    assert not isinstance(outcome.get("gc"), BaseException), outcome.get("gc")
    assert same(state(2), _verified(faulty.direct(checkpoint)))


@contextlib.contextmanager
def _least_privilege_user(server: RedisServer, namespace: str) -> Iterator[str]:
    """The documented ACL user (keys ``namespace/*``, ACL_RULES: no CLIENT commands)."""
    user = f"least-{namespace.rsplit('/', 1)[-1]}"
    redis_call(
        server.port, "ACL", "SETUSER", user, "reset", "on", ">pw", f"~{namespace}/*", "-@all", *ACL_RULES
    )
    try:
        yield f"{user}:pw"
    finally:
        redis_call(server.port, "ACL", "DELUSER", user)


def test_a_late_commit_under_the_least_privilege_acl_never_lands(
    redis_server: RedisServer, namespace: str
) -> None:
    """The commit sits in the network past the writer's timeout; the user may not CLIENT KILL. The
    writer says nothing was committed, so the commit must never land when it finally arrives."""
    checkpoint = f"{namespace}/last"
    kvckpt.save(state(1), redis_server.url(checkpoint))
    with _least_privilege_user(redis_server, namespace) as login, FaultProxy(redis_server.port) as proxy:
        url = f"redis://{login}@127.0.0.1:{proxy.port}/0/{checkpoint}"
        proxy.hold_on(COMMIT, times=1)
        with pytest.raises(kvckpt.StoreUnavailableError, match="did not take effect"):
            kvckpt.save(state(2), url, overwrite=True, store_options=QUICK)
        proxy.release()  # the held commit reaches the server now
        proxy.wait_for(lambda: proxy.held() == 0, what="release")
        time.sleep(0.3)
    assert same(state(1), _verified(redis_server.url(checkpoint)))


@pytest.mark.parametrize("server", ["redis", "etcd"])
def test_a_host_clock_behind_does_not_decide_what_is_newest(
    server: str, namespace: str, request: pytest.FixtureRequest
) -> None:
    """Two saves without a step, the second from a host whose clock is an hour behind: the second
    committed last, so it is the latest, and keep_last(1) keeps it."""
    if server == "redis":
        url = request.getfixturevalue("redis_server").url
    else:
        url = request.getfixturevalue("etcd_server").url
    kvckpt.save(state(1), url(f"{namespace}/a"))
    child = _child(url(f"{namespace}/b"), {}, 2, clock_skew=-3600.0)
    child.join(120)
    assert child.exitcode == 0
    created = {i.namespace: i.created for i in kvckpt.list_checkpoints(url(namespace))}
    assert created[f"{namespace}/a"] > created[f"{namespace}/b"]  # the hosts' clocks say b is older...
    assert kvckpt.latest(url(namespace)) == url(f"{namespace}/b")  # ...the store's says it is newer
    assert [i.namespace for i in kvckpt.keep_last(url(namespace), 1, dry_run=True)] == [f"{namespace}/a"]
