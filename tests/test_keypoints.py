"""Global token ranking, augmented keypoint extraction, source-pixel mapping, context import."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lightning_modules.augmentation import AffineAugmentation
from lightning_modules.keypoints import augmented_keypoints, locate_peaks, rank_keypoint_tokens, to_source_pixels
from lightning_modules.stable_keypoints import load_context


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
