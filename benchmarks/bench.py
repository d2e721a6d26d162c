"""kvckpt vs DCP's FileSystemWriter/Reader on /dev/shm, side by side in one run.

    python benchmarks/bench.py [--quick] [--scenarios large,small,model] [--targets tcp,cluster] [--repeat 3]

Starts its own redis-server, then for every scenario and target runs each phase (save, then load of
what was just saved) in a fresh Python process, so timings and peak RSS of one phase never include
another's. Each child builds the state dict (or the load target), warms DCP up on a tiny state dict,
resets the kernel's peak-RSS mark, and times one ``dcp.save`` / ``dcp.load``. The parent prints a
Markdown table (medians; ratios are kvckpt/FS from the same run) and writes JSON to
benchmarks/results/.

Two redis-servers run: ``tcp``/``unix`` is emptied with FLUSHALL before every phase pair, which also
purges jemalloc, so each save faults in fresh memory (a new server's first checkpoint); ``tcp-kept``/
``unix-kept`` runs with ``REDIS_KEEP_FREED_MEMORY_ENV`` (docs/operations-redis.md), is emptied with
UNLINK as ``kvckpt.delete``/``keep_last`` do, and has held a checkpoint of the scenario's size before
the first measured phase: the steady state of a server that keeps the last few checkpoints.
``cluster`` is a Redis Cluster of three primaries (no replicas) from the same redis-server binary,
emptied with FLUSHALL on each; ``--targets tcp,cluster`` runs only those (and ``fs``, for the ratios).

Adding a target is an entry in ``open_stores`` (a checkpoint_id factory, a cleaner, the server's
pid); adding a scenario is one ``Scenario`` in ``SCENARIOS``. The etcd scenario (64 MiB) runs one
etcd member with fsync and one with ``--unsafe-no-fsync``, so the table shows what durability costs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MIB = 1 << 20

# State dicts ------------------------------------------------------------------------------------
# Built from arange (fast, deterministic, every tensor distinct) rather than randn: payload bytes
# do not change what Redis, the socket or the page cache cost, and 1 GiB of randn takes seconds.


def _fill(shape: tuple[int, ...], dtype: Any, seed: float) -> Any:
    import torch

    count = 1
    for n in shape:
        count *= n
    values = torch.arange(count, dtype=torch.float32).mul_(1e-6).add_(seed)
    return values.to(dtype).reshape(shape)


def large_state(mib: int, tensor_mib: int = 16) -> dict[str, Any]:
    import torch

    per = tensor_mib * MIB // 4
    return {
        f"layer{i}.weight": _fill((per // 1024, 1024), torch.float32, i) for i in range(mib // tensor_mib)
    }


def small_state(count: int) -> dict[str, Any]:
    import torch

    return {f"opt.{i // 100}.{i % 100}": _fill((1024,), torch.float32, i) for i in range(count)}


def gpt2_shapes(
    layers: int, vocab: int, embd: int = 768, positions: int = 1024
) -> dict[str, tuple[int, ...]]:
    """GPT-2 parameter names and shapes (lm_head is tied to wte)."""
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, embd), "wpe.weight": (positions, embd)}
    for i in range(layers):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (embd,),
                p + "ln_1.bias": (embd,),
                p + "attn.c_attn.weight": (embd, 3 * embd),
                p + "attn.c_attn.bias": (3 * embd,),
                p + "attn.c_proj.weight": (embd, embd),
                p + "attn.c_proj.bias": (embd,),
                p + "ln_2.weight": (embd,),
                p + "ln_2.bias": (embd,),
                p + "mlp.c_fc.weight": (embd, 4 * embd),
                p + "mlp.c_fc.bias": (4 * embd,),
                p + "mlp.c_proj.weight": (4 * embd, embd),
                p + "mlp.c_proj.bias": (embd,),
            }
        )
    shapes.update({"ln_f.weight": (embd,), "ln_f.bias": (embd,)})
    return shapes


def model_state(layers: int, vocab: int) -> dict[str, Any]:
    """Mixed-precision training state: bf16 weights, fp32 AdamW moments, scalar steps, param groups."""
    import torch

    shapes = gpt2_shapes(layers, vocab)
    model = {name: _fill(shape, torch.bfloat16, i) for i, (name, shape) in enumerate(shapes.items())}
    state = {
        name: {
            "step": torch.tensor(1000.0),
            "exp_avg": _fill(shape, torch.float32, i + 0.25),
            "exp_avg_sq": _fill(shape, torch.float32, i + 0.5),
        }
        for i, (name, shape) in enumerate(shapes.items())
    }
    groups = [{"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(shapes)}]
    return {"model": model, "optim": {"state": state, "param_groups": groups}, "step": 1000}


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    build: Callable[..., dict[str, Any]]
    kwargs: dict[str, Any]
    targets: tuple[str, ...] = ("tcp", "unix", "tcp-kept", "unix-kept", "cluster", "fs")
    quick_kwargs: dict[str, Any] = field(default_factory=dict)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "large", "1 GiB of 16 MiB fp32 tensors", large_state, {"mib": 1024}, quick_kwargs={"mib": 256}
        ),
        Scenario("small", "10,000 fp32 tensors of 4 KiB", small_state, {"count": 10_000}),
        Scenario(
            "model",
            "GPT-2-small bf16 weights + fp32 AdamW state",
            model_state,
            {"layers": 12, "vocab": 50257},
            quick_kwargs={"layers": 2, "vocab": 8192},
        ),
        Scenario(
            "etcd",
            "64 MiB of 4 MiB fp32 tensors",
            large_state,
            {"mib": 64, "tensor_mib": 4},
            targets=("etcd", "etcd-nofsync", "fs"),
        ),
    )
}

PHASES = ("save", "load")
#: Peak RSS a phase may add over the state dict: 64 MiB + one 4 MiB chunk per connection (2).
RSS_BUDGET_MIB = 64 + 2 * 4

#: (save, load) minimum kvckpt/FS ratios from the performance issue.
TARGETS = {
    ("large", "unix"): (2.0, 1.0),
    ("large", "tcp"): (2.0, 0.75),
    ("small", "unix"): (1.5, 2.0),
    ("small", "tcp"): (1.5, 2.0),
}
TARGETS.update({(scenario, f"{target}-kept"): need for (scenario, target), need in TARGETS.items()})


# Child: one timed phase ---------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux ≥ 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tensor_bytes(state: Any) -> int:
    import torch

    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def _blank(state: Any) -> Any:
    """A load target: same structure, zeroed tensors (touched, as a live model's would be)."""
    import torch

    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: _blank(v) for k, v in state.items()}
    return state


