"""How a frozen UNet runs, whatever the family: one documented home for the engine options.

Every family takes these as ``engine`` (YAML: ``model.backbone.init_args.engine.<option>``), so a
family file only says what the family is. All defaults change no number except where noted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lightning_modules.app.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Engine:
    """Options of the UNet call and the map capture, shared by every family.

    Args:
        dtype: ``float32`` (default) or ``bfloat16`` for the frozen UNet/VAE; the context, maps and
            losses stay fp32 either way. float16 is refused: it does not converge (SPEC section 8).
        stop_early: end the UNet forward after the last captured layer (same maps, less work), and
            free the weights of the modules after it once the first call has shown which they are.
        memory_efficient_maps: average heads inside the capture and recompute per head in backward.
        upsample_queries: upsample the layer's queries rather than its features before ``to_q``
            (equal numbers, up to float rounding; far fewer FLOPs). ``False`` is StableKeypoints' order.
        replace_output: replace the captured layers' outputs with the bicubically downsampled
            high-resolution attention, as StableXLKeypoints did (changes the network and the maps of
            every captured layer after the first; for reproduction only).
        gradient_checkpointing: trade compute for memory in the UNet's backward pass (same numbers).
        channels_last: run the UNet and the VAE in channels-last memory format: faster convolutions
            (oneDNN on CPU, cuDNN on GPU), equal numbers up to float rounding.
        compile_unet: ``torch.compile`` the UNet's blocks.
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    stop_early: bool = True
    memory_efficient_maps: bool = True
    upsample_queries: bool = True
    replace_output: bool = False
    gradient_checkpointing: bool = False
    channels_last: bool = True
    compile_unet: bool = False

    def __post_init__(self) -> None:
        if self.dtype == "float16":
            raise ConfigError(
                "engine.dtype=float16 is refused: the context's gradients vanish in half precision and "
                "training does not converge (both follow-up projects report it). Use float32, or bfloat16 "
                "for the frozen UNet/VAE (context, maps and losses stay fp32)."
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"engine.dtype={self.dtype!r}: use one of {sorted(DTYPES)}.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
