"""How concentrated attention maps are: makes "the maps do not localize" a number (docs/method.md section 7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_modules.selection import argmax_pixels


def attention_concentration(maps: Tensor, sigma_px: float, radius_sigmas: float = 3.0) -> tuple[Tensor, Tensor]:
    """maps: (B, K, R, R) non-negative -> (mass, entropy), each (B, K).

    ``mass``: fraction of a map's total within ``radius_sigmas * sigma_px`` pixels of its argmax
    (1 for a single blob, about the disk's share of the area for a flat map).
    ``entropy``: Shannon entropy of the map normalized to sum 1, divided by log(R*R) so that 0 is
    one pixel and 1 is uniform, whatever the resolution.
    """
    size = maps.shape[-1]
    maps = maps.detach().float().clamp_min(0)
    total = maps.sum(dim=(-2, -1)).clamp_min(1e-12)
    peak = argmax_pixels(maps).float() + 0.5  # (B, K, 2) pixel centres
    coords = torch.arange(size, device=maps.device, dtype=torch.float32) + 0.5
    dx2 = (coords - peak[..., 0, None]) ** 2  # (B, K, R) along x
    dy2 = (coords - peak[..., 1, None]) ** 2  # (B, K, R) along y
    inside = (dy2[..., :, None] + dx2[..., None, :]) <= (radius_sigmas * sigma_px) ** 2
    mass = (maps * inside).sum(dim=(-2, -1)) / total
    p = maps.flatten(-2) / total[..., None]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1) / math.log(size * size)
    return mass, entropy