def _same(expected: Any, actual: Any) -> bool:
    import torch

    if isinstance(expected, torch.Tensor):
        return torch.equal(expected, actual)
    if isinstance(expected, dict):
        return expected.keys() == actual.keys() and all(_same(expected[k], actual[k]) for k in expected)
    return bool(expected == actual)


def _storage(target: str, checkpoint_id: str, phase: str) -> Any:
    if target == "fs":
        from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

        return FileSystemWriter(checkpoint_id) if phase == "save" else FileSystemReader(checkpoint_id)
    import kvckpt

    if phase == "save":
        return kvckpt.KVStorageWriter(checkpoint_id, overwrite=True)
    return kvckpt.KVStorageReader(checkpoint_id)


def run_phase(job: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    scenario = SCENARIOS[job["scenario"]]
    state = scenario.build(**job["kwargs"])
    if job["phase"] == "load":
        state = _blank(state)
    # Warm up: DCP's lazy imports and first-call costs are paid once per process, not per checkpoint.
    warm_id = job["warmup_id"]
    warm = {"w": torch.ones(4)}
    dcp.save(warm, storage_writer=_storage(job["target"], warm_id, "save"))
    dcp.load(warm, storage_reader=_storage(job["target"], warm_id, "load"))

    storage = _storage(job["target"], job["checkpoint_id"], job["phase"])
    rss_before = _status_kib("VmRSS")
    _reset_peak_rss()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, started = os.times(), time.perf_counter()
    if job["phase"] == "save":
        dcp.save(state, storage_writer=storage)
    else:
        dcp.load(state, storage_reader=storage)
    seconds = time.perf_counter() - started
    cpu_s = sum(os.times()[:2]) - sum(cpu[:2])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = _status_kib("VmHWM")
    result = {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "page_faults": faults,
        "bytes": tensor_bytes(state),
        "rss_kib": rss_before,
        "peak_kib": peak,
    }
    if job["phase"] == "load" and job.get("verify"):
        result["verified"] = _same(scenario.build(**job["kwargs"]), state)
    return result


# Parent: servers, orchestration, report -------------------------------------------------------------


@dataclass
class Stores:
    """The running servers: target name → checkpoint_id factory, and how to empty everything."""

    ids: dict[str, Callable[[str], str]]
    cleaners: list[Callable[[], object]]
    server_pids: dict[str, list[int]]

    def clean(self) -> None:
        for clean in self.cleaners:
            clean()

    def server_usage(self, target: str) -> tuple[float, int]:
        """CPU seconds and minor page faults of the target's server so far (0 without a server)."""
        cpu, faults = 0.0, 0
        for pid in self.server_pids.get(target, []):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            cpu += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
            faults += int(fields[7])  # minflt
        return cpu, faults


@contextlib.contextmanager
def open_stores(scratch: Path, redis_binary: str = "") -> Iterator[Stores]:
    import redis

    from tests.harness.servers import REDIS_KEEP_FREED_MEMORY_ENV, EtcdServer, RedisCluster, RedisServer

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(RedisServer(binary=redis_binary))
        kept = stack.enter_context(RedisServer(binary=redis_binary, environment=REDIS_KEEP_FREED_MEMORY_ENV))
        etcd = stack.enter_context(EtcdServer())
        nofsync = stack.enter_context(EtcdServer(unsafe_no_fsync=True))
        cluster = stack.enter_context(RedisCluster(masters=3, replicas=0, binary=redis_binary))
        client = stack.enter_context(contextlib.closing(redis.Redis(port=server.port)))
        kept_client = stack.enter_context(contextlib.closing(redis.Redis(port=kept.port)))
        assert server.process is not None and kept.process is not None
        ids: dict[str, Callable[[str], str]] = {
            "tcp": server.url,
            "unix": server.unix_url,
            "tcp-kept": kept.url,
            "unix-kept": kept.unix_url,
            "cluster": cluster.url,
            "fs": lambda ns: str(scratch / ns),
        }
        cleaners: list[Callable[[], object]] = [
            client.flushall,  # synchronous FLUSHALL also purges jemalloc: the next save starts cold
            functools.partial(_unlink_all, kept_client),
            lambda: shutil.rmtree(scratch, True),
        ]
        for node in cluster.master_nodes():
            cleaners.append(functools.partial(_flush, node.port))
        pids = {"tcp": [server.process.pid], "unix": [server.process.pid]}
        pids |= {"tcp-kept": [kept.process.pid], "unix-kept": [kept.process.pid]}
        pids["cluster"] = [n.process.pid for n in cluster.master_nodes() if n.process is not None]
        for name, member in (("etcd", etcd), ("etcd-nofsync", nofsync)):
            assert member.process is not None
            ids[name], pids[name] = member.url, [member.process.pid]
            cleaners.append(functools.partial(_empty_etcd, member))
        yield Stores(ids, cleaners, pids)


def _unlink_all(client: Any) -> None:
    """Delete every key the way kvckpt.delete and keep_last do (UNLINK), which leaves jemalloc's pages
    mapped; then wait until background frees are done."""
    keys = list(client.scan_iter(count=1000))
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])
    while int(client.info("memory").get("lazyfree_pending_objects", 0)):
        time.sleep(0.01)


