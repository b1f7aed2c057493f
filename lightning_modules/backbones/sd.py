"""Stable Diffusion 1.x / 2.x: the family of StableKeypoints (docs/method.md section 6.1)."""

from __future__ import annotations

from typing import ClassVar

from lightning_modules.backbones.base import Backbone

SD_UP_LAYERS = tuple(
    f"up_blocks.{block}.attentions.{index}.transformer_blocks.0.attn2"
    for block, index in ((1, 0), (1, 1), (1, 2), (2, 0))
)


class StableDiffusion(Backbone):
    """Stable Diffusion 1.5 / 2.x (``v_prediction`` models work too: the UNet output is discarded).

    Default layers: ``up_blocks.1.attentions.{0,1,2}`` (16x16 at 512 px) and
    ``up_blocks.2.attentions.0`` (32x32), each ``transformer_blocks.0.attn2``: cross-attention
    layers 7-10 (counting from 0) of 16 in forward order.
    """

    default_layers: ClassVar[tuple[str, ...]] = SD_UP_LAYERS

    def __init__(self, pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5", **kwargs) -> None:
        super().__init__(pretrained_model_name_or_path, **kwargs)
