"""RedisStore's bulk path alone (no DCP): where the time of a large save goes.

    python benchmarks/store_bench.py [--mib 1024] [--chunk-mib 4] [--threads 2] [--redis-server PATH]

Writes ``--mib`` of one tensor in chunks over ``--threads`` connections, reads it back into a second
tensor, and repeats twice: into fresh server memory (FLUSHALL first: a server's first checkpoint, or
any checkpoint on a server whose allocator returned freed pages) and over the same keys (the server
overwrites values in memory it already holds, as a server keeping freed pages does; see
docs/operations-redis.md). Reports GiB/s with
the CPU seconds and minor page faults of this process and of redis-server per pass.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import redis
import torch

if TYPE_CHECKING:
    from kvckpt.store import KVStore

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def usage(pid: int | None = None) -> tuple[float, int]:
    """CPU seconds and minor faults of this process (threads included) or of ``pid``."""
    if pid is None:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime, own.ru_minflt
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def timed(what: str, mib: int, server_pid: int, run: Callable[[], None]) -> None:
    client, server = usage(), usage(server_pid)
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    c_cpu, c_faults = (a - b for a, b in zip(usage(), client, strict=True))
    s_cpu, s_faults = (a - b for a, b in zip(usage(server_pid), server, strict=True))
    print(
        f"{what:26} {mib / 1024 / seconds:5.2f} GiB/s   client {c_cpu:.2f} s CPU "
        f"{c_faults / 1000:4.0f}k faults   redis-server {s_cpu:.2f} s CPU {s_faults / 1000:4.0f}k faults"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-mib", type=int, default=16)
    parser.add_argument("--redis-server", default="", help="redis-server binary (default: from PATH)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # this checkout's kvckpt, whatever is installed
    from kvckpt.cli.local_server import RedisServer
    from kvckpt.dcp.tensor_bytes import byte_view
    from kvckpt.registry import open_store
    from kvckpt.store import RangeRead
    from kvckpt.transfer import Transfer

    chunk, per_batch = args.chunk_mib * MIB, max(1, args.batch_mib // args.chunk_mib)
    source = torch.arange(args.mib * MIB // 4, dtype=torch.float32)
    target = torch.zeros_like(source)
    src, dst = byte_view(source), byte_view(target, writable=True)
    keys = [f"bench/{i}" for i in range(args.mib // args.chunk_mib)]
    batches = [range(i, min(i + per_batch, len(keys))) for i in range(0, len(keys), per_batch)]
    with RedisServer(binary=args.redis_server) as server:
        assert server.process is not None
        pid, raw = server.process.pid, redis.Redis(port=server.port)
        for transport, url in (("unix", server.unix_url("bench")), ("tcp", server.url("bench"))):
            store = open_store(url)

            def put(store: KVStore = store) -> None:
                with Transfer(args.threads) as transfer:
                    for b in batches:
                        transfer.submit(
                            store.put_many, [(keys[j], src[j * chunk : (j + 1) * chunk]) for j in b]
                        )

            def get(store: KVStore = store) -> None:
                with Transfer(args.threads) as transfer:
                    for b in batches:
                        reads = [RangeRead(keys[j], 0, dst[j * chunk : (j + 1) * chunk]) for j in b]
                        transfer.submit(store.read_into_many, reads)

            for _ in range(2):
                raw.flushall()
                timed(f"{transport} put, fresh memory", args.mib, pid, put)
                timed(f"{transport} put, same keys", args.mib, pid, put)
                target.zero_()
                timed(f"{transport} read_into", args.mib, pid, get)
                assert torch.equal(source, target), "read back differs"
            store.close()


if __name__ == "__main__":
    main()
