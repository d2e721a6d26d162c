"""The training stall: what ``dcp.async_save`` costs a training loop, FileSystemWriter vs kvckpt.

    python benchmarks/stall.py [--quick] [--steps 60] [--every 10] [--executors thread,process]
                               [--targets fs,tcp,tcp-kept] [--repeat 3] [--redis-server PATH]

What a user feels of an asynchronous checkpoint is the time training is blocked, not the save's
duration. This trains a small MLP on the CPU (fp32 weights + AdamW moments, about 75 MiB of state at
the default width) and every ``--every`` steps calls ``dcp.async_save`` on the state dict
``get_state_dict`` gives, with

- ``thread``: DCP's thread executor; a ``DefaultStager`` (no pinning, no shared memory, synchronous)
  copies the state dict inside ``async_save``, the writer runs in a thread of the training process;
- ``process``: ``AsyncCheckpointerType.PROCESS``, DCP's checkpoint daemon (spawned once, on a
  one-rank gloo group this script starts) and a ``DefaultStager`` staging into shared memory, so the
  daemon gets the staged tensors without a copy through the pipe.

One stager per executor lives through the run, as in a training job: its staged buffers are reused
from one save to the next. Before a save, the previous one is waited for (as torchtitan does).

Per save: **blocked** is how long ``async_save`` took to return, **commit** how long until its future
was done (the checkpoint committed), **wait** how long the next save waited for it. Per run:
training steps/s with checkpointing, against runs of as many steps without (``none``) interleaved with
them, and the CPU seconds the training process (all its threads; not the process executor's daemon)
and redis-server spent. One warm-up save per executor and target, untimed, pays the daemon's start
and the stager's first allocation. Rows give medians [min-max] over all saves, or over ``--repeat``
runs for steps/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from benchmarks import probes
from benchmarks.bench import machine
from benchmarks.longlived import TARGETS, Target, _delete, _writer, open_targets, publish

EXECUTORS = ("thread", "process")


class Trainer:
    """An MLP regressing random targets with AdamW: enough CPU work per step to feel a save."""

    def __init__(self, width: int, layers: int, batch: int) -> None:
        import torch

        torch.manual_seed(0)
        blocks: list[torch.nn.Module] = []
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.model = torch.nn.Sequential(*blocks)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x, self.y = torch.randn(batch, width), torch.randn(batch, width)

    def step(self) -> None:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(torch.nn.functional.mse_loss(self.model(self.x), self.y))
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optimizer}


def start_group() -> None:
    """A one-rank gloo group: the process executor needs one to start its daemon's own group."""
    import torch.distributed as dist

    from kvckpt.cli.local_server import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


def make_stager(executor: str) -> Any:
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    shared = executor == "process"
    return DefaultStager(StagingOptions(False, shared, False, False))


