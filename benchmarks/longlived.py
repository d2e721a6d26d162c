"""kvckpt vs FileSystemWriter/Reader on /dev/shm the way a training job checkpoints: one process.

    python benchmarks/longlived.py [--quick] [--scenarios large,small,model] [--targets fs,tcp,...]
                                   [--repeat 5] [--redis-server PATH] [--server-args "--io-threads 2"]

benchmarks/bench.py runs every phase in a fresh process, which measures a first checkpoint: fresh
allocator arenas, an empty collector, a client that never saved before. A training job instead holds
its state dict for hours and saves, loads (on restart) and deletes (``keep_last``) again and again from
the same process. Here one process builds each scenario's state dict and its load target once, then
per repetition runs save → load → delete for every target in turn (FileSystemWriter and kvckpt
interleaved, so a burst of load elsewhere on the machine hits all of them alike).

Each row gives the median and the range of its repetitions, and the kvckpt/FS speedups both as a
ratio of medians and as the range of the per-repetition ratios. The resource table says what bounded
each phase: CPU seconds (user + system, all threads) and minor/major page faults of this process and
of redis-server, read from ``/proc/<pid>/stat`` around the phase, "busy" = CPU s per wall s, and Python
collector passes; the header gives the machine's memcpy and first-touch bandwidth, measured at start.

Targets: ``tcp``/``unix`` is a server emptied with a synchronous FLUSHALL after each delete (which also
returns jemalloc's pages: every save starts cold, faulting in new memory); ``tcp-kept``/``unix-kept`` runs
with ``REDIS_KEEP_FREED_MEMORY_ENV`` and has held one checkpoint of the scenario's size before the first
measured save, so it reuses the memory ``delete`` freed: the steady state under ``keep_last``.
A delete's wall time is the client's; the server's CPU in that row includes its background (lazy) free,
which is waited for before the next phase starts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from benchmarks import probes
from benchmarks.bench import MIB, RESULTS, ROOT, SCENARIOS, _blank, _same, _unlink_all, machine, tensor_bytes

PHASES = ("save", "load", "delete")
TARGETS = ("fs", "tcp", "unix", "tcp-kept", "unix-kept")


@dataclass
class Target:
    """One place checkpoints go: how to name one, the server behind it, and how to leave it empty."""

    name: str
    checkpoint_id: Callable[[str], str]
    server_pids: list[int]
    after_delete: Callable[[], object]


@contextlib.contextmanager
def open_targets(
    names: list[str], scratch: Path, redis_binary: str, server_args: Sequence[str] = ()
) -> Iterator[dict[str, Target]]:
    import redis

    from kvckpt.cli.local_server import REDIS_KEEP_FREED_MEMORY_ENV, RedisServer, find_redis_server

    binary = redis_binary or find_redis_server()
    targets = {"fs": Target("fs", lambda ns: str(scratch / ns), [], lambda: None)}
    with contextlib.ExitStack() as stack:
        for kept in (False, True):
            wanted = [n for n in names if n != "fs" and n.endswith("-kept") == kept]
            if not wanted:
                continue
            env = REDIS_KEEP_FREED_MEMORY_ENV if kept else {}
            server = RedisServer(binary=binary, extra_args=server_args, environment=dict(env))
            stack.enter_context(server)
            client = stack.enter_context(contextlib.closing(redis.Redis(port=server.port)))
            assert server.process is not None
            # Cold: a synchronous FLUSHALL purges jemalloc, so the next save faults in new pages.
            # Kept: only wait for the lazy frees of the delete's UNLINKs, as keep_last leaves them.
            empty: Callable[[], object] = functools.partial(_unlink_all, client) if kept else client.flushall
            for name in wanted:
                url = server.url if name.startswith("tcp") else server.unix_url
                targets[name] = Target(name, url, [server.process.pid], empty)
        yield {n: targets[n] for n in names}


def _writer(target: Target, checkpoint_id: str) -> Any:
    if target.name == "fs":
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(checkpoint_id)
    import kvckpt

    return kvckpt.KVStorageWriter(checkpoint_id, overwrite=True)


def _reader(target: Target, checkpoint_id: str) -> Any:
    if target.name == "fs":
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(checkpoint_id)
    import kvckpt

    return kvckpt.KVStorageReader(checkpoint_id)


def _delete(target: Target, checkpoint_id: str) -> None:
    if target.name == "fs":
        shutil.rmtree(checkpoint_id)
        return
    import kvckpt

    if not kvckpt.delete(checkpoint_id):
        raise RuntimeError(f"{target.name}: nothing to delete at the checkpoint just saved")


def _collections() -> int:
    return sum(generation["collections"] for generation in gc.get_stats())


def timed_phase(target: Target, action: Callable[[], object], settle: bool = False) -> dict[str, Any]:
    """Wall time of ``action`` and what this process and the target's server spent meanwhile; with
    ``settle``, the server's part runs until it has emptied itself (its lazy frees, a FLUSHALL)."""
    client, server, passes = probes.usage(), probes.usage(target.server_pids), _collections()
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    client_used = probes.usage() - client
    if settle:
        target.after_delete()
    server_used = probes.usage(target.server_pids) - server
    return {
        "seconds": seconds,
        "client": vars(client_used),
        "server": vars(server_used),
        "gc_passes": _collections() - passes,
    }


