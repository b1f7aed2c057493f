"""Geometry of a sample: crops and resizes in continuous pixel coordinates, points in the same frame."""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia
import numpy as np
import torch
from PIL import Image


def image_region(box: Sequence[float], width: int, height: int, flipped: bool = False) -> torch.Tensor:
    """(4,) float32 ``(x0, y0, x1, y1)`` in [0, 1]: where a ``width`` x ``height`` image lies in the crop.

    ``box`` is the crop ``(x0, y0, x1, y1)`` in source pixels (``crop_resize``); the result is in
    normalized coordinates of the resized crop, mirrored when the sample was ``flipped``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    u0, u1 = (max(0.0, x0) - x0) / (x1 - x0), (min(float(width), x1) - x0) / (x1 - x0)
    v0, v1 = (max(0.0, y0) - y0) / (y1 - y0), (min(float(height), y1) - y0) / (y1 - y0)
    if flipped:
        u0, u1 = 1 - u1, 1 - u0
    return torch.tensor([u0, v0, u1, v1], dtype=torch.float32).clamp(0, 1)


def pixels_to_unit(xy_px: np.ndarray, width: float, height: float, pixel_centre: float = 0.5) -> torch.Tensor:
    """xy_px: (J, 2) (x, y) pixel indices of a width x height image -> (J, 2) float32 ``(xy + pixel_centre) / size``.

    Annotations give the pixel a point lies on; its centre is at ``+ 0.5`` in the continuous
    coordinates of ``data.base`` (pixel i spans [i, i + 1)). A ground-truth point on pixel i thus
    maps to the same value as a detector's argmax on that pixel (docs/method.md section 5.2 uses pixel
    centres). SK divided by the size without the half pixel (``pixel_centre=0``,
    ``data.protocol.pixel_centre``): a shift of half a source pixel.
    """
    xy = torch.as_tensor(xy_px, dtype=torch.float32)
    return (xy + pixel_centre) / torch.tensor([width, height], dtype=torch.float32)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    return kornia.utils.image_to_tensor(np.array(image.convert("RGB")), keepdim=True).float() / 255.0


def crop_matrix(box: Sequence[float], size: int, mirror: bool = False) -> torch.Tensor:
    """(3, 3) float64 kornia pixel matrix from source pixels to pixels of the ``box`` resized to ``size``.

    kornia's pixel coordinates put pixel i's centre at i (align_corners=False, as ``warp_affine``
    is called here): the box ``(x0, y0, x1, y1)`` in continuous source pixels (pixel i spans
    [i, i + 1)) has its corners at ``x0 - 0.5`` ... ``x1 - 0.5``, and they go to the output's
    corners -0.5 and ``size - 0.5``, left and right exchanged when ``mirror``. An annotation on
    source pixel index (x, y) lands at output pixel ``matrix @ (x, y, 1)``.
    """
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
    corners = torch.tensor([[[x0, y0], [x1, y0], [x1, y1], [x0, y1]]], dtype=torch.float64)
    lo, hi = -0.5, size - 0.5
    left, right = (hi, lo) if mirror else (lo, hi)
    target = torch.tensor([[[left, lo], [right, lo], [right, hi], [left, hi]]], dtype=torch.float64)
    return kornia.geometry.transform.get_perspective_transform(corners, target)[0]


def crop_points(points_px: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """points_px: (J, 2) (x, y) source pixel indices -> (J, 2) float32 normalized over the crop of ``matrix``.

    The point moves with the same matrix as the pixels (kornia's ``transform_points``); its
    output pixel index becomes the continuous coordinate (index + 0.5) / size of ``data.base``.
    """
    moved = kornia.geometry.transform_points(matrix[None], torch.as_tensor(points_px, dtype=torch.float64)[None])[0]
    return ((moved + 0.5) / size).float()


def crop_resize(
    image: torch.Tensor,
    box: Sequence[float],
    size: int,
    fill_rgb: Sequence[int],
    mirror: bool = False,
) -> torch.Tensor:
    """(3, size, size) float32 in [0, 1]: the ``box`` of ``image`` resized to ``size`` x ``size``.

    Args:
        image: (3, H, W) float in [0, 1], the source image.
        box: ``(x0, y0, x1, y1)`` in continuous source pixels (pixel i spans [i, i + 1)); it may
            extend past the image, where ``fill_rgb`` is used, and need not be square.
        size: output side S in pixels; the output's continuous coordinate u maps to
            ``x0 + u * (x1 - x0) / S`` in the source (``x1 - u * (x1 - x0) / S`` when ``mirror``).
        fill_rgb: 0-255 colour outside the image.
        mirror: mirror the output horizontally (in the same resampling).

    The geometry is one kornia ``warp_affine`` by ``crop_matrix`` (bilinear, sub-pixel exact).
    When the box shrinks, the source is first smoothed by the Gaussian that kornia's
    ``resize(..., antialias=True)`` uses for the same factor (sigma = (factor - 1) / 2): a large
    photo resized to 512 px otherwise aliases, and PIL's box resize, which this replaces,
    antialiases too. Measured against that PIL resize (``Image.resize(BILINEAR, box=...)``) on a
    photo-like image (1/f noise with a hard-edged patch, 2000 x 1500 px, values in [0, 1]): a
    1600 px box to 512 px differs by 0.0067 on average (max 0.067; PIL's triangle filter and
    kornia's Gaussian differ in shape), 0.037 (max 0.32) without the smoothing; the whole image to
    512 px, 0.011 (max 0.10) vs 0.042; a 300 px box upsampled to 512 px (CUB's usual case, no
    smoothing), 0.0004 (max 0.004, PIL's 8-bit rounding). Sources differ in size, so this runs
    per sample in the Dataset; the mirror costs nothing extra, being part of the matrix.
    In float32 on the CPU it is slower than PIL's 8-bit resize (a 500 x 375 image to 512 px: 27 vs
    15 ms; a 2000 x 1500 photo: 0.6 vs 0.09 s, mostly the full-resolution smoothing).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    # PIL's canvas: the box's whole pixels, the image pasted on the fill colour; the smoothing and
    # the bilinear taps reflect or clamp at the canvas border, as PIL clips its filter there.
    left, top, right, bottom = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
    fill = torch.tensor([float(c) / 255.0 for c in fill_rgb], dtype=torch.float32)
    canvas = fill.view(3, 1, 1).expand(3, bottom - top, right - left).clone()
    height, width = image.shape[-2:]
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if sx0 < sx1 and sy0 < sy1:
        canvas[:, sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[:, sy0:sy1, sx0:sx1]
    canvas = canvas[None]
    factors = ((y1 - y0) / size, (x1 - x0) / size)
    if max(factors) > 1:
        # kornia's resize(antialias=True) rule: sigma = (factor - 1) / 2, odd kernel of about 4 sigma.
        sigmas = tuple(max((f - 1.0) / 2.0, 1e-3) for f in factors)
        kernel = tuple(min(max(int(4 * sigma), 3) | 1, 2 * (n // 2) - 1) for sigma, n in zip(sigmas, canvas.shape[-2:]))
        canvas = kornia.filters.gaussian_blur2d(canvas, kernel, sigmas, border_type="reflect")
    matrix = crop_matrix((x0 - left, y0 - top, x1 - left, y1 - top), size, mirror)
    out = kornia.geometry.transform.warp_affine(
        canvas, matrix[None, :2].float(), (size, size), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0].clamp(0, 1).contiguous()
