"""The localization and equivariance losses against values computed by hand."""

from __future__ import annotations

import math

import torch

from lightning_modules.augmentation import affine_matrix, warp
from lightning_modules.concentration import attention_concentration
from lightning_modules.losses import equivariance_loss, localization_loss


def test_localization_loss_by_hand():
    maps = torch.zeros(1, 1, 3, 3)
    maps[0, 0, 1, 1] = 0.5  # argmax at the centre pixel
    g = torch.tensor([[math.exp(-((dy**2 + dx**2) / 2)) for dx in (-1, 0, 1)] for dy in (-1, 0, 1)])
    expected = ((maps[0, 0] - g) ** 2).mean()
    torch.testing.assert_close(localization_loss(maps, sigma_px=1.0), expected)


def test_localization_loss_is_zero_on_its_own_target_and_its_gradient_treats_the_target_as_fixed():
    from lightning_modules.selection import gaussian_maps

    peaks = torch.tensor([[[4, 2], [1, 6]]])  # (x, y) of each map's maximum, kept by the noise below
    target = gaussian_maps(peaks, 8, 1.5)
    assert localization_loss(target, sigma_px=1.5).item() == 0
    # Away from the optimum the gradient is exactly that of mean((A - G)^2) with G held fixed: 2 (A - G) / N.
    noise = 0.05 * torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = (0.7 * target + noise).requires_grad_()
    localization_loss(maps, sigma_px=1.5).backward()
    expected = 2 * (maps.detach() - target) / maps.numel()
    assert expected.abs().sum() > 0.1
    torch.testing.assert_close(maps.grad, expected, rtol=0, atol=1e-9)


def test_equivariance_loss_identity_transform_is_plain_mse():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    identity = torch.eye(3).expand(2, 3, 3)
    torch.testing.assert_close(equivariance_loss(a, b, identity), ((a - b) ** 2).mean())
    torch.testing.assert_close(equivariance_loss(a, b, identity, mask=True), ((a - b) ** 2).mean())


def test_equivariance_loss_is_zero_for_equivariant_maps_inside_the_frame():
    maps = torch.zeros(1, 1, 32, 32)
    maps[0, 0, 12:20, 12:20] = 1.0
    # A pure translation by 4 pixels (0.25 normalized units at 32 px): exact on the pixel grid.
    theta = affine_matrix(torch.zeros(1), torch.ones(1), torch.tensor([[0.25, 0.0]]))
    moved = warp(maps, theta)
    assert moved[0, 0, 12:20, 8:16].min() == 1.0
    assert equivariance_loss(maps, moved, theta).item() < 1e-10


def test_equivariance_mask_ignores_uncovered_pixels():
    maps = torch.ones(1, 1, 16, 16)
    theta = affine_matrix(torch.zeros(1), torch.ones(1), torch.tensor([[0.5, 0.0]]))  # shift by 4 px
    moved = warp(maps, theta)
    # Unmasked, the 4 columns that left the frame count as errors of 1; masked they do not.
    torch.testing.assert_close(equivariance_loss(maps, moved, theta), torch.tensor(4 / 16))
    assert equivariance_loss(maps, moved, theta, mask=True).item() < 1e-10


def test_concentration_of_a_blob_and_of_a_flat_map():
    sharp = torch.zeros(1, 1, 32, 32)
    sharp[0, 0, 10, 20] = 1.0
    flat = torch.ones(1, 1, 32, 32)
    mass, entropy = attention_concentration(torch.cat([sharp, flat], dim=1), sigma_px=1.0)
    assert mass[0, 0] == 1.0 and entropy[0, 0] == 0.0
    assert abs(entropy[0, 1].item() - 1.0) < 1e-5
    assert mass[0, 1] < 0.05
