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

from lightning_modules.app.errors import CheckpointMismatchError, MissingFileError
from lightning_modules.app.files import atomic_file
from lightning_modules.backbones.signature import ContextSignature

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
