"""The random affine transform: forward then inverse, resolution independence, kornia's convention."""

from __future__ import annotations

import math

import kornia
import torch

from lightning_modules.augmentation import AffineAugmentation, affine_matrix, transform_points, unwarp, warp
from lightning_modules.selection import argmax_pixels


def _one_hot(size: int, x: int, y: int) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[0, 0, y, x] = 1
    return m


def test_forward_then_inverse_recovers_a_one_hot_argmax():
    augmentation = AffineAugmentation()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        theta = augmentation.sample(1, gen)
        x, y = torch.randint(20, 44, (2,), generator=gen).tolist()
        blob = _one_hot(64, x, y)
        back = unwarp(warp(blob, theta), theta)
        found = argmax_pixels(back)[0, 0].tolist()
        assert abs(found[0] - x) <= 1 and abs(found[1] - y) <= 1


def test_transform_points_follows_the_warped_content():
    theta = affine_matrix(torch.tensor([math.radians(10.0)]), torch.tensor([0.9]), torch.tensor([[0.1, -0.2]]))
    for size in (32, 128):  # one matrix, any resolution
        blob = _one_hot(size, size // 2 + 3, size // 2 - 5)
        moved = argmax_pixels(warp(blob, theta))[0, 0].float() + 0.5
        point = torch.tensor([[[(size // 2 + 3.5) / size, (size // 2 - 4.5) / size]]])
        predicted = transform_points(point, theta)[0, 0] * size
        assert torch.dist(moved, predicted) <= 1.0


def test_sampled_ranges():
    theta = AffineAugmentation(degrees=15, translate_frac=0.125, scale=(0.8, 1.0)).sample(2000, torch.Generator().manual_seed(0))
    scale = theta[:, 0, :2].norm(dim=1)
    angle = torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))
    assert 0.8 <= scale.min() and scale.max() <= 1.0
    assert angle.abs().max() <= 15.0 and angle.abs().max() > 14.0
    assert theta[:, :2, 2].abs().max() <= 0.25 and theta[:, :2, 2].abs().max() > 0.24


def test_matches_kornia_random_affine_convention():
    """theta(a, s, t) is kornia's forward affine with angle a, zoom 1/s about the centre and a
    translation of -R t / s (normalized units, i.e. x W/2 pixels): the sampling grid's inverse."""
    size = 64
    angle, s, shift = 12.0, 0.85, torch.tensor([0.2, -0.1])
    theta = affine_matrix(torch.tensor([math.radians(angle)]), torch.tensor([s]), shift[None])
    a = math.radians(angle)
    rotation = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    matrix = kornia.geometry.transform.get_affine_matrix2d(
        translations=(-(rotation @ shift) / s * size / 2)[None],
        center=torch.tensor([[(size - 1) / 2, (size - 1) / 2]]),
        scale=torch.tensor([[1 / s, 1 / s]]),
        angle=torch.tensor([angle]),
    )
    ours, theirs = [], []
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randint(24, 40, (2,), generator=gen).tolist()
        blob = _one_hot(size, x, y)
        ours.append(argmax_pixels(warp(blob, theta))[0, 0])
        theirs.append(argmax_pixels(kornia.geometry.transform.warp_affine(blob, matrix[:, :2], (size, size)))[0, 0])
    assert (torch.stack(ours) - torch.stack(theirs)).abs().max() <= 1
