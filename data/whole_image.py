"""Datasets whose samples are whole source images resized to S x S (CelebA, Tai-Chi-HD,
DeepFashion, Human3.6M), and the DataModule base that builds their splits lazily."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from data.base import KeypointDataModule, STAGE_SPLITS, require_file

from data.crop import crop_resize, image_region, image_tensor

from data.sampling import SampleKey, sample_draws
from data.images import GRAY_RGB, read_image


class WholeImageDataset(Dataset):
    """Images resized whole to S x S (no crop), optionally mirrored; subclasses add labels.

    Each sample follows ``data.base``: ``image`` (3, S, S) in [0, 1], ``crop_box`` the whole source
    image ``(0, 0, W, H)`` in pixels. ``flip_prob`` mirrors unlabelled training images only (the
    labelled subclasses never pass it: a mirrored label would also need its left/right swap).
    """

    def __init__(
        self,
        files: Sequence[Path],
        image_size: int,
        source: str,
        flip_prob: float = 0.0,
        background_rgb: tuple[int, int, int] = GRAY_RGB,
    ) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.source = source
        self.flip_prob = flip_prob
        self.background_rgb = background_rgb

    def __len__(self) -> int:
        return len(self.files)

    def image_path(self, index: int) -> Path:
        return self.files[index]

    def _load(self, index: int, mirror: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        """(image (3, S, S) in [0, 1], mirrored when ``mirror``; (W, H) of the upright source image in pixels)."""
        pixels = image_tensor(read_image(require_file(self.files[index], self.source), self.background_rgb))
        height, width = pixels.shape[-2:]
        return crop_resize(pixels, (0, 0, width, height), self.image_size, (0, 0, 0), mirror=mirror), (width, height)

    def _labels(self, index: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keypoints (J, 2) (x, y) in [0, 1], visible (J,) bool) of sample ``index``; None when unlabelled."""
        return None

    def sample_flip(self, generator: torch.Generator) -> bool:
        """One sample's random mirror, with probability ``flip_prob``."""
        return bool(torch.rand((), generator=generator) < self.flip_prob)

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, generator = sample_draws(key)
        flipped = self.sample_flip(generator)
        image, (width, height) = self._load(index, mirror=flipped)
        sample = {
            "image": image,
            "index": index,
            "sample_key": index,
            "path": str(self.files[index]),
            "crop_box": torch.tensor([0.0, 0.0, width, height]),
            "flipped": flipped,
            "source_size": torch.tensor([width, height]),
            "image_region": image_region((0, 0, width, height), width, height, flipped),
        }
        labels = self._labels(index, width, height)
        if labels is not None:
            keypoints, visible = labels
            sample["keypoints"] = keypoints.masked_fill(~visible[:, None], 0.0)
            sample["visible"] = visible
        return sample


class SplitsDataModule(KeypointDataModule):
    """Builds each split once, on first use; ``setup`` builds the splits its stage needs.

    Building in ``setup`` makes a missing or unreadable file fail before the model loads its weights.
    """

    _STAGE_SPLITS = STAGE_SPLITS

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._datasets: dict[str, Dataset] = {}

    def _build(self, split: Literal["train", "regression", "test"]) -> Dataset:
        raise NotImplementedError

    def _split(self, split: Literal["train", "regression", "test"]) -> Dataset:
        if split not in self._datasets:
            dataset = self._build(split)
            if isinstance(dataset, WholeImageDataset):
                dataset.background_rgb = self.background_rgb  # one setting for every split's reader
            self._datasets[split] = self.checked(dataset, split)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.path is not None:
            self.path_dataset()
        else:
            for split in ("train", "regression", "test") if stage is None else self._STAGE_SPLITS.get(stage, ()):
                self._split(split)
        self.check_stage(stage)

    def train_dataset(self) -> Dataset:
        return self._split("train")

    def regression_dataset(self) -> Dataset:
        return self._split("regression")

    def test_dataset(self) -> Dataset:
        return self._split("test")
