"""Concurrent saves and loads of one checkpoint id (docs/reliability.md).

Races are made deterministic with the FaultProxy: both saves are held at the commit until both are
there, a load is held after reading the record until an overwrite has retired its data.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from typing import Any

import pytest

import kvckpt
from kvckpt import layout
from tests.faulty import Faulty, blank, faulty, generation_of, state
from tests.harness.proxy import resp_prefix
from tests.harness.servers import free_port

__all__ = ["faulty"]  # the fixture, imported for pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _generations(faulty: Faulty, namespace: str) -> set[str]:
    keys = [k.removeprefix(f"{namespace}/") for k in faulty.keys(namespace)]
    return {k.split("/")[0] for k in keys if not k.endswith(layout.RECORD_NAME)}  # chunks and packs


def _race_two_saves(faulty: Faulty, namespace: str, overwrite: bool) -> dict[int, BaseException | None]:
    """Saves of generations 1 and 2, both held at the commit, then released together."""
    faulty.proxy.hold_on(faulty.commit(namespace))
    outcome: dict[int, BaseException | None] = {}

    def run(generation: int) -> None:
        try:
            kvckpt.save(
                state(generation),
                faulty.via_proxy(namespace),
                overwrite=overwrite,
                chunk_bytes=256 << 10,
                store_options=faulty.options,
            )
            outcome[generation] = None
        except BaseException as exc:
            outcome[generation] = exc

    threads = [threading.Thread(target=run, args=(g,)) for g in (1, 2)]
    for thread in threads:
        thread.start()
    try:
        faulty.proxy.wait_for(lambda: faulty.proxy.held() == 2, what="both commits in flight")
    finally:
        faulty.proxy.release()
        for thread in threads:
            thread.join(60)
    assert faulty.proxy.seen(faulty.commit(namespace)) == 2  # both really raced at the commit
    return outcome


def test_two_saves_without_overwrite_exactly_one_commits(faulty: Faulty, namespace: str) -> None:
    outcome = _race_two_saves(faulty, namespace, overwrite=False)
    winners = [g for g, exc in outcome.items() if exc is None]
    losers = [exc for exc in outcome.values() if exc is not None]
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], kvckpt.CheckpointExistsError)
    loaded = blank()
    kvckpt.load(loaded, faulty.direct(namespace))
    assert generation_of(loaded) == winners[0]
    assert len(_generations(faulty, namespace)) == 1  # the loser removed its data


def test_two_saves_with_overwrite_load_entirely_one(faulty: Faulty, namespace: str) -> None:
    outcome = _race_two_saves(faulty, namespace, overwrite=True)
    assert outcome == {1: None, 2: None}
    loaded = blank()
    kvckpt.load(loaded, faulty.direct(namespace))
    assert generation_of(loaded) in (1, 2)
    assert len(_generations(faulty, namespace)) == 1  # the replaced one was retired


def test_load_overtaken_by_an_overwrite_says_so(faulty: Faulty, namespace: str) -> None:
    kvckpt.save(state(1), faulty.direct(namespace), chunk_bytes=256 << 10)
    faulty.proxy.hold_on(faulty.data_read)  # the load has read the record; its data reads wait
    errors: list[BaseException] = []

    def load() -> None:
        try:
            kvckpt.load(blank(), faulty.via_proxy(namespace), store_options=faulty.options)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=load)
    reader.start()
    try:
        faulty.proxy.wait_for(lambda: faulty.proxy.held() >= 1, what="a held data read")
        kvckpt.save(state(2), faulty.direct(namespace), overwrite=True)  # retires generation 1
    finally:
        faulty.proxy.release()
        reader.join(60)
    assert len(errors) == 1 and isinstance(errors[0], kvckpt.CheckpointChangedError), errors
    loaded = blank()
    kvckpt.load(loaded, faulty.direct(namespace))  # loading again gets the new one
    assert generation_of(loaded) == 2


def test_loads_during_repeated_overwrites_are_never_mixed(faulty: Faulty, namespace: str) -> None:
    small = 32 << 10  # many keys: loads and retires take long enough to overlap
    kvckpt.save(state(1), faulty.direct(namespace), chunk_bytes=small)
    last = 8
    done = threading.Event()
    outcomes: list[int | str] = []

    def overwrite() -> None:
        try:
            for generation in range(2, last + 1):
                kvckpt.save(state(generation), faulty.direct(namespace), overwrite=True, chunk_bytes=small)
        finally:
            done.set()

    writer = threading.Thread(target=overwrite)
    writer.start()
    while not done.is_set() or not outcomes:
        loaded = blank()
        try:
            kvckpt.load(loaded, faulty.direct(namespace))
            outcomes.append(generation_of(loaded))  # asserts one whole generation
        except kvckpt.CheckpointChangedError:
            outcomes.append("changed")
    writer.join()
    assert all(o == "changed" or (isinstance(o, int) and 1 <= o <= last) for o in outcomes), outcomes
    loaded = blank()
    kvckpt.load(loaded, faulty.direct(namespace))
    assert generation_of(loaded) == last


# Ranks that read the record on either side of an overwrite ------------------------------------


def _rank(rank: int, port: int, url: str, reach: dict[str, Any], results: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        first: str | int
        try:
            loaded = blank()
            kvckpt.load(loaded, url, store_options=reach)
            first = generation_of(loaded)
        except kvckpt.CheckpointChangedError:
            first = "changed"
        loaded = blank()
        kvckpt.load(loaded, url, store_options=reach)  # again: every rank now reads the same record
        results.put((rank, first, generation_of(loaded)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_that_read_different_generations_refuse_to_load(faulty: Faulty, namespace: str) -> None:
    """Rank A reads the record, an overwrite commits (its retire held), rank B reads the new record:
    both generations' data exist, so only the ranks' generation check stops a mixed load."""
    kvckpt.save(state(1), faulty.direct(namespace))
    record_read = resp_prefix("GET", layout.record_key(namespace))
    faulty.proxy.hold_on(record_read, times=2)  # each rank's first look at the record
    faulty.proxy.hold_on(resp_prefix("UNLINK"))  # the overwrite's retire of generation 1
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    url = faulty.via_proxy(namespace)
    ranks = [context.Process(target=_rank, args=(r, port, url, faulty.reach, results)) for r in (0, 1)]
    writer = threading.Thread(
        target=kvckpt.save, args=(state(2), url), kwargs={"overwrite": True, "store_options": faulty.reach}
    )
    for process in ranks:
        process.start()
    try:
        faulty.proxy.wait_for(lambda: faulty.proxy.held() == 2, timeout=120, what="both ranks at the record")
        faulty.proxy.release(1, matching=record_read)  # one rank reads generation 1...
        faulty.proxy.wait_for(lambda: faulty.proxy.held() == 1, what="one rank released")
        writer.start()
        # the retire held (on a Cluster, on each node holding generation 1's keys)
        faulty.proxy.wait_for(lambda: faulty.proxy.held() >= 2, what="the overwrite's retire held")
        faulty.proxy.release(1, matching=record_read)  # ...the other reads generation 2
        got = sorted(results.get(timeout=120) for _ in ranks)
    except queue.Empty:
        pytest.fail("a rank did not report")
    finally:
        faulty.proxy.release()
        writer.join(60)
        for process in ranks:
            process.join(60)
            if process.is_alive():
                process.kill()
    assert got == [(0, "changed", 2), (1, "changed", 2)]
