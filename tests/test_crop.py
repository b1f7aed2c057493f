"""The data-side crop on kornia: one matrix for the pixels and the points, antialiasing, fill, mirror."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from data.crop import crop_matrix, crop_points, crop_resize, image_tensor
def _photo_like(height: int, width: int, seed: int = 0) -> Image.Image:
    """1/f noise (the spectrum of natural images) with a hard-edged patch, 8-bit RGB."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(height, width))
    channels = [np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((height, width))))) for _ in range(3)]
    x = np.stack([(c - c.mean()) / c.std() for c in channels], -1) * 0.18 + 0.5
    x[height // 3 : height // 2, width // 4 : width // 2] = (0.9, 0.2, 0.1)
    return Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8))


def _pil_crop_resize(image: Image.Image, box, size: int) -> torch.Tensor:
    """The previous implementation: paste on a black canvas, PIL's bilinear box resize (antialiased)."""
    left, top = math.floor(box[0]), math.floor(box[1])
    canvas = Image.new("RGB", (math.ceil(box[2]) - left, math.ceil(box[3]) - top))
    canvas.paste(image, (-left, -top))
    resized = canvas.resize((size, size), Image.Resampling.BILINEAR, box=(box[0] - left, box[1] - top, box[2] - left, box[3] - top))
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)


def test_crop_matches_pil_box_resize_on_a_photo_like_image():
    photo = _photo_like(300, 400)
    for box, size in (((30.3, -10.7, 350.3, 309.3), 64), ((150.25, 100.6, 190.25, 140.6), 64)):  # shrink x5, grow x1.6
        difference = (crop_resize(image_tensor(photo), box, size, (0, 0, 0)) - _pil_crop_resize(photo, box, size)).abs()
        assert difference.mean() < 0.01 and difference.max() < 0.15


def test_shrinking_antialiases():
    """A one-pixel checkerboard shrunk x3 is a flat gray: bilinear sampling alone, which lands on
    whole pixels at x3, would return the checkerboard itself."""
    checker = ((torch.arange(192)[:, None] + torch.arange(192)[None]) % 2).float().expand(3, -1, -1)
    out = crop_resize(checker, (0, 0, 192, 192), 64, (0, 0, 0))
    assert (out - 0.5).abs().max() < 0.02


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("box", [(3.3, 10.7, 163.3, 170.7), (40.2, 31.9, 88.2, 79.9), (-30.5, -12.25, 150.5, 168.75)])
def test_one_hot_pixel_lands_on_its_transformed_point(box, mirror):
    size = 64
    for x, y in ((50, 60), (70, 41), (45, 75)):
        image = torch.zeros(3, 120, 140)
        image[:, y, x] = 1.0
        out = crop_resize(image, box, size, (0, 0, 0), mirror=mirror)
        point = crop_points(torch.tensor([[x, y]]), crop_matrix(box, size, mirror), size)[0]
        iy, ix = divmod(int(out.sum(0).argmax()), size)
        assert abs((ix + 0.5) / size - point[0]) <= 1 / size and abs((iy + 0.5) / size - point[1]) <= 1 / size
        # the continuous coordinate of data.base: source x + 0.5 at x0 + u (x1 - x0), mirrored x1 - u (x1 - x0)
        x0, y0, x1, y1 = box
        u = (x + 0.5 - x0) / (x1 - x0)
        assert point[0].item() == pytest.approx(1 - u if mirror else u, abs=1e-6)
        assert point[1].item() == pytest.approx((y + 0.5 - y0) / (y1 - y0), abs=1e-6)


def test_mirror_is_the_flipped_crop_and_outside_is_filled():
    image = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(0))
    box = (-10.5, 5.25, 60.5, 76.25)  # 10.5 px past the left edge
    plain = crop_resize(image, box, 32, (255, 0, 127))
    torch.testing.assert_close(crop_resize(image, box, 32, (255, 0, 127), mirror=True), plain.flip(-1), rtol=0, atol=1e-5)
    # 10.5 / 71 of 32 px is 4.7 columns of fill on the left.
    torch.testing.assert_close(plain[:, :, :4], torch.tensor([1.0, 0.0, 127 / 255]).view(3, 1, 1).expand(3, 32, 4))
