"""Callbacks for the CLI tests: each rank saves its final context; a run killed mid-training."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch import Callback


class SaveContextPerRank(Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.directory, exist_ok=True)
        torch.save(pl_module.context.detach().cpu(), os.path.join(self.directory, f"context_rank{trainer.global_rank}.pt"))


class KillAtStep(Callback):
    """Ends the process with SIGKILL (no cleanup, as a crash or an OOM kill would) after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
