"""The random affine augmentation of the equivariance loss and its inverse on attention maps.

A transform is a (B, 3, 3) matrix ``theta`` in ``F.affine_grid`` units (normalized coordinates,
``align_corners=False``) mapping each *output* location to the *input* location it samples, as
StableKeypoints' ``RandomAffineWithInverse`` does. Normalized coordinates make one matrix valid
at every resolution: the 512 px image and the 128 px maps are warped by the same ``theta``.

Why not kornia's ``RandomAffine``/``warp_affine`` directly: they take pixel-space matrices
normalized with the align-corners convention (pixel 0 and W-1 map to -1 and 1), so one matrix
cannot serve two resolutions exactly. The test suite checks that this module and kornia agree on
the direction of rotation, zoom and translation (``tests/test_augmentation.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.errors import ConfigError


@dataclass
class AffineAugmentation:
    """Ranges of the random affine transform (SPEC section 4).

    Args:
        degrees: rotation drawn from U(-degrees, degrees).
        translate_frac: translation drawn from U(-t, t) as a fraction of the image width/height
            (0.125 = 0.25 ``affine_grid`` units, StableKeypoints' setting).
        scale: ``(low, high)`` of s ~ U(low, high); the sampling grid is scaled by s, so the content
            is zoomed by 1/s (kornia's ``scale=(1/high, 1/low)``).
    """

    degrees: float = 15.0
    translate_frac: float = 0.125
    scale: tuple[float, float] = (0.8, 1.0)

    def __post_init__(self) -> None:
        low, high = self.scale
        if not (math.isfinite(high) and 0 < low <= high):
            raise ConfigError(f"model.augmentation.scale={self.scale}: need 0 < low <= high.")
        for key in ("degrees", "translate_frac"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"model.augmentation.{key}={value}: it must be finite and >= 0.")

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        """-> theta (B, 3, 3), one random transform per image."""
        u = torch.rand(batch_size, 4, generator=generator, device=device)
        angle = (2 * u[:, 0] - 1) * math.radians(self.degrees)
        low, high = self.scale
        s = low + (high - low) * u[:, 1]
        shift = (2 * u[:, 2:] - 1) * 2 * self.translate_frac  # fraction of the size -> [-1, 1] units
        return affine_matrix(angle, s, shift)


def affine_matrix(angle_rad: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(B,), (B,), (B, 2) -> theta (B, 3, 3) = [[s cos, s sin, tx], [-s sin, s cos, ty], [0, 0, 1]]."""
    cos, sin = torch.cos(angle_rad) * scale, torch.sin(angle_rad) * scale
    theta = torch.zeros(angle_rad.shape[0], 3, 3, device=angle_rad.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, sin, shift[:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = -sin, cos, shift[:, 1]
    theta[:, 2, 2] = 1
    return theta


def warp(x: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
    """x: (B, C, H, W), theta: (B, 3, 3) -> x warped by theta; zeros outside the frame."""
    grid = F.affine_grid(theta[:, :2].to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def unwarp(x: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
    """Inverse of ``warp``: brings maps of a transformed image back to the original's frame."""
    return warp(x, torch.linalg.inv(theta.double()).float(), mode=mode)


def transform_points(points: Tensor, theta: Tensor) -> Tensor:
    """points: (B, N, 2) normalized (x, y) in [0, 1] of the original -> their position after ``warp``."""
    homogeneous = torch.cat([points * 2 - 1, torch.ones_like(points[..., :1])], dim=-1)
    moved = homogeneous @ torch.linalg.inv(theta.double()).float().transpose(1, 2)
    return (moved[..., :2] + 1) / 2
