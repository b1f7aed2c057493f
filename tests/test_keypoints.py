"""Global token ranking, augmented keypoint extraction, source-pixel mapping, context import."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lightning_modules.augmentation import AffineAugmentation
from lightning_modules.keypoints import (
    augmented_keypoints,
    inside_region,
    locate_peaks,
    rank_keypoint_tokens,
    region_mask,
    to_source_pixels,
)
from lightning_modules.detector import load_context


def test_rank_keypoint_tokens_counts_selections():
    selections = torch.tensor([[3, 1, 4], [1, 5, 9], [2, 6, 5], [3, 5, 8]])
    tokens, counts = rank_keypoint_tokens(selections, num_tokens=10, top_k=4)
    assert counts.tolist() == [0, 2, 1, 2, 1, 3, 1, 0, 1, 1]
    # 5 (3 times), then 1 and 3 (twice, lower index first), then 2 (once, lowest index).
    assert tokens.tolist() == [5, 1, 3, 2]


def _dot_images(points: list[tuple[float, float]], size: int) -> torch.Tensor:
    images = torch.zeros(len(points), 3, size, size)
    for i, (x, y) in enumerate(points):
        images[i, :, int(y * size), int(x * size)] = 1.0
    return images


def _identity_model(resolution: int):
    """A 'model' whose token 0 map is the image's brightness and token 1 its inverse."""

    def maps_of(images: torch.Tensor, generators=None) -> torch.Tensor:
        heat = F.interpolate(images[:, :1], size=(resolution, resolution), mode="area")
        heat = F.avg_pool2d(heat, 3, 1, 1)  # a blob, as attention maps are
        return torch.cat([heat, 1 - heat], dim=1)

    return maps_of


def test_augmented_extraction_recovers_a_planted_blob():
    size = 64
    planted = [(0.30, 0.55), (0.62, 0.41), (0.5, 0.5)]
    images = _dot_images(planted, size)
    keypoints = augmented_keypoints(
        _identity_model(32), images, torch.tensor([0]), AffineAugmentation(), iterations=8,
        generators=[torch.Generator().manual_seed(i) for i in range(3 * 8)],
    )
    expected = torch.tensor(planted)[:, None] + 0.5 / size
    assert keypoints.shape == (3, 1, 2)
    assert (keypoints - expected).abs().max() < 2.5 / size


def test_batched_extraction_equals_one_image_at_a_time():
    size = 32
    images = _dot_images([(0.25, 0.75), (0.7, 0.3)], size)
    seen_batches = []

    def maps_of(x, generators):
        seen_batches.append(len(x))
        return _identity_model(16)(x)

    def generators(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    together = augmented_keypoints(maps_of, images, torch.tensor([0, 1]), AffineAugmentation(), 5, generators(range(10)))
    chunked = augmented_keypoints(maps_of, images, torch.tensor([0, 1]), AffineAugmentation(), 5, generators(range(10)),
                                  chunk_size=1)
    torch.testing.assert_close(together, chunked)
    assert seen_batches[0] == 10 and seen_batches[1:] == [1] * 10
    # Image 1 alone, with its own 5 generators, gets what it got beside image 0.
    alone = augmented_keypoints(maps_of, images[1:], torch.tensor([0, 1]), AffineAugmentation(), 5, generators(range(5, 10)))
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="9 generators for 2 images x 5 augmentations"):
        augmented_keypoints(maps_of, images, torch.tensor([0]), AffineAugmentation(), 5, generators(range(9)))


def test_each_warped_image_draws_its_transform_and_then_its_noise_from_its_own_generator():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noises = []

    def maps_of(x, generators):
        noises.append(torch.stack([torch.randn(3, generator=g) for g in generators]))
        return _identity_model(8)(x)

    augmentation = AffineAugmentation()
    augmented_keypoints(maps_of, images, torch.tensor([0]), augmentation, 2,
                        [torch.Generator().manual_seed(s) for s in (7, 8, 9, 10)], chunk_size=3)
    for row, seed in enumerate((7, 8, 9, 10)):
        generator = torch.Generator().manual_seed(seed)
        augmentation.sample(1, generator)
        torch.testing.assert_close(torch.cat(noises)[row], torch.randn(3, generator=generator), rtol=0, atol=0)


def test_locate_peaks_argmax_and_soft_argmax():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, 4, 6] = 1.0
    maps[0, 0, 4, 7] = 1.0  # a two-pixel plateau: argmax takes the first, soft-argmax the middle
    torch.testing.assert_close(locate_peaks(maps)[0, 0], torch.tensor([6.5 / 10, 4.5 / 10]))
    soft = locate_peaks(maps, soft_argmax_window_px=5)[0, 0]
    torch.testing.assert_close(soft, torch.tensor([7.0 / 10, 4.5 / 10]))


def test_region_mask_keeps_pixel_centres_inside():
    mask = region_mask(torch.tensor([[0.0, 0.25, 1.0, 0.75], [0.45, 0.0, 0.46, 1.0]]), 4, 10)
    assert mask.shape == (2, 1, 4, 10)
    assert mask[0, 0, :, 0].tolist() == [False, True, True, False]  # row centres 0.125, 0.375, 0.625, 0.875
    assert mask[0, 0, 1:3].all() and not mask[0, 0, [0, 3]].any()
    # Thinner than a pixel: the pixel at its centre (0.455 -> column 4) is kept.
    assert mask[1, 0, 0].nonzero().flatten().tolist() == [4]


