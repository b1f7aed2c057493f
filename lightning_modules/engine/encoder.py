"""The VAE encoder's resnet blocks, computed in place: the same numbers from fewer passes over memory.

Images are only ever encoded without gradient, and at full resolution the encoder's activations are
large (SD's first stage: 128 channels at 512 x 512, 128 MiB per image in fp32). diffusers'
``ResnetBlock2D`` allocates a new tensor for each of its eight steps (norm, SiLU, conv, norm, SiLU,
conv, the residual sum, then its division by ``output_scale_factor``, 1 in every VAE here). Without
gradient, the SiLUs and the sum can write into the tensor they read and a division by 1 can be skipped:
the same kernels on the same values (the sum is commutative in floating point, ``x / 1 == x``), so the
latents are equal bit for bit (tested), with four fresh tensors per block instead of eight. On a CPU
each fresh tensor of that size is a new mapping whose pages the kernel faults in and zeroes again
(docs/performance.md has the measurements).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn


class InPlaceResnet(nn.Module):
    """A diffusers ``ResnetBlock2D`` (``block``) that, without gradient, writes its SiLUs and its residual
    sum in place; with gradient, or with a time embedding or resampling, it is the block itself."""

    def __init__(self, block: ResnetBlock2D) -> None:
        super().__init__()
        self.block = block

    def _in_place(self, x: Tensor, temb: Tensor | None) -> bool:
        block = self.block
        plain = temb is None and block.upsample is None and block.downsample is None
        silu = type(block.nonlinearity) is nn.SiLU
        no_dropout = not block.training or block.dropout.p == 0
        return plain and silu and no_dropout and not (torch.is_grad_enabled() and x.requires_grad)

    def forward(self, input_tensor: Tensor, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        block = self.block
        if args or kwargs or not self._in_place(input_tensor, temb):
            return block(input_tensor, temb, *args, **kwargs)
        hidden = block.conv1(F.silu(block.norm1(input_tensor), inplace=True))
        hidden = block.conv2(F.silu(block.norm2(hidden), inplace=True))
        shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
        hidden = hidden.add_(shortcut)
        return hidden if block.output_scale_factor == 1 else hidden.div_(block.output_scale_factor)


def encode_in_place(vae: nn.Module) -> int:
    """Wraps every ``ResnetBlock2D`` of ``vae.encoder`` in an ``InPlaceResnet`` -> how many were wrapped."""
    encoder = vae.encoder
    names = [name for name, module in encoder.named_modules() if type(module) is ResnetBlock2D]
    for name in names:
        encoder.set_submodule(name, InPlaceResnet(encoder.get_submodule(name)))
    return len(names)
