"""The random affine transform: forward then inverse, resolution independence, StableKeypoints' convention."""

from __future__ import annotations

import math

import kornia
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.augmentation import (
    AffineAugmentation,
    PhotometricAugmentation,
    affine_matrix,
    invert,
    pixel_matrix,
    transform_points,
    unwarp,
    warp,
)
from lightning_modules.app.errors import ConfigError
from lightning_modules.selection import argmax_pixels
from tests.conftest import tiny_module


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
    theta = affine_matrix(torch.tensor([10.0]), torch.tensor([0.9]), torch.tensor([[0.1, -0.2]]))
    for size in (32, 128):  # one matrix, any resolution
        blob = _one_hot(size, size // 2 + 3, size // 2 - 5)
        moved = argmax_pixels(warp(blob, theta))[0, 0].float() + 0.5
        point = torch.tensor([[[(size // 2 + 3.5) / size, (size // 2 - 4.5) / size]]])
        predicted = transform_points(point, theta)[0, 0] * size
        assert torch.dist(moved, predicted) <= 1.0


def test_sampled_ranges():
    """The inverse of each transform is StableKeypoints' grid s R(-a) p + t, with SK's ranges."""
    transform = AffineAugmentation(degrees=15, translate_frac=0.125, scale=(0.8, 1.0)).sample(2000, torch.Generator().manual_seed(0))
    assert transform.dtype == torch.float64
    grid = invert(transform)
    scale = grid[:, 0, :2].norm(dim=1)
    angle = torch.rad2deg(torch.atan2(grid[:, 0, 1], grid[:, 0, 0]))
    assert 0.8 <= scale.min() and scale.max() <= 1.0
    assert angle.abs().max() <= 15.0 and angle.abs().max() > 14.0
    assert grid[:, :2, 2].abs().max() <= 0.25 and grid[:, :2, 2].abs().max() > 0.24
    torch.testing.assert_close(grid[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(2000, 3))


def test_sample_draws_four_uniforms_per_image_from_the_generator_only():
    """The same random numbers as before the move to kornia (the demo's numbers depend on them)."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    transform = AffineAugmentation().sample(3, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    u = torch.rand(3, 4, generator=torch.Generator().manual_seed(7)).double()
    expected = affine_matrix((2 * u[:, 0] - 1) * 15, 0.8 + 0.2 * u[:, 1], (2 * u[:, 2:] - 1) * 0.25)
    torch.testing.assert_close(transform, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [512, 128])
def test_kornia_warp_matches_stablekeypoints_affine_grid(size):
    """The kornia warp of a transform equals SK's affine_grid/grid_sample with its grid matrix
    [[s cos, s sin, tx], [-s sin, s cos, ty]] (align_corners=False), at the image's and the maps' size:
    exactly in float64; in float32 within the rounding of float32 grids (affine_grid's own float32
    grid is 5.5e-5 off the exact one at 512 px, 1.4e-5 at 128 px)."""
    angle, s, shift = 12.0, 0.85, (0.2, -0.1)
    a = math.radians(angle)
    sk_theta = torch.tensor([[[s * math.cos(a), s * math.sin(a), shift[0]], [-s * math.sin(a), s * math.cos(a), shift[1]]]], dtype=torch.float64)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = F.affine_grid(sk_theta, [1, 3, size, size], align_corners=False)
    exact = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    transform = affine_matrix(torch.tensor([angle], dtype=torch.float64), torch.tensor([s], dtype=torch.float64), torch.tensor([shift], dtype=torch.float64))
    torch.testing.assert_close(invert(transform)[:, :2], sk_theta, rtol=0, atol=1e-15)
    assert (warp(x, transform) - exact).abs().max() < 1e-12
    assert (warp(x.float(), transform) - exact).abs().max() < {512: 1e-4, 128: 2e-5}[size]


def test_one_transform_serves_every_resolution():
    """kornia's pixel matrices at 512 and 128 px are the same transform (align_corners=False):
    the centre of pixel i at 512 px lies at (i + 0.5) / 4 - 0.5 at 128 px, and the pixel matrices
    convert into each other by kornia's normalize/denormalize_homography, exactly in float64."""
    transform = AffineAugmentation().sample(4, torch.Generator().manual_seed(3))
    big, small = pixel_matrix(transform, (512, 512)), pixel_matrix(transform, (128, 128))
    to_small = torch.tensor([[0.25, 0, -0.375], [0, 0.25, -0.375], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(to_small @ big, small @ to_small, rtol=0, atol=1e-12)
    again = kornia.geometry.conversions.normalize_homography(small, (128, 128), (128, 128), align_corners=False)
    torch.testing.assert_close(again, transform, rtol=0, atol=1e-14)


def test_photometric_is_off_by_default_and_draws_nothing_then():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    off = PhotometricAugmentation()
    assert off.kornia_steps() == []
    assert off(images, generator) is images
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(1)))


def test_photometric_is_reproducible_from_the_generator_and_leaves_the_global_rng_alone():
    images = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    augment = PhotometricAugmentation(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.3, blur_p=0.5)
    assert [type(step).__name__ for step in augment.kornia_steps()] == ["ColorJitter", "RandomGrayscale", "RandomGaussianBlur"]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(77)  # another global state: same result
    assert torch.equal(augment(images, torch.Generator().manual_seed(3)), first)
    assert not torch.equal(augment(images, torch.Generator().manual_seed(4)), first)
    assert ((first - images).abs().amax(dim=(1, 2, 3)) > 0.01).sum() >= 6  # each step hits a random subset
    assert 0 <= first.min() and first.max() <= 1


def test_photometric_grayscale_only_makes_gray_images():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = PhotometricAugmentation(grayscale_p=1.0)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    with pytest.raises(ConfigError, match="model.photometric.blur_p=1.5"):
        PhotometricAugmentation(blur_p=1.5)
    with pytest.raises(ConfigError, match="model.photometric.hue=0.6"):
        PhotometricAugmentation(hue=0.6)
    with pytest.raises(ConfigError, match="model.photometric.contrast=nan"):
        PhotometricAugmentation(contrast=float("nan"))
    with pytest.raises(ConfigError, match="blur_sigma_px"):
        PhotometricAugmentation(blur_sigma_px=(0.0, 1.0))


@pytest.mark.parametrize("photometric", [None, PhotometricAugmentation(), PhotometricAugmentation(brightness=0.5, blur_p=1.0)])
def test_equivariance_pair_changes_only_the_transformed_copy(tiny_sd_path, photometric):
    module = tiny_module(tiny_sd_path, load=False, num_tokens=20, top_k=2, furthest_point_num_samples=4,
                         photometric=photometric)
    seen = []
    module.maps_of = lambda x, generator: seen.append(x) or x
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, transform = module.equivariance_pair(images, torch.Generator().manual_seed(9))
    torch.testing.assert_close(transform, AffineAugmentation().sample(2, torch.Generator().manual_seed(9)))
    assert torch.equal(seen[0][:2], images)
    plain = warp(images, transform)
    if photometric is None or not photometric.kornia_steps():
        assert torch.equal(seen[0][2:], plain)
    else:
        assert (seen[0][2:] - plain).abs().max() > 0.05
