"""What a save costs on a Redis that also holds other data: small saves, with 0 to N unrelated keys.

    python benchmarks/shared_store_bench.py [--keys 0,1000000,5000000] [--repeat 5]

Starts its own redis-server, fills it with ``DEBUG POPULATE`` (unrelated keys ``other:N``), and times
``kvckpt.save`` of a 4 KB state dict (overwriting one id, as a periodic checkpoint does) against
DCP's FileSystemWriter on /dev/shm in the same run. Anything a save does per key of the whole store
(a SCAN) shows up as time growing with the unrelated keys; medians of ``--repeat``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", default="0,1000000,5000000", help="unrelated keys, comma-separated totals")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fs-dir", default="/dev/shm")
    parser.add_argument("--redis-server", default="", help="redis-server binary (default: from PATH)")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed.checkpoint as dcp

    import kvckpt
    from tests.harness.servers import RedisServer, redis_call

    warnings.simplefilter("ignore")
    state = {"w": torch.ones(1024)}
    scratch = Path(tempfile.mkdtemp(prefix="kvckpt-shared-", dir=args.fs_dir))

    def median(save: object) -> float:
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            save()  # type: ignore[operator]
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    rows = []
    try:
        with RedisServer(binary=args.redis_server) as server:
            url = server.url("bench/run/step")
            for total in (int(n) for n in args.keys.split(",")):
                redis_call(server.port, "DEBUG", "POPULATE", total, "other")
                kv = median(lambda: kvckpt.save(state, url, overwrite=True))
                fs = median(lambda: dcp.save(state, checkpoint_id=str(scratch / "step"), no_dist=True))
                rows.append((int(redis_call(server.port, "DBSIZE")), kv, fs))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    command = "python benchmarks/shared_store_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(f"\n{command.strip()}; medians of {args.repeat}\n")
    print("| keys in the store | kvckpt.save (s) | FileSystemWriter (s) |\n|---:|---:|---:|")
    for keys, kv, fs in rows:
        print(f"| {keys:,} | {kv:.4f} | {fs:.4f} |")


if __name__ == "__main__":
    main()