def test_locate_peaks_restricted_to_the_valid_region():
    maps = torch.zeros(1, 2, 10, 10)
    maps[0, :, 0, 5] = 2.0  # the strongest peak, in the padding (row 0)
    maps[0, 0, 3, 2] = 1.0  # a weaker one on the photo
    maps[0, 1, 2, 7] = 1.0  # next to the border: the soft-argmax window reaches the padding
    maps[0, 1, 1, 7] = 1.0
    valid = region_mask(torch.tensor([[0.0, 0.2, 1.0, 0.8]]), 10, 10)  # rows 2..7
    torch.testing.assert_close(locate_peaks(maps)[0, 0], torch.tensor([0.55, 0.05]))
    torch.testing.assert_close(locate_peaks(maps, valid=valid)[0, 0], torch.tensor([0.25, 0.35]))
    # Soft-argmax: without the mask, row 1 (padding) pulls the point up to y = 2.0 px.
    torch.testing.assert_close(locate_peaks(maps, 3, valid)[0, 1], torch.tensor([0.75, 0.25]))


def test_panorama_keypoints_stay_on_the_photo():
    """A 1200 x 300 panorama padded to a square: 3/8 of the square above and below is padding.

    The model's maps peak in the padding for most tokens; restricted, every point is inside."""
    size = 32
    region = torch.tensor([[0.0, 0.375, 1.0, 0.625]])  # image_region of 1200 x 300 in its square
    peaks = [(0.1, 0.1), (0.5, 0.9), (0.8, 0.2), (0.3, 0.5), (0.6, 0.05)]  # 4 of 5 in the padding

    def maps_of(images: torch.Tensor, generators) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="ij")
        blobs = [torch.exp(-((xs - 16 * x) ** 2 + (ys - 16 * y) ** 2) / 8) for x, y in peaks]
        # A faint ramp keeps the photo's rows distinguishable where every blob is far.
        return (torch.stack(blobs) + 1e-3 * ys / 16).expand(len(images), -1, -1, -1)

    images = torch.zeros(1, 3, size, size)
    tokens = torch.arange(len(peaks))
    common = dict(augmentation=AffineAugmentation(degrees=0, translate_frac=0, scale=(1.0, 1.0)), iterations=2,
                  generators=[torch.Generator().manual_seed(i) for i in range(2)])
    free = augmented_keypoints(maps_of, images, tokens, **common)
    restricted = augmented_keypoints(maps_of, images, tokens, regions=region, **common)
    assert inside_region(free, region)[0].tolist() == [False, False, False, True, False]
    assert inside_region(restricted, region).all()
    assert restricted[0, 3].tolist() == free[0, 3].tolist()  # the point already inside does not move


def test_to_source_pixels_with_crop_box_and_flip():
    keypoints = torch.tensor([[[0.25, 0.5]], [[0.25, 0.5]]])
    box = torch.tensor([[100.0, 50.0, 300.0, 250.0], [100.0, 50.0, 300.0, 250.0]])
    pixels = to_source_pixels(keypoints, box, torch.tensor([False, True]))
    assert pixels[0, 0].tolist() == [150.0, 150.0]
    assert pixels[1, 0].tolist() == [250.0, 150.0]


def test_load_context_from_stablekeypoints_files(tmp_path):
    context = torch.randn(1, 20, 32)
    torch.save(context, tmp_path / "embedding.pt")
    torch.save(torch.tensor([4, 2, 7]), tmp_path / "indices.pt")
    loaded, tokens = load_context(str(tmp_path / "embedding.pt"), str(tmp_path / "indices.pt"))
    torch.testing.assert_close(loaded, context[0])
    assert tokens.tolist() == [4, 2, 7]
    save_file({"context": context[0], "keypoint_tokens": torch.tensor([1, 0])}, str(tmp_path / "e.safetensors"))
    loaded, tokens = load_context(str(tmp_path / "e.safetensors"))
    assert tokens.tolist() == [1, 0] and loaded.shape == (20, 32)


def test_predict_step_restricts_to_the_photo_unless_told_not_to(tiny_sd_module, monkeypatch):
    """The module's predict_within_image flag, both ways, on a 1200 x 300 panorama's square."""
    from data.crop import image_region

    module = tiny_sd_module
    monkeypatch.setitem(module._buffers, "keypoint_tokens", torch.tensor([0, 1, 2, 3]))  # a buffer: setattr would be undone by delattr
    box = (0.0, -450.0, 1200.0, 750.0)  # the panorama centred in its 1200 x 1200 square
    batch = {
        "image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        "path": ["panorama.jpg"],
        "sample_key": torch.tensor([0]),
        "crop_box": torch.tensor([box]),
        "flipped": torch.tensor([False]),
        "image_region": image_region(box, 1200, 300)[None],
    }
    monkeypatch.setitem(module.hparams, "augmentation_iterations", 2)
    monkeypatch.setitem(module.hparams, "predict_within_image", False)
    free = module.predict_step(batch, 0)
    monkeypatch.setitem(module.hparams, "predict_within_image", True)
    restricted = module.predict_step(batch, 0)
    assert not free["inside"].all()  # the tiny random model's peaks fall in the padding
    assert restricted["inside"].all()
    y = restricted["keypoints_px"][0, :, 1]
    assert ((y >= 0) & (y <= 300)).all()  # pixels of the photo
    torch.testing.assert_close(inside_region(free["keypoints"], batch["image_region"]), free["inside"])