def _flush(port: int) -> None:
    from tests.harness.servers import redis_call

    redis_call(port, "FLUSHALL")


def _empty_etcd(member: Any) -> None:
    from kvckpt.registry import open_store

    with open_store(member.url("x")) as store:
        store.delete_prefix("")


def run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{job['scenario']}/{job['target']}/{job['phase']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    over = [(r["peak_kib"] - r["rss_kib"]) / 1024 for r in runs]
    median = statistics.median(seconds)
    return {
        "median_s": median,
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "page_faults": statistics.median(r["page_faults"] for r in runs),
        "server_cpu_s": statistics.median(r["server_cpu_s"] for r in runs),
        "server_page_faults": statistics.median(r["server_page_faults"] for r in runs),
        "gb_s": runs[0]["bytes"] / median / 1e9,
        "seconds": seconds,
        "peak_mib": max(r["peak_kib"] for r in runs) / 1024,
        "over_mib": max(over),
        "verified": all(r.get("verified", True) for r in runs),
    }


def _job(
    stores: Stores, scenario: str, kwargs: dict[str, Any], target: str, phase: str, ns: str, verify: bool
) -> dict[str, Any]:
    """What a child process runs: one phase of one scenario against one target."""
    return {
        "scenario": scenario,
        "kwargs": kwargs,
        "target": target,
        "phase": phase,
        "checkpoint_id": stores.ids[target](ns),
        "warmup_id": stores.ids[target](f"{ns}-warmup-{phase}"),
        "verify": verify,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Repetitions outermost, targets interleaved: a burst of load elsewhere hits every target alike."""
    scratch = Path(tempfile.mkdtemp(prefix="kvckpt-bench-", dir=args.fs_dir))
    report: dict[str, Any] = {}
    try:
        with open_stores(scratch / "ckpt", args.redis_server) as stores:
            for name in args.scenarios:
                scenario = SCENARIOS[name]
                if args.targets:
                    wanted = [t for t in scenario.targets if t in args.targets or t == "fs"]
                    scenario = replace(scenario, targets=tuple(wanted))
                kwargs = {**scenario.kwargs, **(scenario.quick_kwargs if args.quick else {})}
                runs: dict[tuple[str, str], list[dict[str, Any]]] = {
                    (target, phase): [] for target in scenario.targets for phase in PHASES
                }
                job = functools.partial(_job, stores, name, kwargs)
                kept = [t for t in scenario.targets if t.endswith("-kept")]
                if kept:  # the steady state: a checkpoint of this size was saved and deleted before
                    run_child(job(kept[0], "save", f"bench/{name}/prime", False), args.timeout)
                for rep in range(args.repeat):
                    for target in scenario.targets:
                        stores.clean()
                        ns = f"bench/{name}/{uuid.uuid4().hex[:8]}"
                        for phase in PHASES:
                            cpu, faults = stores.server_usage(target)
                            result = run_child(job(target, phase, ns, rep == 0), args.timeout)
                            cpu_after, faults_after = stores.server_usage(target)
                            result["server_cpu_s"] = cpu_after - cpu
                            result["server_page_faults"] = faults_after - faults
                            runs[(target, phase)].append(result)
                            print(
                                f"  {name:6} {target:5} {phase:4} rep {rep}: {result['seconds']:.3f} s",
                                file=sys.stderr,
                                flush=True,
                            )
                for target in scenario.targets:
                    report[f"{name}/{target}"] = {
                        "scenario": name,
                        "what": scenario.what,
                        "kwargs": kwargs,
                        "target": target,
                        "bytes": runs[(target, "save")][0]["bytes"],
                        **{phase: summarise(runs[(target, phase)]) for phase in PHASES},
                        "runs": {phase: runs[(target, phase)] for phase in PHASES},
                    }
            stores.clean()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per scenario and target, ratios against the same scenario's FS row."""
    lines = [
        "| scenario | target | data | save GB/s | load GB/s | save vs FS | load vs FS "
        "| save RSS +MiB | load RSS +MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.values():
        fs = report.get(f"{row['scenario']}/fs")
        kv = row["target"] != "fs"
        cells = []
        for phase in PHASES:
            ratio = fs[phase]["median_s"] / row[phase]["median_s"] if fs and kv else None
            need = TARGETS.get((row["scenario"], row["target"]), (None, None))[phase == "load"]
            text = "—" if ratio is None else f"{ratio:.2f}x"
            if need is not None and ratio is not None:
                text += f" ({'✓' if ratio >= need else '✗'} ≥{need:g})"
            cells.append(text)
        for phase in PHASES:
            over = row[phase]["over_mib"]
            cells.append(f"{over:.0f}" + ((" ✓" if over <= RSS_BUDGET_MIB else " ✗") if kv else ""))
        lines.append(
            f"| {row['scenario']} | {row['target']} | {row['bytes'] / MIB:,.0f} MiB "
            f"| {row['save']['gb_s']:.2f} | {row['load']['gb_s']:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def cpu_table(report: dict[str, Any]) -> str:
    """Where the time went: wall seconds; CPU seconds and minor page faults (first touches of memory)
    of the checkpointing process and of the server."""
    lines = [
        "| scenario | target | save s | save CPU s: client / server (faults) "
        "| load s | load CPU s: client / server (faults) |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.values():
        cells = [
            f"{row[p]['median_s']:.3f} | {row[p]['cpu_s']:.2f} ({row[p]['page_faults'] / 1000:,.0f}k) / "
            f"{row[p]['server_cpu_s']:.2f} ({row[p]['server_page_faults'] / 1000:,.0f}k)"
            for p in PHASES
        ]
        lines.append(f"| {row['scenario']} | {row['target']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(redis_binary: str) -> dict[str, Any]:
    import redis
    import torch

    from kvckpt.cli.local_server import find_binary

    binary = redis_binary or find_binary("redis-server")
    server = subprocess.run([binary, "--version"], capture_output=True, text=True)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redis-py": redis.__version__,
        "redis-server": " ".join(w for w in server.stdout.split() if w.startswith(("v=", "malloc="))),
    }


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))  # this checkout's kvckpt (the children get it through PYTHONPATH)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller state dicts, for a smoke run")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument(
        "--targets", default="", help="comma-separated subset of targets (fs is always kept, for the ratios)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per phase (median reported)")
    parser.add_argument("--fs-dir", default="/dev/shm", help="where FileSystemWriter writes")
    parser.add_argument("--redis-server", default="", help="redis-server binary (default: from PATH)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per phase")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_phase(json.loads(args.child))))
        return
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {sorted(SCENARIOS)}")
    info = machine(args.redis_server)
    started = time.time()
    report = measure(args)
    text = table(report) + "\n\n" + cpu_table(report)
    command = "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"\n{command.strip()}\n{info['cores']} cores ({info['cpu']}), redis-server {info['redis-server']}, "
        f"torch {info['torch']}; medians of {args.repeat}\n"
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / time.strftime("bench-%Y%m%dT%H%M%S.json")
    out.write_text(
        json.dumps(
            {
                "command": command.strip(),
                "machine": info,
                "started": started,
                "results": report,
                "table": text,
            },
            indent=1,
        )
    )
    print(f"\nJSON: {out.relative_to(ROOT)}")
    if not all(row[p]["verified"] for row in report.values() for p in ("save", "load")):
        sys.exit("a load did not reproduce the saved state dict")


if __name__ == "__main__":
    main()
