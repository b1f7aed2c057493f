"""Checkpoints: written atomically, read with a clear error, and recording what their context works with.

A checkpoint of ``StableKeypoints`` records the ``ContextSignature`` of its context (``RECORD_KEY``).
The CLI compares it with the configured model before any weights load, and
``StableKeypoints.on_load_checkpoint`` again with the loaded model (``backbones.signature.check_fits``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_modules.app.errors import (
    CheckpointMismatchError,
    ConfigError,
    MissingFileError,
)
from lightning_modules.app.files import atomic_file
from lightning_modules.app.settings import require_finite_context
from lightning_modules.backbones.signature import ContextSignature, check_fits

#: The key of the record in a checkpoint's dict.
RECORD_KEY = "stable_keypoints"


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partial or empty checkpoint file behind.

    Lightning's own writer opens the target and writes into it (no fsync), so a full disk or a kill
    mid-write can leave a truncated or 0-byte ``.ckpt`` that looks like a checkpoint. This one writes
    through ``files.atomic_file`` (temporary sibling, fsync, rename); the previous file, if any, is
    untouched on failure. Remote (fsspec URL) paths keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None) -> dict:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _is_intact_zip(path: Path) -> bool:
    """torch.save writes a zip archive: a truncated or overwritten file fails its directory or CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def read_checkpoint(path, map_location: Any = "cpu", weights_only: bool | None = True) -> dict:
    """The checkpoint at ``path``, or a ``MissingFileError`` saying it is missing or truncated."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(
            f"ckpt_path={str(path)!r} does not exist: give a checkpoint file (a run's checkpoints/last.ckpt)."
        )
    try:
        return torch.load(file, map_location=map_location, weights_only=weights_only)
    except Exception as error:
        if _is_intact_zip(file):
            raise
        raise MissingFileError(
            f"ckpt_path={str(path)!r} is truncated or corrupt ({file.stat().st_size} bytes; it was not written "
            "to the end, e.g. a full disk or a killed run). Use an earlier checkpoint of the run."
        ) from error


def recorded_signature(checkpoint: dict) -> ContextSignature:
    """The ``ContextSignature`` a checkpoint records; for checkpoints written before the record, what its context shows."""
    record = checkpoint.get(RECORD_KEY)
    if record is not None:
        return ContextSignature.from_record(record)
    context = checkpoint.get("state_dict", {}).get("context")
    if context is None:
        raise CheckpointMismatchError("The checkpoint holds no 'context': it was not written by StableKeypoints.")
    return ContextSignature(num_tokens=int(context.shape[0]), width=int(context.shape[1]))


#: ``ckpt_path`` values Lightning resolves itself (not files).
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def as_continuable(checkpoint: dict, batches_per_epoch: float) -> None:
    """Records an epoch that training left before its last batch as unfinished, in place.

    When training stops inside an epoch (``max_steps`` reached after batch 10 of 30), Lightning
    closes that epoch (``on_train_epoch_end``) before the checkpoints of the fit's end are written,
    so a resume with a larger ``max_steps`` would start the next epoch and skip the rest of this
    one. Here such a checkpoint records the loops as they were at the end of the last batch (what
    ``ModelCheckpoint`` writes at a batch's end): the epoch started and not processed, the batch
    processed and not completed, the logging step one less (``_TrainingEpochLoop.reset`` adds it
    back). A resume then continues the epoch where it stopped, as an uninterrupted run would.
    Checkpoints of an epoch that ran to its last batch, or taken inside the batch loop, are left as they are.
    """
    state = checkpoint.get("loops", {}).get("fit_loop")
    if not state:
        return
    epochs, batches = state["epoch_progress"], state["epoch_loop.batch_progress"]
    closed = all(epochs[scope]["processed"] == epochs[scope]["started"] for scope in ("total", "current"))
    if not closed or batches["is_last_batch"] or not 0 < batches["current"]["ready"] < batches_per_epoch:
        return
    for scope in ("total", "current"):
        epochs[scope]["processed"] -= 1
        epochs[scope]["completed"] = epochs[scope]["processed"]
        batches[scope]["completed"] = batches[scope]["processed"] - 1
    state["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    checkpoint["epoch"] = epochs["current"]["completed"]


def check_continuation(checkpoint: dict, max_steps: int | None, ckpt_path: str) -> None:
    """Raises ``ConfigError`` when ``fit --ckpt_path`` asks for fewer steps than the checkpoint already holds.

    (As many is fine: a run killed after its last checkpoint, while ranking or exporting, is finished.)
    """
    step = int(checkpoint.get("global_step", 0))
    if max_steps not in (None, -1) and step > max_steps:
        raise ConfigError(
            f"trainer.max_steps={max_steps}, but ckpt_path={str(ckpt_path)!r} is already at step {step}: a resumed fit "
            f"trains on to max_steps. Give a larger trainer.max_steps to continue training (e.g. {2 * step}), or use "
            "test/predict with this checkpoint."
        )


def training_is_done(checkpoint: dict, max_steps: int, max_epochs: int | None) -> bool:
    """Whether a fit resumed from ``checkpoint`` with these limits would train no step (Lightning's ``FitLoop.done``)."""
    if max_steps not in (None, -1) and checkpoint.get("global_step", 0) >= max_steps:
        return True
    epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return max_epochs not in (None, -1) and epochs.get("processed", 0) >= max_epochs


def add_keypoint_tokens(path: str | os.PathLike, tokens: torch.Tensor, global_step: int) -> bool:
    """Stores ``tokens`` in the checkpoint at ``path`` (atomically) when it holds the context of ``global_step``
    -> whether it did. Everything else in the file (loops, optimizer, callbacks) stays as written."""
    checkpoint = read_checkpoint(path, weights_only=False)
    if checkpoint.get("global_step") != global_step:
        return False
    checkpoint["state_dict"]["keypoint_tokens"] = tokens.detach().cpu()
    with atomic_file(path) as tmp, open(tmp, "wb") as file:
        torch.save(checkpoint, file)
    return True


# ---------------------------------------------------------------------- the LightningModule's checkpoint hooks
def use_atomic_writer(strategy) -> None:
    """Lightning's default writer can leave a truncated checkpoint on a full disk: ``AtomicCheckpointIO``
    replaces it; a CheckpointIO the user configured is kept."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def prepare_to_save(module, checkpoint: dict) -> None:
    """``StableKeypoints.on_save_checkpoint``: only what trains (KBs to MBs, never the frozen GBs), the
    context's signature, and during fit loops a larger ``max_steps`` continues exactly (``as_continuable``)."""
    require_finite_context(module.context, "a checkpoint", module.global_step)
    checkpoint["state_dict"] = {
        key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("backbone.")
    }
    checkpoint[RECORD_KEY] = module.signature().record()
    if module._trainer is not None and module.trainer.state.fn == "fit":
        as_continuable(checkpoint, module.trainer.num_training_batches)


def restore(module, checkpoint: dict) -> int | None:
    """``StableKeypoints.on_load_checkpoint``: refuses a context that cannot serve the module, makes room for
    the checkpoint's tensors -> the step at which its training had ended, when a fit resumes a finished run."""
    check_fits(recorded_signature(checkpoint), module.signature(), "the checkpoint")
    state = checkpoint["state_dict"]
    if module.context is None:
        module.context = torch.nn.Parameter(torch.empty_like(state["context"]))
    module.keypoint_tokens = torch.empty_like(state.get("keypoint_tokens", module.keypoint_tokens))
    trainer = module._trainer
    if trainer is not None and trainer.state.fn == "fit" and training_is_done(checkpoint, trainer.max_steps,
                                                                             trainer.max_epochs):
        return int(checkpoint["global_step"])
    return None
