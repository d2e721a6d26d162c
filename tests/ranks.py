"""Run a scenario on real ranks: spawned processes joined in one gloo process group.

One spawn per scenario (starting processes and importing torch is most of the cost), so a scenario
function runs several checks. A rank that raises fails the test with its traceback; the others are
then terminated by torch.multiprocessing.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.harness.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _entry(rank: int, scenario: Callable[..., None], world_size: int, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # 2-core machines: ranks times intra-op threads would thrash
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        scenario(rank, world_size, *args)
        gc.collect()  # free FSDP2/DTensor cycles holding gloo work before the group goes (see examples/)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(scenario: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call ``scenario(rank, world_size, *args)`` on ``world_size`` fresh processes.

    ``scenario`` must be a module-level function (spawned children import it). Children run this
    checkout's kvckpt, whatever is pip-installed: they get its root on PYTHONPATH.
    """
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": path}
    with _environment(**env):
        mp.start_processes(  # type: ignore[no-untyped-call]
            _entry, args=(scenario, world_size, args), nprocs=world_size, start_method="spawn"
        )
