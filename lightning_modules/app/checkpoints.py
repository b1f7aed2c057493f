"""Checkpoints: written atomically, read with a clear error, and checked against the configured model.

A checkpoint of ``StableKeypoints`` records what its context only works with (``RECORD_KEY``: the
family class, the model id, the captured layers and the context's shape). ``check_fits`` compares
that record with a configuration before any weights load: the CLI calls it from the parsed config,
``StableKeypoints.on_load_checkpoint`` again from the built model (then with the UNet's width too).
"""

from __future__ import annotations

import json
import os
from importlib import import_module
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.app.files import atomic_file
from lightning_modules.app.errors import CheckpointMismatchError, MissingFileError

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
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

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


def checkpoint_record(family: str, model: str, layers: Sequence[str], context_shape: Sequence[int]) -> dict:
    """What a context only works with: -> the dict stored under ``RECORD_KEY``."""
    return {"family": family, "model": model, "layers": list(layers), "context_shape": [int(n) for n in context_shape]}


def recorded(checkpoint: dict) -> dict:
    """The record of ``checkpoint``; for checkpoints written before it existed, what the context shows."""
    record = checkpoint.get(RECORD_KEY)
    if record is not None:
        return record
    context = checkpoint.get("state_dict", {}).get("context")
    if context is None:
        raise CheckpointMismatchError("The checkpoint holds no 'context': it was not written by StableKeypoints.")
    return {"context_shape": list(context.shape)}


def check_fits(
    checkpoint: dict,
    *,
    family: str,
    model: str,
    layers: Sequence[str],
    num_tokens: int,
    context_dim: int | None = None,
    name: str = "the checkpoint",
) -> None:
    """Raises ``CheckpointMismatchError`` when the configured model cannot use the checkpoint's context.

    Args:
        checkpoint: a loaded checkpoint dict.
        family: the configured backbone class name (``StableDiffusion``, ``StableDiffusionXL``, ...).
        model: the configured ``pretrained_model_name_or_path`` (another id of the same family and
            width only warns: a fine-tuned or a moved copy of the model is a legitimate use).
        layers: the configured captured layers (the family default resolved).
        num_tokens: the configured ``model.num_tokens``.
        context_dim: the UNet's ``cross_attention_dim`` when the backbone is loaded; None = not checked.
        name: how the message names the checkpoint (its path).
    """
    record = recorded(checkpoint)
    tokens, width = record["context_shape"]
    trained_with = f"{record.get('family', 'a model')} {record.get('model', '')!r}".replace(" ''", "")
    if record.get("family") is not None and record["family"] != family:
        raise CheckpointMismatchError(
            f"{name} was trained with {trained_with}, but model.backbone is {family}: a context only works "
            f"with the model family it was trained on. Use that run's config (--config <run>/config.yaml)."
        )
    if tokens != num_tokens:
        raise CheckpointMismatchError(
            f"{name} holds a context of {tokens} tokens, but model.num_tokens={num_tokens}: set "
            f"--model.num_tokens {tokens} (or use that run's config)."
        )
    if record.get("layers") is not None and list(record["layers"]) != list(layers):
        raise CheckpointMismatchError(
            f"{name} was trained on the maps of layers {list(record['layers'])}, but the configured backbone "
            f"captures {list(layers)}: set model.backbone.init_args.layers to the checkpoint's layers."
        )
    if context_dim is not None and width != context_dim:
        raise CheckpointMismatchError(
            f"{name} holds a context {width} wide (trained with {trained_with}), but {model!r} expects "
            f"{context_dim}: it belongs to another model."
        )
    if record.get("model") is not None and record["model"] != model:
        rank_zero_warn(f"{name} was trained with {record['model']!r}; using it with {model!r} (same family and layers).")


#: ``ckpt_path`` values Lightning resolves itself (not files).
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def check_config_fits(ckpt_path: str, model: Namespace) -> None:
    """Reads ``ckpt_path`` and checks it fits a parsed ``model`` config (the CLI's, nothing built yet)."""
    if ckpt_path in CKPT_KEYWORDS:
        return
    backbone = model.backbone
    module, _, name = backbone.class_path.rpartition(".")
    family = getattr(import_module(module), name)
    init_args = backbone.get("init_args") or Namespace()
    layers = init_args.get("layers")
    model_path = init_args.get("pretrained_model_name_or_path")
    check_fits(
        read_checkpoint(ckpt_path),
        family=family.__name__,
        model=model_path,
        layers=list(layers) if layers is not None else list(family.default_layers),
        num_tokens=model.num_tokens,
        context_dim=_local_context_dim(model_path),
        name=f"ckpt_path={ckpt_path!r}",
    )


def _local_context_dim(model_path: str | None) -> int | None:
    """The UNet's ``cross_attention_dim`` from a local model folder's config.json (no weights, no network)."""
    config = Path(model_path or "") / "unet" / "config.json"
    if not model_path or not config.is_file():
        return None  # a hub id: checked once the backbone is loaded (StableKeypoints.on_load_checkpoint)
    return int(json.loads(config.read_text())["cross_attention_dim"])
