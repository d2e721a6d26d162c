"""A training loop checkpointed by torchtitan's own CheckpointManager into a kvckpt URL folder.

    python -m tests.jobs.torchtitan_job FOLDER_URL LOSSES_FILE STEPS [--die-in-save-at STEP]

Single rank on gloo (the manager needs a process group). Each step appends "step loss" to
LOSSES_FILE; every 2 steps the manager saves to FOLDER_URL/step-N. On start it loads the latest
step it finds there, as torchtitan's trainer does. ``--die-in-save-at`` SIGKILLs the process while
that step's save writes its data, before any commit.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

import kvckpt


class DiesWhenSaved:
    def __reduce__(self) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)


class TrainState(Stateful):
    def __init__(self) -> None:
        self.step = 0
        self.die_at: int | None = None

    def state_dict(self) -> dict[str, Any]:
        bomb = DiesWhenSaved() if self.step == self.die_at else 0
        return {"step": torch.tensor(self.step), "bomb": bomb}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("losses_file")
    parser.add_argument("steps", type=int)
    parser.add_argument("--die-in-save-at", type=int)
    parser.add_argument("--port", default="29517")
    args = parser.parse_args()

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
    kvckpt.install()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    group = ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.01})
    optimizers = OptimizersContainer.Config(param_groups=[group], implementation="for-loop").build(
        model_parts=[model]
    )
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=args.steps
    )
    train_state = TrainState()
    train_state.die_at = args.die_in_save_at
    config = CheckpointManager.Config(enable=True, folder=args.folder, interval=2, keep_latest_k=2)
    manager = CheckpointManager(
        config,
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
    )
    manager.load()
    while train_state.step < args.steps:
        train_state.step += 1
        generator = torch.Generator().manual_seed(train_state.step)
        x = torch.randn(16, 4, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
        optimizers.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        optimizers.step()
        schedulers.step()
        with open(args.losses_file, "a") as out:
            out.write(f"{train_state.step} {float(loss)!r}\n")
        manager.save(train_state.step, last_step=False)
    manager.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
