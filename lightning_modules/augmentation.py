"""The random affine augmentation of the equivariance loss and its inverse on attention maps, on kornia.

A transform is a (B, 3, 3) float64 matrix in kornia's convention (``warp_affine``'s ``M``: it maps
a point of the original image to its place in the transformed image), expressed in the normalized
frame of ``kornia.geometry.conversions.normalize_homography(..., align_corners=False)``: x and y
in [-1, 1] over the image's outer pixel edges, the convention of StableKeypoints' ``affine_grid``.
In that frame one matrix describes the transform at every resolution; each warp converts it
explicitly, in float64, to kornia's pixel matrix of the tensor it warps (``pixel_matrix``), so the
512 px image and the 128 px maps are warped by exactly the same geometric transform.

The parameters are drawn here, not by ``kornia.augmentation.RandomAffine``, because its sampler
cannot give StableKeypoints' distribution: SK draws the *sampling grid's* scale s ~ U(0.8, 1.0)
(content zoom 1/s, not uniform) and its translation t ~ U(-0.25, 0.25) in grid units before the
rotation and zoom (the image's shift -R t / s is a rotated, scaled box, not kornia's uniform box);
kornia's samplers also draw from the global RNG, while every draw here comes from the generator
passed in. kornia builds the matrices (``get_affine_matrix2d``, ``get_translation_matrix2d``),
converts them between frames (``normalize_homography``/``denormalize_homography``), warps
(``warp_affine``) and moves points (``transform_points``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.geometry.conversions import denormalize_homography
from kornia.geometry.linalg import transform_points as kornia_transform_points
from kornia.geometry.transform import get_affine_matrix2d, get_translation_matrix2d, warp_affine
from torch import Tensor

from lightning_modules.app.errors import ConfigError


@dataclass
class AffineAugmentation:
    """Ranges of the random affine transform (docs/method.md section 4).

    Args:
        degrees: rotation drawn from U(-degrees, degrees).
        translate_frac: translation drawn from U(-t, t) as a fraction of the image width/height
            (0.125 = 0.25 ``affine_grid`` units, StableKeypoints' setting).
        scale: ``(low, high)`` of s ~ U(low, high); the sampling grid is scaled by s, so the content
            is zoomed by 1/s (kornia's ``scale=(1/high, 1/low)``, though not uniform in the zoom).
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
        """-> (B, 3, 3) float64 normalized forward transforms, one per image (see the module docstring)."""
        u = torch.rand(batch_size, 4, generator=generator, device=device).double()
        angle_deg = (2 * u[:, 0] - 1) * self.degrees
        low, high = self.scale
        s = low + (high - low) * u[:, 1]
        shift = (2 * u[:, 2:] - 1) * 2 * self.translate_frac  # fraction of the size -> [-1, 1] units
        return affine_matrix(angle_deg, s, shift)


def affine_matrix(angle_deg: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(B,), (B,), (B, 2) -> (B, 3, 3) float64 normalized forward transform of StableKeypoints' grid.

    SK samples the input at ``s R(-a) p + t`` for each output location p (normalized units); the
    image therefore moves by the inverse: translate by -t, then rotate by a and zoom by 1/s about
    the centre (the origin of the normalized frame).
    """
    angle_deg, scale, shift = angle_deg.double(), scale.double(), shift.double()
    origin = torch.zeros_like(shift)
    zoom = (1 / scale)[:, None].expand(-1, 2)
    rotate_zoom = get_affine_matrix2d(translations=origin, center=origin, scale=zoom, angle=angle_deg)
    return rotate_zoom @ get_translation_matrix2d(-shift)


def pixel_matrix(transform: Tensor, size: tuple[int, int]) -> Tensor:
    """transform: (B, 3, 3) normalized -> kornia's (B, 3, 3) pixel matrix for (H, W) images, float64.

    Pixel centres at integers, the image spanning [-0.5, W - 0.5] (align_corners=False), the
    convention of ``warp_affine(..., align_corners=False)``.
    """
    size = (int(size[0]), int(size[1]))
    return denormalize_homography(transform.double(), size, size, align_corners=False)


def warp(x: Tensor, transform: Tensor, mode: str = "bilinear") -> Tensor:
    """x: (B, C, H, W), transform: (B, 3, 3) normalized -> x transformed; zeros outside the frame."""
    size = (x.shape[-2], x.shape[-1])
    # The matrix is exact in float64; the warp runs in x's dtype (kornia samples in the input dtype).
    matrix = pixel_matrix(transform, size)[:, :2].to(x.dtype)
    return warp_affine(x, matrix, size, mode=mode, padding_mode="zeros", align_corners=False)


def invert(transform: Tensor) -> Tensor:
    """(B, 3, 3) -> the inverse transforms, in float64."""
    return torch.linalg.inv(transform.double())


def unwarp(x: Tensor, transform: Tensor, mode: str = "bilinear") -> Tensor:
    """Inverse of ``warp``: brings maps of a transformed image back to the original's frame."""
    return warp(x, invert(transform), mode=mode)


def transform_points(points: Tensor, transform: Tensor) -> Tensor:
    """points: (B, N, 2) normalized (x, y) in [0, 1] of the original -> their position after ``warp``.

    [0, 1] over the image is [-1, 1] of the normalized frame (pixel i spans [i/S, (i+1)/S)).
    """
    moved = kornia_transform_points(transform.double(), points.double() * 2 - 1)
    return ((moved + 1) / 2).to(points.dtype)


@dataclass
class PhotometricAugmentation:
    """Colour changes of the equivariance pair's transformed copy (opt-in; no reference trains with them).

    The tokens then have to find the same point under other colours, blur or none, as well as
    under the affine transform. kornia's ``ColorJitter``, ``RandomGrayscale`` and
    ``RandomGaussianBlur`` apply them, in that order, each to a random subset of the batch.
    All zeros (the default) is off.

    Args:
        brightness: ColorJitter's brightness factor drawn from U(1 - b, 1 + b).
        contrast: ColorJitter's contrast factor drawn from U(1 - c, 1 + c).
        saturation: ColorJitter's saturation factor drawn from U(1 - s, 1 + s).
        hue: ColorJitter's hue shift drawn from U(-h, h) turns (at most 0.5).
        jitter_p: probability that an image is colour-jittered (when any of the four is non-zero).
        grayscale_p: probability that an image is made gray.
        blur_p: probability that an image is blurred.
        blur_sigma_px: ``(low, high)`` of the blur's sigma, in pixels of the image.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma_px: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:  # NaN fails too
                raise ConfigError(f"model.photometric.{name}={getattr(self, name)}: a probability is in [0, 1].")
        for name in ("brightness", "contrast", "saturation", "hue"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= (0.5 if name == "hue" else math.inf)):
                raise ConfigError(f"model.photometric.{name}={value}: it must be finite and >= 0 (hue at most 0.5 turns).")
        low, high = self.blur_sigma_px
        if not (math.isfinite(high) and 0 < low <= high):
            raise ConfigError(f"model.photometric.blur_sigma_px={self.blur_sigma_px}: need 0 < low <= high.")

    def kornia_steps(self) -> list:
        """The kornia augmentations this configuration applies, in order (empty: off)."""
        import kornia.augmentation as K

        steps = []
        if self.jitter_p and max(self.brightness, self.contrast, self.saturation, self.hue) > 0:
            steps.append(K.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue, p=self.jitter_p))
        if self.grayscale_p:
            steps.append(K.RandomGrayscale(p=self.grayscale_p))
        if self.blur_p:
            low, high = self.blur_sigma_px
            kernel = 2 * math.ceil(3 * high) + 1  # covers +-3 sigma of the widest blur
            steps.append(K.RandomGaussianBlur((kernel, kernel), (low, high), p=self.blur_p))
        return steps

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images: (B, 3, H, W) in [0, 1] -> the same, colour-augmented; nothing drawn when off.

        kornia's augmentations draw their parameters from the global CPU RNG. To keep every draw
        a function of the step's generator (and leave the global RNG alone), one seed is drawn
        from ``generator``, kornia's own samplers run under it in a forked CPU RNG
        (``forward_parameters``), and each augmentation is applied with those ``params=``.
        """
        steps = self.kornia_steps()
        if not steps:
            return images
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params = [step.forward_parameters(images.shape) for step in steps]
        for step, step_params in zip(steps, params):
            images = step(images, params={k: v.to(images.device) if torch.is_tensor(v) else v for k, v in step_params.items()})
        return images
