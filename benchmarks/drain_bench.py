"""The drainer's costs: the trainer's save time beside it, its throughput, its memory.

    python benchmarks/drain_bench.py [--quick] [--scenarios large,model] [--repeat 3]

Starts its own redis-server and moto S3 server (loopback), then per scenario:

- ``save``: the trainer (this process) saves the state dict ``repeat`` times with no drainer and
  ``repeat`` times while ``kvckpt drain --every 1`` copies every checkpoint to a folder, in
  alternating blocks (off, on, off, on, …), so both conditions see the same machine drift; the
  medians and their ratio (target ≤ 1.05x) are reported;
- ``copy``: one checkpoint copied store→folder by ``kvckpt cp`` and by ``kvckpt drain --once``,
  and drained to S3 (moto), each in a fresh process through tests/peak_rss.py (wall time of the
  command and the rise of its peak RSS above its post-import baseline); the drain/cp throughput
  ratio has a target of ≥ 0.8x, the drainer's peak RSS one of ≤ 128 MiB above baseline (1 GiB).

Folders go to ``--dir`` (default /dev/shm, as benchmarks/bench.py). Prints Markdown tables and
writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import MIB, SCENARIOS, machine, tensor_bytes  # noqa: E402

DRAIN_SCENARIOS = ("large", "model")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **(extra or {}), "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


def measured(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``kvckpt ARGS`` in a fresh process: its wall time and peak RSS above baseline."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "peak_rss.py"), *args],
        capture_output=True,
        text=True,
        env=_env(env),
        timeout=1800,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"kvckpt {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise RuntimeError(f"kvckpt {' '.join(args)} exited {report['rc']}:\n{done.stderr[-3000:]}")
    return report


def save_times(
    state: dict[str, Any], url: str, scratch: Path, repeat: int, drain_args: list[str]
) -> dict[str, list[float]]:
    import kvckpt

    times: dict[str, list[float]] = {"off": [], "on": []}
    step = 0
    for _ in range(repeat):
        for condition in ("off", "on"):
            prefix = f"{url}/{condition}-{uuid.uuid4().hex[:6]}"
            drainer = None
            if condition == "on":
                dest = scratch / f"durable-{uuid.uuid4().hex[:6]}"
                command = [sys.executable, "-m", "kvckpt", "drain", "--poll", "0.1", *drain_args]
                command += [prefix, str(dest)]
                drainer = subprocess.Popen(command, env=_env(), stderr=subprocess.DEVNULL)
                time.sleep(3)  # let it import torch and start polling before the first save
            try:
                for _ in range(2):  # the first save is drained while the second is timed
                    step += 1
                    started = time.perf_counter()
                    kvckpt.save(state, f"{prefix}/step{step}", no_dist=True)
                    seconds = time.perf_counter() - started
                    time.sleep(0.3)  # the drainer sees the checkpoint and starts copying
                times[condition].append(seconds)
            finally:
                if drainer is not None:
                    drainer.terminate()
                    drainer.wait()
                    shutil.rmtree(dest, ignore_errors=True)
                kvckpt.keep_last(prefix, 0)
    return times


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import s3fs

    import kvckpt
    from tests.harness.servers import RedisServer
    from tests.s3_server import MotoServer

    report: dict[str, Any] = {}
    scratch = Path(tempfile.mkdtemp(prefix="kvckpt-drain-bench-", dir=args.dir))
    try:
        with RedisServer() as server, MotoServer() as moto:
            bucket = moto.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
            s3 = s3fs.S3FileSystem(**moto.storage_options())
            for name in args.scenarios:
                scenario = SCENARIOS[name]
                state = scenario.build(**(scenario.quick_kwargs if args.quick else scenario.kwargs))
                nbytes = tensor_bytes(state)
                print(f"{name}: {nbytes / MIB:,.0f} MiB", flush=True)
                drain_args = args.drain_args.split()
                times = save_times(state, server.url(f"save-{name}"), scratch, args.repeat, drain_args)
                source = server.url(f"copy-{name}")
                report[name] = {"bytes": nbytes, "save": times, "drain_args": args.drain_args}
                if args.save_only:
                    continue
                kvckpt.save(state, f"{source}/step1", no_dist=True)
                del state
                rows: dict[str, list[dict[str, Any]]] = {"cp": [], "drain": [], "drain-s3": []}
                for n in range(args.repeat):
                    folder = scratch / f"cp{n}"
                    rows["cp"].append(measured(["cp", f"{source}/step1", str(folder)]))
                    shutil.rmtree(folder)
                    folder = scratch / f"drain{n}"
                    rows["drain"].append(measured(["drain", "--once", source, str(folder)]))
                    shutil.rmtree(folder)
                    rows["drain-s3"].append(
                        measured(["drain", "--once", source, f"{bucket}/{name}{n}"], moto.environment())
                    )
                    s3.rm(f"{bucket}/{name}{n}", recursive=True)  # moto keeps objects in memory
                kvckpt.keep_last(source, 0)
                report[name]["copy"] = rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def tables(report: dict[str, Any]) -> str:
    med = statistics.median
    out = [
        "| scenario | size | drainer options | save, no drainer (s) | save, drainer copying (s) | "
        "ratio (target ≤ 1.05) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, row in report.items():
        off, on = med(row["save"]["off"]), med(row["save"]["on"])
        options = row["drain_args"] or "(defaults)"
        out.append(
            f"| {name} | {row['bytes'] / MIB:,.0f} MiB | {options} | {off:.2f} | {on:.2f} | {on / off:.2f}x |"
        )
    out += [
        "",
        "| scenario | cp → folder | drain → folder | drain/cp (target ≥ 0.8) | drain → S3 (moto) | "
        "drainer peak RSS above baseline (target ≤ 128 MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in report.items():
        if "copy" not in row:
            continue
        rate = {k: row["bytes"] / MIB / med(r["seconds"] for r in runs) for k, runs in row["copy"].items()}
        peak = max(r["peak_mib"] for k in ("drain", "drain-s3") for r in row["copy"][k])
        out.append(
            f"| {name} | {rate['cp']:,.0f} MiB/s | {rate['drain']:,.0f} MiB/s | "
            f"{rate['drain'] / rate['cp']:.2f}x | {rate['drain-s3']:,.0f} MiB/s | {peak:.0f} MiB |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller state dicts, for a smoke run")
    parser.add_argument("--scenarios", default=",".join(DRAIN_SCENARIOS), help="comma-separated subset")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians reported)")
    parser.add_argument("--dir", default="/dev/shm", help="where the folders are written")
    parser.add_argument("--drain-args", default="", help="options for the drainer beside the saves")
    parser.add_argument("--save-only", action="store_true", help="only the save-time comparison")
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(DRAIN_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {list(DRAIN_SCENARIOS)}")
    info = machine("")
    report = measure(args)
    command = "python benchmarks/drain_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = tables(report)
    print(f"\n{command.strip()}\n{info['cores']} cores ({info['cpu']}), torch {info['torch']}; ")
    print(f"medians of {args.repeat}\n\n{text}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / time.strftime("drain-%Y%m%dT%H%M%S.json")
    out.write_text(json.dumps({"command": command.strip(), "machine": info, "results": report}, indent=1))
    print(f"\nJSON: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
