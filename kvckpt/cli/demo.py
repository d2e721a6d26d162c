"""``kvckpt demo``: the main job in miniature, on a private redis-server unless given a store.

Trains a small MLP with AdamW, saves model + optimizer every few steps (one namespace per step,
``keep_last`` pruning the old ones), "crashes" (drops everything in memory), restarts from
``kvckpt.latest()`` and checks the resumed losses against a run that never crashed, bit for bit.
"""

from __future__ import annotations

import secrets
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kvckpt import humanize
from kvckpt.cli.local_server import RedisServer, find_redis_server
from kvckpt.dcp.api import load, save
from kvckpt.management import api as manage
from kvckpt.registry import parse_url

WIDTH, BATCH = 1024, 32


class Job:
    """Model, optimizer and data: step ``n``'s batch depends only on ``n``, so a resumed run sees
    exactly the data the uninterrupted one did."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(256, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(),
            torch.nn.Linear(WIDTH, 256),
        )  # fmt: skip
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.step = 0

    def train_step(self) -> float:
        self.step += 1
        data = torch.Generator().manual_seed(self.step)
        x = torch.randn(BATCH, 256, generator=data)
        target = torch.sin(x) + 0.1 * torch.randn(BATCH, 256, generator=data)
        loss = torch.nn.functional.mse_loss(self.model(x), target)
        self.optim.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optim.step()
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        model, optim = get_state_dict(self.model, self.optim)  # also creates AdamW's state to load into
        return {"model": model, "optim": optim, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self.step = state["step"]


def run_demo(
    url: str | None = None, steps: int = 16, every: int = 4, keep: int = 2, say: Callable[[str], None] = print
) -> bool:
    """Print the demo's story; True when the resumed losses equal the uninterrupted run's."""
    crash_at = steps - max(1, every // 2)  # a few steps after the last checkpoint before it
    server = None
    if url is None:
        server = RedisServer(binary=find_redis_server()).start()
        prefix = server.unix_url("demo/run1")
        say(f"store     private redis-server ({server.binary}), unix socket {server.socket_path}")
    else:
        prefix = _child(url, f"kvckpt-demo-{secrets.token_hex(3)}")
        say(f"store     {parse_url(prefix)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads, which spin on a busy machine
    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            return _story(prefix, steps, every, keep, crash_at, say)
    finally:
        torch.set_num_threads(threads)
        if server is not None:
            server.cleanup()
            say("private redis-server stopped and its folder removed")
        else:
            say(f"left in the store: kvckpt ls {parse_url(prefix)}   (kvckpt keep-last ... 0 removes them)")


def _story(prefix: str, steps: int, every: int, keep: int, crash_at: int, say: Callable[[str], None]) -> bool:
    job = Job(seed=0)
    params = sum(p.numel() for p in job.model.parameters())
    say(f"job       MLP with {params / 1e6:.1f} M parameters, AdamW")
    say(f"plan      {steps} steps, checkpoint every {every} (keep_last {keep}), crash after step {crash_at}")
    say("")
    saves: list[float] = []
    while job.step < crash_at:
        loss = job.train_step()
        line = f"step {job.step:3d}  loss {loss:.6f}"
        if job.step % every == 0:
            started = time.perf_counter()
            save(job.state_dict(), _child(prefix, f"step-{job.step:06d}"))
            saves.append(time.perf_counter() - started)
            manage.keep_last(prefix, keep)
            line += f"   saved in {humanize.duration(saves[-1])}"
        say(line)
    lost = crash_at % every
    del job
    say(f"crash     process state dropped after step {crash_at}; {lost} step(s) since the checkpoint lost")
    say("")

    latest = manage.latest(prefix)
    if latest is None:
        say(f"no checkpoint under {parse_url(prefix)}: save more often than every {every} steps")
        return False
    job = Job(seed=1)  # different initial weights: everything must come from the checkpoint
    state = job.state_dict()
    started = time.perf_counter()
    load(state, latest)
    loaded = time.perf_counter() - started
    job.load_state_dict(state)
    say(f"restart   kvckpt.latest() -> {parse_url(latest)}")
    say(f"          loaded in {humanize.duration(loaded)}, resuming at step {job.step + 1}")

    reference = Job(seed=0)
    expected = [reference.train_step() for _ in range(steps)]
    same = True
    while job.step < steps:
        loss = job.train_step()
        match = loss == expected[job.step - 1]
        same &= match
        verdict = "same as the uninterrupted run" if match else f"DIFFERS from {expected[job.step - 1]:.6f}"
        say(f"step {job.step:3d}  loss {loss:.6f}   {verdict}")
    say("")
    infos = manage.list_checkpoints(prefix)
    size = infos[-1].total_bytes
    save_time = statistics.median(saves)
    say(f"kept      {', '.join(i.namespace.rsplit('/', 1)[-1] for i in infos)} (keep_last {keep})")
    say(
        f"sizes     {humanize.size(size)} per checkpoint ({infos[-1].num_tensors} tensors, "
        f"{infos[-1].num_keys} keys)"
    )
    say(
        f"timings   save {humanize.duration(save_time)} (median of {len(saves)}, "
        f"{humanize.rate(size, save_time)}), load {humanize.duration(loaded)} ({humanize.rate(size, loaded)})"
    )
    say(
        "result    resumed training matches the uninterrupted run bit for bit"
        if same
        else "result    MISMATCH: the resumed run diverged from the uninterrupted one"
    )
    return same


def _child(prefix: str, name: str) -> str:
    url = parse_url(prefix)
    return url.with_namespace(f"{url.namespace}/{name}").to_url(redact=False)
