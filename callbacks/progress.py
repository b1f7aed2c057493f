"""Progress bars that count what this method's runs are sized in and end where the work ends."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

from lightning_modules.evaluation import REGRESSION_LOADER, TEST_LOADER

#: What each ``test`` loader does (``lightning_modules.evaluation``): its bar says so instead of "DataLoader i".
TEST_LOADER_NAMES = {REGRESSION_LOADER: "Regression split (fitting the regressor)", TEST_LOADER: "Test split (scored)"}


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bars with three changes, so that every message after a bar starts on its own line
    and each final count prints once:

    - Under ``max_steps`` one bar over the whole run, in steps (``Steps: 40%| 16/40 [..., 5.1step/s,
      train/loss=...]``, from the restored step on a resume) instead of "Epoch 0/-2" bars that restart at
      every pass over the data; without it (an epoch budget) Lightning's bar, unchanged.
    - ``test``: one bar per loader, named by what it does (``TEST_LOADER_NAMES``) instead of one
      "Testing DataLoader i" bar reused for both; ``predict``: one "Predicting" bar, made with its total.
    - A bar closes as soon as its last step or batch is done, not at the end of the stage: what
      callbacks and Lightning print at the end (``Trainer.fit stopped``, the written files, the
      test results) comes after its final line instead of glued to it.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        # v_num is the tail of the logger's run id: the run folder's name already says it.
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _counts_steps(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def _bar(self, desc: str, total: int | float | None, unit: str, initial: int = 0) -> Tqdm:
        return Tqdm(desc=desc, total=total, initial=initial, unit=unit, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout,  # where Lightning's bars write
                    smoothing=0, bar_format=self.BAR_FORMAT)

    # ------------------------------------------------------------------ fit
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_start(trainer, pl_module)
        self.train_progress_bar = self._bar("Steps", trainer.max_steps, "step", initial=trainer.global_step)

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
        if bar.disable:
            return
        if step >= trainer.max_steps:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.close()  # prints the final count once, with its newline
        elif step % self.refresh_rate == 0:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:  # closed at max_steps: nothing more to show
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    # ------------------------------------------------------------------ test
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_progress_bar = None  # one per loader, made when its first batch starts

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        if self._test_progress_bar is not None:
            self._test_progress_bar.close()
        name = TEST_LOADER_NAMES.get(dataloader_idx, f"Test loader {dataloader_idx}")
        self.test_progress_bar = self._bar(name, convert_inf(self.total_test_batches_current_dataloader), "batch")

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not _close_when_done(self._test_progress_bar, batch_idx + 1):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._test_progress_bar is not None:
            self._test_progress_bar.close()
        self.reset_dataloader_idx_tracker()

    # ------------------------------------------------------------------ predict
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._predict_progress_bar = None  # made when the first batch starts, with its total

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        if self._predict_progress_bar is not None:
            self._predict_progress_bar.close()
        name = "Predicting" if len(trainer.num_predict_batches) == 1 else f"Predicting loader {dataloader_idx}"
        self._predict_progress_bar = self._bar(name, convert_inf(self.total_predict_batches_current_dataloader), "batch")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._predict_progress_bar is not None:
            self._predict_progress_bar.close()
        self.reset_dataloader_idx_tracker()

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not _close_when_done(self._predict_progress_bar, batch_idx + 1):
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


def _close_when_done(bar: Tqdm | None, done: int) -> bool:
    """Closes ``bar`` when ``done`` reaches its known total -> whether it did. Closing prints the final
    line once, with its newline; a refresh before it would print the same count twice."""
    if bar is None or bar.disable or bar.total is None or done < bar.total:
        return False
    bar.n = done
    bar.close()
    return True