def run_scenario(
    name: str, kwargs: dict[str, Any], targets: dict[str, Target], repeat: int
) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    state = SCENARIOS[name].build(**kwargs)
    loaded = _blank(state)
    tensors = [t for t in _leaves(loaded) if isinstance(t, torch.Tensor)]
    size = tensor_bytes(state)
    warm = {"w": torch.ones(4)}
    for target in targets.values():  # DCP's lazy imports and first calls, once per process
        warm_id = target.checkpoint_id(f"bench/{name}/warmup-{uuid.uuid4().hex[:8]}")
        dcp.save(warm, storage_writer=_writer(target, warm_id))
        dcp.load(warm, storage_reader=_reader(target, warm_id))
        _delete(target, warm_id)
        if target.name.endswith("-kept"):  # the steady state: one checkpoint of this size came and went
            prime = target.checkpoint_id(f"bench/{name}/prime-{uuid.uuid4().hex[:8]}")
            dcp.save(state, storage_writer=_writer(target, prime))
            _delete(target, prime)
        target.after_delete()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {p: [] for p in PHASES} for t in targets}
    verified = True
    for rep in range(repeat):
        for target in targets.values():
            checkpoint_id = target.checkpoint_id(f"bench/{name}/{uuid.uuid4().hex[:8]}")
            for tensor in tensors:  # untimed: a load must not pass by finding the last one's values
                tensor.zero_()

            def save(target: Target = target, checkpoint_id: str = checkpoint_id) -> None:
                dcp.save(state, storage_writer=_writer(target, checkpoint_id))

            def load(target: Target = target, checkpoint_id: str = checkpoint_id) -> None:
                dcp.load(loaded, storage_reader=_reader(target, checkpoint_id))

            def delete(target: Target = target, checkpoint_id: str = checkpoint_id) -> None:
                _delete(target, checkpoint_id)

            for phase, action in (("save", save), ("load", load)):
                runs[target.name][phase].append(timed_phase(target, action))
            if rep == 0:
                verified = verified and _same(state, loaded)
            runs[target.name]["delete"].append(timed_phase(target, delete, settle=True))
            line = ", ".join(f"{p} {runs[target.name][p][-1]['seconds']:.3f} s" for p in PHASES)
            print(f"  {name:6} {target.name:9} rep {rep}: {line}", file=sys.stderr, flush=True)
    return {"bytes": size, "kwargs": kwargs, "verified": verified, "runs": runs}


