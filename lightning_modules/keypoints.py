"""From a trained context to keypoints (docs/method.md section 5): the global token set, then per-image points."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from kornia.geometry.subpix import spatial_expectation2d
from torch import Tensor

from lightning_modules.augmentation import AffineAugmentation, unwarp, warp
from lightning_modules.selection import argmax_pixels


def rank_keypoint_tokens(selections: Tensor, num_tokens: int, top_k: int) -> tuple[Tensor, Tensor]:
    """selections: (N, k) tokens chosen per image -> (tokens (top_k,), counts (num_tokens,)).

    The keypoints are the ``top_k`` tokens selected most often, most frequent first (ties: the
    lower token index first).
    """
    counts = torch.bincount(selections.flatten(), minlength=num_tokens)
    # A stable sort on -counts keeps equal counts in token order.
    order = torch.sort(-counts, stable=True).indices
    return order[:top_k], counts


def region_mask(regions: Tensor, height: int, width: int) -> Tensor:
    """regions: (B, 4) normalized (x0, y0, x1, y1) -> (B, 1, H, W) bool, True at pixels whose centre is inside.

    A region thinner than one pixel still keeps the pixel nearest its centre, so no map is all masked.
    """
    xs = (torch.arange(width, device=regions.device, dtype=torch.float32) + 0.5) / width
    ys = (torch.arange(height, device=regions.device, dtype=torch.float32) + 0.5) / height
    x0, y0, x1, y1 = (regions[:, i, None].float() for i in range(4))
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    in_x = ((xs >= x0) & (xs <= x1)) | ((xs - centre_x).abs() <= 0.5 / width)  # (B, W)
    in_y = ((ys >= y0) & (ys <= y1)) | ((ys - centre_y).abs() <= 0.5 / height)  # (B, H)
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def inside_region(keypoints: Tensor, regions: Tensor) -> Tensor:
    """keypoints (B, K, 2) normalized (x, y), regions (B, 4) -> (B, K) bool: the point lies in its image's region."""
    x, y = keypoints[..., 0], keypoints[..., 1]
    x0, y0, x1, y1 = (regions[:, i, None].to(keypoints.dtype) for i in range(4))
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def locate_peaks(maps: Tensor, soft_argmax_window_px: int | None = None, valid: Tensor | None = None) -> Tensor:
    """maps: (B, K, H, W) -> (B, K, 2) normalized (x, y) of each map's peak (pixel centres).

    With ``soft_argmax_window_px`` (odd, e.g. 5), the peak is refined to the map-weighted mean of
    the pixel centres in that window around the argmax. ``valid`` (B, 1, H, W) bool restricts both
    to the pixels where it is True (``region_mask``: the image, not the padding around it).
    """
    height, width = maps.shape[-2:]
    if valid is not None:
        maps = maps.masked_fill(~valid, float("-inf"))  # never the argmax; weight 0 after clamp_min(0)
    peak = argmax_pixels(maps).float() + 0.5  # (B, K, 2) in pixels
    if soft_argmax_window_px:
        if soft_argmax_window_px % 2 == 0:
            raise ValueError(f"soft_argmax_window_px={soft_argmax_window_px} must be odd.")
        half = soft_argmax_window_px // 2
        xs = torch.arange(width, device=maps.device, dtype=torch.float32) + 0.5
        ys = torch.arange(height, device=maps.device, dtype=torch.float32) + 0.5
        in_x = (xs - peak[..., 0, None]).abs() <= half  # (B, K, W)
        in_y = (ys - peak[..., 1, None]).abs() <= half  # (B, K, H)
        weights = maps.float().clamp_min(0) * in_y[..., :, None] * in_x[..., None, :]
        total = weights.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        # kornia's expectation over pixel indices; +0.5 turns indices into pixel centres. (Not
        # kornia's spatial_soft_argmax2d: that takes a softmax of the whole map, this the window.)
        peak = spatial_expectation2d(weights / total, normalized_coordinates=False) + 0.5
    return peak / torch.tensor([width, height], device=maps.device, dtype=torch.float32)


def augmented_keypoints(
    maps_of: Callable[[Tensor, Sequence[torch.Generator]], Tensor],
    images: Tensor,
    tokens: Tensor,
    augmentation: AffineAugmentation,
    iterations: int,
    generators: Sequence[torch.Generator],
    soft_argmax_window_px: int | None = None,
    chunk_size: int | None = None,
    regions: Tensor | None = None,
) -> Tensor:
    """images: (B, 3, S, S) -> keypoints (B, K, 2), normalized (x, y), averaged over augmentations.

    ``regions`` (B, 4), normalized (x0, y0, x1, y1), restricts each image's keypoints to that part
    of it (the samples' ``image_region``: the photo, not the padding of its square crop).

    Each of the ``iterations`` random affine transforms warps the image; the K tokens' maps of the
    warped image are upsampled to S, warped back, and summed; the sum is divided by how often
    each pixel was covered (0 where never). All B x iterations warped images go through
    ``maps_of`` (images, their generators -> (N, T, R, R), noise drawn inside) together,
    ``chunk_size`` at a time.

    ``generators``: B x iterations of them, image-major (augmentation i of image b uses
    ``generators[b * iterations + i]``: its transform, then its noise). Each warped image's draws
    come from its own generator, so an image's keypoints do not depend on its batch or chunking.
    """
    batch, _, height, width = images.shape
    if len(generators) != batch * iterations:
        raise ValueError(f"{len(generators)} generators for {batch} images x {iterations} augmentations.")
    transform = torch.cat([augmentation.sample(1, generator, images.device) for generator in generators])
    warped = warp(images.repeat_interleave(iterations, dim=0), transform)
    step = chunk_size or len(warped)
    maps = torch.cat(
        [maps_of(warped[i : i + step], generators[i : i + step])[:, tokens] for i in range(0, len(warped), step)]
    )  # (B*I, K, R, R)
    maps = F.interpolate(maps.float(), size=(height, width), mode="bilinear", align_corners=False)
    back = unwarp(maps, transform).view(batch, iterations, len(tokens), height, width).sum(1)
    ones = torch.ones(batch * iterations, 1, height, width, device=images.device)
    coverage = unwarp(ones, transform).view(batch, iterations, 1, height, width).sum(1)
    mean = torch.where(coverage > 0, back / coverage.clamp_min(1e-12), torch.zeros_like(back))
    valid = None if regions is None else region_mask(regions.to(mean.device), height, width)
    return locate_peaks(mean, soft_argmax_window_px, valid)


def to_source_pixels(keypoints: Tensor, crop_box: Tensor, flipped: Tensor | None = None) -> Tensor:
    """keypoints (B, K, 2) normalized in the model's image -> (x, y) pixels of the source image.

    ``crop_box`` (B, 4) is ``(x0, y0, x1, y1)`` in source pixels (see data/base.py).
    """
    x, y = keypoints[..., 0], keypoints[..., 1]
    if flipped is not None:
        x = torch.where(flipped[:, None].bool(), 1 - x, x)
    x0, y0, x1, y1 = (crop_box[:, i, None].to(keypoints.dtype) for i in range(4))
    return torch.stack([x0 + x * (x1 - x0), y0 + y * (y1 - y0)], dim=-1)
