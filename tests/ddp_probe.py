"""A callback for the DDP test: each rank saves its final context, so the test can compare them."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback


class SaveContextPerRank(Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.directory, exist_ok=True)
        torch.save(pl_module.context.detach().cpu(), os.path.join(self.directory, f"context_rank{trainer.global_rank}.pt"))
