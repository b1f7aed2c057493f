"""The two training losses of docs/method.md section 4, on the selected tokens' maps."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.augmentation import unwarp
from lightning_modules.selection import argmax_pixels, gaussian_maps


def localization_loss(maps: Tensor, sigma_px: float) -> Tensor:
    """maps: (B, K, R, R) selected maps -> scalar mean((A - G)^2), G a peak-1 Gaussian at each argmax.

    The target has no gradient: it only says where each map should concentrate.
    """
    with torch.no_grad():
        target = gaussian_maps(argmax_pixels(maps), maps.shape[-1], sigma_px)
    return (maps - target).pow(2).mean()


def equivariance_loss(maps: Tensor, maps_transformed: Tensor, transform: Tensor, mask: bool = False) -> Tensor:
    """maps, maps_transformed: (B, K, R, R), transform: (B, 3, 3) normalized (``augmentation.py``) -> scalar.

    ``maps_transformed`` are the same tokens' maps on the image warped by ``transform``; warped back
    they should equal ``maps``. Without ``mask`` (StableKeypoints), pixels that the warp leaves
    uncovered count as zeros; with it, the mean runs over covered pixels only, per image.
    """
    back = unwarp(maps_transformed, transform)
    sq = (maps - back).pow(2)
    if not mask:
        return sq.mean()
    with torch.no_grad():
        ones = torch.ones_like(maps[:, :1])
        coverage = (unwarp(ones, transform) > 0.999).to(maps.dtype)  # (B, 1, R, R)
    per_image = (sq * coverage).sum(dim=(1, 2, 3)) / (coverage.sum(dim=(1, 2, 3)) * maps.shape[1]).clamp_min(1)
    return per_image.mean()
