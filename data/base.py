"""What every dataset returns and what every DataModule offers the LightningModule.

One sample is a dict:

- ``image``: float32 (3, S, S) RGB in [0, 1], S = ``image_size``.
- ``index``: int, position of the sample in its dataset.
- ``path``: str, the source image file.
- ``crop_box``: float32 (4,) ``(x0, y0, x1, y1)`` in pixels of the source image: the square region
  that was resized to S x S (it may extend past the image; the outside was filled). A point at
  normalized (x, y) of ``image`` lies at ``(x0 + x * (x1 - x0), y0 + y * (y1 - y0))`` in the source,
  or at ``x0 + (1 - x) * (x1 - x0)`` horizontally when ``flipped``.
- ``flipped``: bool, the sample was mirrored horizontally (training augmentation only).
- labelled datasets add ``keypoints``: float32 (J, 2) in (x, y) order, normalized to [0, 1] over
  the width and height of ``image`` (continuous coordinates: pixel i spans [i/S, (i+1)/S)), and
  ``visible``: bool (J,). Invisible keypoints hold (0, 0).

Normalized (x, y) with x along the width is the one convention for points everywhere in the
project: datasets, keypoint extraction, the regressor, metrics and the files ``predict`` writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from lightning_modules.errors import ConfigError, MissingFileError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class KeypointDataModule(L.LightningDataModule):
    """Base class of the project's DataModules.

    Stages and loaders:
    - ``fit``: ``train_dataloader`` (training split with augmentation, shuffled).
    - ``test``: ``test_dataloader`` returns two loaders run in order: the regression split (the
      regressor from keypoints to ground truth is fitted on it) and the test split (it is scored).
    - ``predict``: ``predict_dataloader`` over ``path`` (a folder or one image) when given, else
      over the test split.
    - ``keypoint_index_dataloader``: training images without augmentation, in a fixed order; the
      global keypoint tokens are ranked on its first ``num_indices`` images.

    Args:
        image_size: side S of the square images fed to the model, in pixels.
        batch_size: images per device and step; the effective batch is
            ``batch_size x devices x accumulate_grad_batches``.
        num_workers: DataLoader worker processes.
        path: images for ``predict``: a folder (searched recursively) or one image file.
    """

    #: Names of the J ground-truth keypoints, in the order of ``keypoints``; empty when unlabelled.
    keypoint_names: tuple[str, ...] = ()

    def __init__(
        self,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        path: str | None = None,
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % 8:
            raise ConfigError(f"data.image_size={image_size}: use a positive multiple of 8 (the VAE downsamples by 8).")
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size={batch_size}: it must be > 0 (images per device and step).")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers}: it must be >= 0 (0 loads in the main process).")
        if path is not None and not Path(path).exists():
            raise MissingFileError(f"data.path={path!r} does not exist: give a folder of images or one image file.")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.path = path

    # Subclasses build these three datasets in ``setup``.
    def train_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no training split.")

    def regression_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no labelled regression split: it cannot be used for `test`.")

    def test_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no labelled test split: it cannot be used for `test`.")

    def make_metric(self) -> Metric:
        """The dataset's evaluation metric (a torchmetrics ``Metric``: update(pred, target, visible))."""
        raise NotImplementedError(f"{type(self).__name__} defines no evaluation metric.")

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and shuffle,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), shuffle=True, drop_last=True)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.regression_dataset(), shuffle=False), self._loader(self.test_dataset(), shuffle=False)]

    def keypoint_index_dataloader(self) -> DataLoader:
        return self._loader(self.regression_dataset(), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.path is None:
            return self._loader(self.test_dataset(), shuffle=False)
        from data.folder import ImageFolderDataset

        return self._loader(ImageFolderDataset(self.path, self.image_size), shuffle=False)


def list_images(path: str | Path) -> list[Path]:
    """Image files under ``path`` (a folder, searched recursively, or one image), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingFileError(f"data.path={str(path)!r} does not exist: give a folder of images or one image file.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise MissingFileError(f"data.path={str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def require_file(path: Path, source: str) -> Path:
    """``path`` when it exists, else a FileNotFoundError naming it and where the data comes from."""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist. {source}")
    return path


def pixels_to_unit(xy_px: np.ndarray, width: int, height: int) -> torch.Tensor:
    """xy_px: (J, 2) (x, y) pixel indices of a width x height image -> (J, 2) float32 in [0, 1].

    Annotations give the pixel a point lies on; its centre is at ``+ 0.5`` in the continuous
    coordinates of ``data.base`` (pixel i spans [i, i + 1)). A ground-truth point on pixel i thus
    maps to the same value as a detector's argmax on that pixel (SPEC section 5.2 uses pixel
    centres). SK divided by the size without the half pixel: a shift of half a source pixel.
    """
    xy = torch.as_tensor(xy_px, dtype=torch.float32)
    return (xy + 0.5) / torch.tensor([width, height], dtype=torch.float32)


def crop_resize(image: Image.Image, box: Sequence[float], size: int, fill_rgb: tuple[int, int, int]) -> torch.Tensor:
    """(3, size, size) float32 in [0, 1]: the square ``box`` of ``image`` resized to ``size``.

    Args:
        image: RGB source image.
        box: ``(x0, y0, x1, y1)`` in continuous source pixels (pixel i spans [i, i + 1)); it may
            extend past the image, where ``fill_rgb`` is used.
        size: output side S in pixels; the output's continuous coordinate u maps to
            ``x0 + u * (x1 - x0) / S`` in the source.
        fill_rgb: 0-255 colour outside the image.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = math.floor(x0), math.floor(y0)
    canvas = Image.new("RGB", (math.ceil(x1) - left, math.ceil(y1) - top), tuple(fill_rgb))
    canvas.paste(image, (-left, -top))
    # Resampling from the float box keeps sub-pixel geometry exact and antialiases when shrinking.
    resized = canvas.resize((size, size), Image.Resampling.BILINEAR, box=(x0 - left, y0 - top, x1 - left, y1 - top))
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
