"""Callbacks for the CLI tests: each rank records what the tests compare (contexts, DDP sync, logged
losses); runs killed mid-training or mid-predict."""

from __future__ import annotations

import json
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


class RecordDDPSync(Callback):
    """Per rank: what DDP synchronizes (from the wrapper itself), the logged train/loss and the final context."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model  # torch's DistributedDataParallel around the LightningModule
        synced = {id(p) for p in ddp._module_parameters}
        synced_buffers = {id(b) for b in ddp.modules_buffers}
        record = {
            "backend": torch.distributed.get_backend(),
            "ignored": sorted(ddp.parameters_to_ignore),
            "synced_parameters": [n for n, p in pl_module.named_parameters() if id(p) in synced],
            "synced_buffers": [n for n, b in pl_module.named_buffers() if id(b) in synced_buffers],
            "synced_bytes": sum(p.numel() * p.element_size() for p in ddp._module_parameters),
            "all_names": [n for n, _ in pl_module.named_parameters()] + [n for n, _ in pl_module.named_buffers()],
        }
        self._write(trainer, "ddp", record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, "losses", self.losses)
        torch.save(pl_module.context.detach().cpu(), os.path.join(self.directory, f"context_rank{trainer.global_rank}.pt"))

    def _write(self, trainer, name: str, value) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"{name}_rank{trainer.global_rank}.json"), "w") as file:
            json.dump(value, file)


class KillAfterBatches(Callback):
    """Every rank SIGKILLs itself right after writing its ``batches``-th predict batch (as a node that dies)."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx + 1 == self.batches:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(Callback):
    """Ends the process with SIGKILL (no cleanup, as a crash or an OOM kill would) after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileRanking(Callback):
    """SIGKILL when the module starts ranking the keypoint tokens at the end of fit: after ModelCheckpoint wrote
    the last checkpoint (its on_train_end runs after this callback's, and the module's after both)."""

    def on_train_end(self, trainer, pl_module) -> None:
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        trainer.datamodule.keypoint_index_dataloader = killed
