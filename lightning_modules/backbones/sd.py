"""Stable Diffusion 1.x / 2.x: the family of StableKeypoints (SPEC section 6.1)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

from lightning_modules.backbones.base import Backbone

SD_UP_LAYERS = tuple(
    f"up_blocks.{block}.attentions.{index}.transformer_blocks.0.attn2"
    for block, index in ((1, 0), (1, 1), (1, 2), (2, 0))
)

#: The public configs of stable-diffusion-v1-5 (``unet/`` and ``vae/config.json``), reduced to the
#: keys that differ from diffusers' defaults: what the benchmarks build with random weights.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
#: The same VAE shape (x8 downsampling, 4 latent channels) with few channels, for tests and the demo.
TINY_VAE = {**SD_VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 128}


def tiny_sd_unet(cross_attention_dim: int = 32, **overrides) -> UNet2DConditionModel:
    """An SD 1.5-shaped UNet (same block layout and module names), 2.4 M parameters."""
    config = dict(
        SD15_UNET,
        sample_size=16,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def sd_scheduler() -> PNDMScheduler:
    """The scheduler config Stable Diffusion 1.5 ships (its noise schedule is what matters here)."""
    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True
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

    @classmethod
    def write_tiny(cls, folder: str | Path, seed: int = 0) -> None:
        folder = Path(folder)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tiny_sd_unet().save_pretrained(folder / "unet")
            AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
        sd_scheduler().save_pretrained(folder / "scheduler")