def async_save(
    trainer: Trainer, target: Target, executor: str, stager: Any, tag: str
) -> tuple[Any, str, float]:
    """Start one save; returns (the future that completes at commit, the checkpoint id, blocked s)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

    kind = AsyncCheckpointerType.PROCESS if executor == "process" else AsyncCheckpointerType.THREAD
    checkpoint_id = target.checkpoint_id(f"stall/{tag}/{uuid.uuid4().hex[:8]}")
    state = trainer.state_dict()
    started = time.perf_counter()
    future = dcp.async_save(
        state,
        storage_writer=_writer(target, checkpoint_id),
        async_checkpointer_type=kind,
        async_stager=stager,
    )
    blocked = time.perf_counter() - started
    upload = future.upload_completion if isinstance(future, AsyncSaveResponse) else future
    return upload, checkpoint_id, blocked


def train(
    trainer: Trainer, steps: int, every: int, target: Target | None, executor: str, stager: Any
) -> dict[str, Any]:
    """``steps`` training steps, an async save every ``every`` of them when ``target`` is given."""
    saves: list[dict[str, Any]] = []
    done: list[threading.Event] = []
    saved: list[str] = []
    pending: Any = None
    pids = target.server_pids if target else []
    client, server = probes.usage(), probes.usage(pids)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.step()
        if target is None or step % every:
            continue
        waited = time.perf_counter()
        if pending is not None:
            pending.result()
        waited = time.perf_counter() - waited
        future, checkpoint_id, blocked = async_save(trainer, target, executor, stager, executor)
        record: dict[str, Any] = {"step": step, "blocked_s": blocked, "wait_s": waited}
        finished = threading.Event()
        begun = time.perf_counter() - blocked

        def committed(
            _: Any, record: dict[str, Any] = record, begun: float = begun, event: Any = finished
        ) -> None:
            record["commit_s"] = time.perf_counter() - begun
            event.set()

        future.add_done_callback(committed)
        saves.append(record)
        done.append(finished)
        saved.append(checkpoint_id)
        pending = future
    seconds = time.perf_counter() - started
    tail = time.perf_counter()
    if pending is not None:
        pending.result()
    tail = time.perf_counter() - tail
    for event in done:  # a future's callbacks run just after result() wakes its waiters
        event.wait(60)
    client_used, server_used = probes.usage() - client, probes.usage(pids) - server
    if target is not None:  # untimed: the next run starts from the same state
        for checkpoint_id in saved:
            _delete(target, checkpoint_id)
        target.after_delete()
    return {
        "steps_per_s": steps / seconds,
        "seconds": seconds,
        "tail_wait_s": tail,
        "saves": saves,
        "client": vars(client_used),
        "server": vars(server_used),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    trainer = Trainer(args.width, args.layers, args.batch)
    for _ in range(3):  # AdamW's moments exist after the first step
        trainer.step()
    state_bytes = sum(t.numel() * t.element_size() for t in _tensors(trainer.state_dict()))
    start_group()
    scratch = Path(tempfile.mkdtemp(prefix="kvckpt-stall-", dir=args.fs_dir))
    results: dict[str, Any] = {"state_bytes": state_bytes, "runs": {}}
    try:
        with open_targets(args.targets, scratch, args.redis_server) as targets:
            stagers = {executor: make_stager(executor) for executor in args.executors}
            for executor in args.executors:
                for warmed in targets.values():
                    future, checkpoint_id, _ = async_save(
                        trainer, warmed, executor, stagers[executor], "warm"
                    )
                    future.result()
                    _delete(warmed, checkpoint_id)
                    warmed.after_delete()
            configs: list[tuple[str, Target | None]] = [("none", None)] + [
                (e, t) for e in args.executors for t in targets.values()
            ]
            for rep in range(args.repeat):
                for executor, target in configs:
                    name = executor if target is None else f"{executor}/{target.name}"
                    stager = stagers.get(executor)
                    outcome = train(trainer, args.steps, args.every, target, executor, stager)
                    results["runs"].setdefault(name, []).append(outcome)
                    print(f"  {name:16} rep {rep}: {outcome['steps_per_s']:.2f} steps/s", file=sys.stderr)
            for stager in stagers.values():
                stager.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _tensors(state: Any) -> list[Any]:
    import torch

    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    baseline = probes.spread([r["steps_per_s"] for r in runs["none"]]).median
    lines = [
        "| executor | target | blocked ms per save | commit ms per save | wait ms per save | steps/s "
        "| vs no ckpt | trainer CPU s / server CPU s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, outcomes in runs.items():
        executor, _, target = name.partition("/")
        rate = probes.spread([r["steps_per_s"] for r in outcomes])
        saves = [s for r in outcomes for s in r["saves"]]
        cells = []
        for key in ("blocked_s", "commit_s", "wait_s"):
            values = [s[key] * 1000 for s in saves if key in s]
            cells.append(probes.spread(values).text(1) if values else "—")
        cpu = probes.spread([r["client"]["cpu_s"] for r in outcomes]).median
        server_cpu = probes.spread([r["server"]["cpu_s"] for r in outcomes]).median
        lines.append(
            f"| {executor} | {target or '—'} | " + " | ".join(cells) + f" | {rate.text(2)} "
            f"| {rate.median / baseline:.2f}x | {cpu:.2f} / {server_cpu:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--every", type=int, default=10, help="steps between saves")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (75 MiB of state at 1024 x 6)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    parser.add_argument("--executors", default=",".join(EXECUTORS), help="comma-separated subset")
    parser.add_argument(
        "--targets", default="fs,tcp,tcp-kept", help=f"comma-separated, from {','.join(TARGETS)}"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration, interleaved")
    parser.add_argument("--fs-dir", default="/dev/shm", help="where FileSystemWriter writes")
    parser.add_argument("--redis-server", default="", help="redis-server binary (default: a jemalloc build)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.repeat = min(args.steps, 30), min(args.every, 10), min(args.repeat, 1)
    args.executors = [e for e in args.executors.split(",") if e]
    args.targets = ["fs", *(t for t in args.targets.split(",") if t and t != "fs")]
    if set(args.executors) - set(EXECUTORS) or set(args.targets) - set(TARGETS):
        parser.error(f"executors from {','.join(EXECUTORS)}; targets from {','.join(TARGETS)}")
    import warnings

    from kvckpt.cli.local_server import find_redis_server

    warnings.filterwarnings("ignore")
    info = {**machine(args.redis_server or find_redis_server()), **probes.memory_speeds()}
    results = run(args)
    setup = (
        f"state {results['state_bytes'] / probes.MIB:,.0f} MiB, {args.steps} steps per run, a save every "
        f"{args.every}, {args.threads} torch thread(s), medians [min-max]"
    )
    publish("stall", argv, info, setup, table(results), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
