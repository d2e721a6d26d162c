"""Two tiers: save every step to Redis, let `kvckpt drain` copy some of them to durable storage, and
resume from whichever tier has the newest checkpoint.

    kvckpt server --port 6390 &
    kvckpt drain redis://127.0.0.1:6390/0/run1 /tmp/durable/run1 --every 2 --keep 2 --poll 0.5 &
    python examples/tiered.py --url redis://127.0.0.1:6390/0/run1 --durable /tmp/durable/run1 --steps 6
    redis-cli -p 6390 flushall    # the store loses everything (or: restart `kvckpt server`)
    python examples/tiered.py --url redis://127.0.0.1:6390/0/run1 --durable /tmp/durable/run1 --steps 8

The second run resumes from the newest drained copy (step 6 if the drainer got to it, else step 4).
One process on CPU, so it runs anywhere; with torchrun every rank runs the same code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kvckpt


def main(argv: Sequence[str] | None = None, say: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="store prefix, e.g. redis://127.0.0.1:6390/0/run1")
    parser.add_argument("--durable", required=True, help="the drainer's destination (folder or s3://…)")
    parser.add_argument("--steps", type=int, default=6, help="train until this step")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state: dict[str, Any] = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 0}

    restart = kvckpt.newest_restorable(args.url, args.durable)  # memory tier first, then durable
    if restart is not None:
        optim.zero_grad()
        model(torch.zeros(1, 16)).sum().backward()
        optim.step()  # AdamW creates its state lazily: give the load a target of the right shape
        state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 0}
        kvckpt.load(state, restart, no_dist=True)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        say(f"resumed from {restart} at step {state['step']}")
    for step in range(int(state["step"]) + 1, args.steps + 1):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
        loss = F.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optim.step()
        optim.zero_grad()
        checkpoint = {"model": model.state_dict(), "optim": optim.state_dict(), "step": step}
        kvckpt.save(checkpoint, f"{args.url}/step{step}", no_dist=True)  # the fast tier, every step
        say(f"step {step}: loss {loss.item():.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
