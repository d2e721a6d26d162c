"""A save that stops half-way, as its own process: ``python -m tests.stalled_save URL TTL GO [overwrite]``.

It writes every value but the last, prints ``stalled`` and waits until the file GO exists (forever
when it never does: the test then kills it with SIGKILL, as a crashed job), then commits.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

import kvckpt

#: Eight values of 256 KiB, one chunk each, each chunk its own batch: they reach the store at once.
STATE = {f"t{n}": torch.full((64, 1024), float(n)) for n in range(8)}
STATE["zz_last"] = torch.ones(4)


class StallingPlanner(DefaultSavePlanner):
    def __init__(self, go: str) -> None:
        super().__init__()
        self.go = go

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.index.fqn == "zz_last":
            print("stalled", flush=True)
            while not os.path.exists(self.go):
                time.sleep(0.05)
        return super().resolve_data(write_item)


def main(url: str, live_ttl: float, go: str, overwrite: bool) -> None:
    options: dict[str, Any] = {"chunk_bytes": 256 << 10, "batch_bytes": 1, "live_ttl": live_ttl}
    options["overwrite"] = overwrite
    kvckpt.save(dict(STATE), url, planner=StallingPlanner(go), step=7, **options)
    print("committed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["overwrite"])
