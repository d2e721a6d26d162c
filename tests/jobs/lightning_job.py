"""A small Lightning fit that checkpoints to a kvckpt URL; run as a subprocess by test_lightning.

    python -m tests.jobs.lightning_job URL LOSSES_FILE MAX_STEPS [--resume] [--die-in-save-at STEP]

Each training step appends "step loss" to LOSSES_FILE. ``--die-in-save-at`` SIGKILLs the process
inside the first checkpoint save at that step, after its data is written and before its commit.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from kvckpt.dcp.writer import KVStorageWriter
from kvckpt.integrations.lightning import KVCheckpointIO, KVModelCheckpoint

BATCHES_PER_EPOCH = 4
EVERY_N_STEPS = 4


class Regression(pl.LightningModule):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.losses.append((self.global_step, float(loss)))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class DyingWriter(KVStorageWriter):
    """Dies (SIGKILL, no cleanup) once every rank's data is written, just before the commit."""

    def finish(self, metadata: Any, results: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class DyingIO(KVCheckpointIO):
    def __init__(self, die_at: int | None) -> None:
        super().__init__()
        self.die_at = die_at
        self.step = -1

    def writer(self, checkpoint_id: str) -> KVStorageWriter:
        if self.die_at is not None and self.step == self.die_at:
            return DyingWriter(checkpoint_id, overwrite=True)
        return super().writer(checkpoint_id)


class StepTracker(pl.Callback):
    def __init__(self, io: DyingIO, losses_file: str) -> None:
        self.io, self.losses_file = io, losses_file

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, i: int) -> None:
        step, loss = module.losses[-1]
        with open(self.losses_file, "a") as out:
            out.write(f"{step} {loss!r}\n")
        self.io.step = trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("losses_file")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-in-save-at", type=int)
    args = parser.parse_args()

    torch.manual_seed(1)
    x = torch.randn(BATCHES_PER_EPOCH * 8, 4)
    y = x.sum(dim=1, keepdim=True).sin()
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    io = DyingIO(args.die_in_save_at)
    checkpoints = KVModelCheckpoint(
        dirpath=args.url,
        filename="{step}",
        every_n_train_steps=EVERY_N_STEPS,
        monitor="train_loss",
        save_top_k=2,
        save_last=True,
    )
    # tracker first: the step is known before ModelCheckpoint saves in the same hook
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepTracker(io, args.losses_file), checkpoints],
        plugins=[io],
    )
    trainer.fit(Regression(), data, ckpt_path="last" if args.resume else None)


if __name__ == "__main__":
    main()
