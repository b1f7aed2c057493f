"""What a trained context only works with, defined once: its ``ContextSignature``.

A context's tokens mean something only for the model family, the captured layers and the map
resolution it was trained with, and it has a fixed shape. The backbone produces the signature
(``Backbone.signature``); checkpoints record it, exported context files carry it as metadata, and
whoever loads a context compares the two signatures (``mismatches``) instead of re-deriving them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.app.errors import CheckpointMismatchError


@dataclass(frozen=True)
class ContextSignature:
    """The identity of a trained context; ``None`` = not known (an older file, or a model not loaded yet).

    Attributes:
        family: the backbone class name (``StableDiffusion``, ``StableDiffusionXL``, ...).
        model: ``pretrained_model_name_or_path`` (another id of the same family is allowed, with a warning).
        layers: the captured layers, in order.
        feature_upsample_res: R, the side of the maps the context was trained on.
        num_tokens: T, the context's tokens.
        width: D, the width of one token (the denoiser's context width).
    """

    family: str | None = None
    model: str | None = None
    layers: tuple[str, ...] | None = None
    feature_upsample_res: int | None = None
    num_tokens: int | None = None
    width: int | None = None

    #: The keys whose difference makes a context unusable (``model`` only warns).
    IDENTITY = ("family", "num_tokens", "layers", "feature_upsample_res", "width")

    def mismatches(self, other: ContextSignature) -> dict[str, tuple[Any, Any]]:
        """``{key: (self's value, other's value)}`` for every identity key both know and that differ."""
        out = {}
        for key in self.IDENTITY:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is not None and theirs is not None and mine != theirs:
                out[key] = (mine, theirs)
        return out

    # ---------------------------------------------------------------- checkpoints
    def record(self) -> dict[str, Any]:
        """The dict a checkpoint stores (``app.checkpoints.RECORD_KEY``)."""
        return {
            "family": self.family,
            "model": self.model,
            "layers": list(self.layers or ()),
            "context_shape": [self.num_tokens, self.width],
            "feature_upsample_res": self.feature_upsample_res,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ContextSignature:
        tokens, width = record.get("context_shape") or (None, None)
        layers = record.get("layers")
        return cls(record.get("family"), record.get("model"), None if layers is None else tuple(layers),
                   record.get("feature_upsample_res"), tokens, width)

    # ---------------------------------------------------------------- context files
    def metadata(self) -> dict[str, str]:
        """safetensors metadata (strings only) of an exported context file."""
        values = {"family": self.family, "model": self.model,
                  "layers": None if self.layers is None else ",".join(self.layers),
                  "feature_upsample_res": self.feature_upsample_res, "num_tokens": self.num_tokens, "width": self.width}
        return {key: str(value) for key, value in values.items() if value is not None}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ContextSignature:
        def number(key: str) -> int | None:
            return int(metadata[key]) if key in metadata else None

        layers = metadata.get("layers")
        return cls(metadata.get("family"), metadata.get("model"), None if layers is None else tuple(layers.split(",")),
                   number("feature_upsample_res"), number("num_tokens"), number("width"))


def check_fits(found: ContextSignature, expected: ContextSignature, name: str) -> None:
    """Raises ``CheckpointMismatchError`` when a context of signature ``found`` cannot serve the configured
    model (``expected``); only warns when just the model id differs (a fine-tuned or moved copy).

    ``name`` says where the context comes from (``ckpt_path='...'``, ``pretrained_context='...'``).
    """
    trained_with = " ".join(part for part in (found.family or "a model", repr(found.model) if found.model else "") if part)
    fixes = {
        "family": lambda was, now: (f"{name} was trained with {trained_with}, but model.backbone is {now}: a context only "
                                    "works with the model family it was trained on. Use the config it was trained with "
                                    "(--config <run>/config.yaml, or a detector folder's config.yaml)."),
        "num_tokens": lambda was, now: (f"{name} holds a context of {was} tokens, but model.num_tokens={now}: set "
                                        f"--model.num_tokens {was} (or use the config it was trained with)."),
        "layers": lambda was, now: (f"{name} was trained on the maps of layers {list(was)}, but the configured backbone "
                                    f"captures {list(now)}: set model.backbone.init_args.layers to its layers."),
        "feature_upsample_res": lambda was, now: (f"{name} was trained on {was} x {was} maps, but "
                                                  f"model.feature_upsample_res={now}: set --model.feature_upsample_res {was}."),
        "width": lambda was, now: (f"{name} holds a context {was} wide (trained with {trained_with}), but "
                                   f"{expected.model!r} expects {now}: it belongs to another model."),
    }
    for key, (was, now) in found.mismatches(expected).items():
        raise CheckpointMismatchError(fixes[key](was, now))
    if found.model is not None and expected.model is not None and found.model != expected.model:
        rank_zero_warn(f"{name} was trained with {found.model!r}; using it with {expected.model!r} (same family and layers).")
