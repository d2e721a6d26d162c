"""EtcdStore throughput on 1 MiB values: ``python -m benchmarks.etcd_bench``.

Starts its own etcd (with and without ``--unsafe-no-fsync``) unless given ``--url``; prints MB/s for
``put_many`` and ``get_many`` over ``--total-mib`` of values. The project's main benchmark can call
``measure`` with any store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from typing import Any

from kvckpt.registry import open_store
from kvckpt.store import KVStore
from tests.harness.servers import EtcdServer

MiB = 1 << 20


def measure(
    store: KVStore, value_bytes: int = MiB, total_bytes: int = 64 * MiB, batch: int = 8
) -> dict[str, float]:
    """Write then read ``total_bytes`` as ``value_bytes`` values, ``batch`` keys per call; MB/s each."""
    count = max(1, total_bytes // value_bytes)
    prefix = f"bench/{uuid.uuid4().hex[:8]}/"
    keys = [f"{prefix}{i}" for i in range(count)]
    values = [os.urandom(value_bytes) for _ in range(min(count, 8))]  # reused: memory stays small
    started = time.perf_counter()
    for i in range(0, count, batch):
        store.put_many([(keys[j], values[j % len(values)]) for j in range(i, min(i + batch, count))])
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, count, batch):
        got = store.get_many(keys[i : i + batch])
        assert all(v is not None and len(v) == value_bytes for v in got)
    get_s = time.perf_counter() - started
    store.delete_prefix(prefix)
    moved = count * value_bytes / 1e6
    return {"put_mb_s": moved / put_s, "get_mb_s": moved / get_s, "values": count, "value_bytes": value_bytes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an etcd:// URL to measure instead of local servers")
    parser.add_argument("--value-kib", type=int, default=1024)
    parser.add_argument("--total-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    runs: list[tuple[str, Any]] = []
    if args.url:
        runs.append((args.url, None))
    else:
        runs += [("etcd, fsync (default)", False), ("etcd --unsafe-no-fsync", True)]
    for label, no_fsync in runs:
        server = EtcdServer(unsafe_no_fsync=no_fsync).start() if no_fsync is not None else None
        try:
            store = open_store(server.url() if server else label)
            results = [
                measure(store, args.value_kib * 1024, args.total_mib * MiB) for _ in range(args.repeat)
            ]
            store.close()
            line = [f"{label}:"]
            for what in ("put", "get"):
                rates = sorted(r[f"{what}_mb_s"] for r in results)
                line.append(
                    f"{what} {statistics.median(rates):.0f} MB/s (median of {len(rates)}, "
                    f"{rates[0]:.0f}-{rates[-1]:.0f})"
                )
            print(" ".join(line), flush=True)
        finally:
            if server is not None:
                server.cleanup()


if __name__ == "__main__":
    main()
