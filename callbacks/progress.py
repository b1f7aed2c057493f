"""A training progress bar that counts optimizer steps, the unit this method's runs are sized in."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, but under ``max_steps`` one bar over the whole run, in steps.

    Runs here are sized by ``trainer.max_steps`` (``max_epochs`` stays -1), so Lightning's bars read
    "Epoch 0/-2" and restart at every pass over the data. With ``max_steps`` set this shows
    ``Steps: 40%| 16/40 [..., 5.1step/s, train/loss=...]``, starting from the restored step on a
    resume; without it (an epoch budget) it is Lightning's bar unchanged.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        # v_num is the tail of the logger's run id: the run folder's name already says it.
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _counts_steps(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_start(trainer, pl_module)
        self.train_progress_bar = Tqdm(
            desc="Steps",
            total=trainer.max_steps,
            initial=trainer.global_step,
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,  # where Lightning's own bars write
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        step = trainer.global_step
        if not bar.disable and (step % self.refresh_rate == 0 or step >= trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