def _leaves(state: Any) -> Iterator[Any]:
    if isinstance(state, dict):
        for value in state.values():
            yield from _leaves(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _leaves(value)
    else:
        yield state


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of the wall time; medians of every counter."""

    def med(pick: Callable[[dict[str, Any]], float]) -> float:
        return probes.spread([pick(r) for r in runs]).median

    seconds = probes.spread([r["seconds"] for r in runs])
    out: dict[str, Any] = {"seconds": vars(seconds), "gc_passes": med(lambda r: r["gc_passes"])}
    for side in ("client", "server"):
        out[side] = {k: med(functools.partial(_counter, side, k)) for k in vars(probes.Usage())}
    return out


def _counter(side: str, name: str, run: dict[str, Any]) -> float:
    return float(run[side][name])


def ratios(fs: list[dict[str, Any]], kv: list[dict[str, Any]]) -> dict[str, Any]:
    """kvckpt's speedup over FS: of the medians, and the range of the per-repetition ratios."""
    fs_s, kv_s = [r["seconds"] for r in fs], [r["seconds"] for r in kv]
    paired = probes.spread(probes.paired_speedups(fs_s, kv_s))
    of_medians = probes.speedup(probes.spread(fs_s).median, probes.spread(kv_s).median)
    return {"of_medians": of_medians, "paired": vars(paired)}


def report_rows(results: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, result in results.items():
        fs = result["runs"].get("fs")
        for target, phases in result["runs"].items():
            row: dict[str, Any] = {"scenario": name, "target": target, "bytes": result["bytes"]}
            for phase in PHASES:
                row[phase] = summarise(phases[phase])
                if fs is not None and target != "fs":
                    row[phase]["vs_fs"] = ratios(fs[phase], phases[phase])
            rows[f"{name}/{target}"] = row
    return rows


def _ratio_text(cell: dict[str, Any]) -> str:
    if "vs_fs" not in cell:
        return "—"
    paired = probes.Spread(**cell["vs_fs"]["paired"])
    if paired.low == paired.high:
        return f"{cell['vs_fs']['of_medians']:.2f}x"
    return f"{cell['vs_fs']['of_medians']:.2f}x [{paired.low:.2f}-{paired.high:.2f}]"


def time_table(rows: dict[str, Any]) -> str:
    lines = [
        "| scenario | target | data | save s | load s | delete s | save vs FS | load vs FS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        times = " | ".join(probes.Spread(**row[p]["seconds"]).text() for p in PHASES)
        lines.append(
            f"| {row['scenario']} | {row['target']} | {row['bytes'] / MIB:,.0f} MiB | {times} "
            f"| {_ratio_text(row['save'])} | {_ratio_text(row['load'])} |"
        )
    return "\n".join(lines)


def resource_table(rows: dict[str, Any]) -> str:
    lines = [
        "| scenario | target | phase | wall s | client CPU s (busy) | client faults min/maj "
        "| server CPU s (busy) | server faults min/maj | gc passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        for phase in PHASES:
            cell = row[phase]
            wall = cell["seconds"]["median"]
            sides = []
            for side in ("client", "server"):
                used = cell[side]
                sides.append(
                    f"{used['cpu_s']:.2f} ({probes.busy(used['cpu_s'], wall):.0%}) "
                    f"| {used['minor_faults'] / 1000:,.1f}k/{used['major_faults']:.0f}"
                )
            lines.append(
                f"| {row['scenario']} | {row['target']} | {phase} | {wall:.3f} | "
                + " | ".join(sides)
                + f" | {cell['gc_passes']:.0f} |"
            )
    return "\n".join(lines)


def publish(
    script: str, argv: list[str] | None, info: dict[str, Any], setup: str, text: str, record: dict[str, Any]
) -> None:
    """Prints the command, the machine and ``setup`` above ``text``, and writes them with ``record`` to
    benchmarks/results/SCRIPT-TIME.json, so a figure quoted anywhere carries how it was made."""
    command = (
        f"python benchmarks/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    print(
        f"\n{command}\n{info['cores']} cores ({info['cpu']}), redis-server {info['redis-server']}, "
        f"torch {info['torch']}; memcpy {info['memcpy_gb_s']:.1f} GB/s, first touch "
        f"{info['first_touch_gb_s']:.2f} GB/s ({info['fault_us_per_page']:.2f} µs per 4 KiB fault); {setup}\n"
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / time.strftime(f"{script}-%Y%m%dT%H%M%S.json")
    out.write_text(json.dumps({"command": command, "machine": info, **record, "table": text}, indent=1))
    print(f"\nJSON: {out.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller state dicts, for a smoke run")
    parser.add_argument("--scenarios", default="large,small,model", help="comma-separated subset")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated; fs is always kept")
    parser.add_argument("--repeat", type=int, default=5, help="save/load/delete rounds per target")
    parser.add_argument("--fs-dir", default="/dev/shm", help="where FileSystemWriter writes")
    parser.add_argument("--redis-server", default="", help="redis-server binary (default: a jemalloc build)")
    parser.add_argument(
        "--server-args", default="", help='more redis-server arguments, e.g. "--io-threads 2"'
    )
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    targets = ["fs", *(t for t in args.targets.split(",") if t and t != "fs")]
    if set(scenarios) - {"large", "small", "model"} or set(targets) - set(TARGETS):
        parser.error(f"scenarios from large,small,model; targets from {','.join(TARGETS)}")
    speeds = probes.memory_speeds()
    from kvckpt.cli.local_server import find_redis_server

    info = {**machine(args.redis_server or find_redis_server()), **speeds}
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="kvckpt-longlived-", dir=args.fs_dir))
    results: dict[str, Any] = {}
    try:
        with open_targets(targets, scratch, args.redis_server, args.server_args.split()) as opened:
            for name in scenarios:
                scenario = SCENARIOS[name]
                kwargs = {**scenario.kwargs, **(scenario.quick_kwargs if args.quick else {})}
                results[name] = run_scenario(name, kwargs, opened, args.repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = report_rows(results)
    text = time_table(rows) + "\n\n" + resource_table(rows)
    publish(
        "longlived",
        argv,
        info,
        f"one process, medians [min-max] of {args.repeat}"
        + (f"; redis-server {args.server_args}" if args.server_args else ""),
        text,
        {"rows": rows, "results": results},
    )
    if not all(result["verified"] for result in results.values()):
        sys.exit("a load did not reproduce the saved state dict")


if __name__ == "__main__":
    main()
