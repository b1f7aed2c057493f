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
- ``source_size``: int64 (2,) ``(width, height)`` of the source image in pixels, upright (EXIF
  orientation applied, see ``data.images``): the frame of ``crop_box``.
- ``image_region``: float32 (4,) ``(x0, y0, x1, y1)`` normalized to [0, 1] over ``image``: the part of
  it that shows the source image (the rest is fill); ``(0, 0, 1, 1)`` when the crop lies inside.
- labelled datasets add ``keypoints``: float32 (J, 2) in (x, y) order, normalized to [0, 1] over
  the width and height of ``image`` (continuous coordinates: pixel i spans [i/S, (i+1)/S)), and
  ``visible``: bool (J,). Invisible keypoints hold (0, 0).

Normalized (x, y) with x along the width is the one convention for points everywhere in the
project: datasets, keypoint extraction, the regressor, metrics and the files ``predict`` writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import kornia
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import Metric

from data.decode_check import find_unreadable
from data.images import GRAY_RGB
from lightning_modules.errors import ConfigError, MissingFileError

if TYPE_CHECKING:
    from lightning_modules.regressor import LinearKeypointRegressor

#: The splits each stage reads (``predict`` without ``path`` reads the test split).
STAGE_SPLITS = {"fit": ("train", "regression"), "test": ("regression", "test"), "predict": ("test",)}
#: Unreadable files listed in full in an error or warning; the rest are counted.
_LISTED_FILES = 20

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
        background_rgb: 0-255 colour that transparent pixels (RGBA, LA, palette transparency) are
            composited on; gray (127, 127, 127) suits zero123plus and is neutral for SD.
        skip_unreadable: files of a split that cannot be decoded (truncated, corrupt, empty) are
            left out and listed in a warning (and in ``unreadable``), instead of stopping the run
            at set-up with their list. Every image of the splits a stage reads is decode-checked at
            set-up either way (cached, see ``data.decode_check``).
    """

    #: Names of the J ground-truth keypoints, in the order of ``keypoints``; empty when unlabelled.
    keypoint_names: tuple[str, ...] = ()

    def __init__(
        self,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        path: str | None = None,
        background_rgb: tuple[int, int, int] = GRAY_RGB,
        skip_unreadable: bool = False,
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
        if len(background_rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in background_rgb):
            raise ConfigError(f"data.background_rgb={list(background_rgb)}: give three 0-255 integers, e.g. [127, 127, 127].")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.path = path
        #: Set by ``callbacks.prediction_writer.KeypointWriter``: returns the source paths that already
        #: have keypoints (a resumed ``predict``); called once when the predict loader is built.
        self.exclude_from_predict: Callable[[], Collection[str]] | None = None
        self.background_rgb = tuple(background_rgb)
        self.skip_unreadable = skip_unreadable
        #: (path, reason) of every file left out because it could not be decoded.
        self.unreadable: list[tuple[Path, str]] = []
        self._checked: list[Dataset] = []
        self._path_dataset: Dataset | None = None

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

    def fit_regressor(self, keypoints: torch.Tensor, targets: torch.Tensor, visible: torch.Tensor) -> LinearKeypointRegressor:
        """keypoints (N, K, 2), targets (N, J, 2), visible (N, J) of the regression split -> the fitted regressor.

        The dataset's regression protocol (SPEC section 7): least squares on the visible rows of
        each keypoint; Human3.6M overrides it with the orientation-invariant fit.
        """
        from lightning_modules.regressor import LinearKeypointRegressor

        return LinearKeypointRegressor.fit(keypoints, targets, visible)

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
            dataset = self.test_dataset()
        else:
            dataset = self.path_dataset()
        if self.exclude_from_predict is not None:
            # Before Lightning's distributed sampler splits the dataset: the ranks share out only what is left.
            dataset = without_paths(dataset, set(self.exclude_from_predict()))
        return self._loader(dataset, shuffle=False)

    def path_dataset(self) -> Dataset:
        """The images of ``path`` for ``predict`` (built and checked once)."""
        if self._path_dataset is None:
            from data.folder import ImageFolderDataset

            self._path_dataset = self.checked(
                ImageFolderDataset(self.path, self.image_size, background_rgb=self.background_rgb), "predict"
            )
        return self._path_dataset

    def checked(self, dataset: Dataset, split: str) -> Dataset:
        """``dataset`` if all its images decode, else (``skip_unreadable``) the Subset of those that do.

        ``dataset`` must offer ``image_path(index)``. Without ``skip_unreadable`` an unreadable
        file is a ``ConfigError`` listing them, raised at set-up, before any weights load.
        """
        if any(dataset is done for done in self._checked):
            return dataset
        files = [dataset.image_path(i) for i in range(len(dataset))]
        bad = find_unreadable(files, f"Checking {split} images")
        if bad:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:_LISTED_FILES])
            if len(bad) > _LISTED_FILES:
                listing += f"\n  ... and {len(bad) - _LISTED_FILES} more"
            if len(bad) == len(files) or not self.skip_unreadable:
                raise ConfigError(
                    f"{len(bad)} of the {len(files)} images of the {split} split cannot be decoded:\n{listing}\n"
                    "Replace or delete them"
                    + ("." if len(bad) == len(files) else ", or set data.init_args.skip_unreadable=true to leave them out.")
                )
            rank_zero_warn(f"Skipping {len(bad)} unreadable images of the {split} split (skip_unreadable):\n{listing}")
            known = {path for path, _ in self.unreadable}
            self.unreadable += [(path, reason) for path, reason in bad if path not in known]
            bad_paths = {path for path, _ in bad}
            dataset = Subset(dataset, [i for i, path in enumerate(files) if path not in bad_paths])
        self._checked.append(dataset)
        return dataset


def without_paths(dataset: Dataset, paths: Collection[str]) -> Dataset:
    """``dataset`` without the samples whose source file is in ``paths`` (by ``image_path(index)``).

    The samples keep their ``index`` in the underlying dataset; ``dataset`` may be a ``Subset`` of
    one (the readable images). A dataset that cannot name a sample's file without loading it (no
    ``image_path``) is returned whole, with a warning.
    """
    if not paths:
        return dataset
    base, indices = dataset, list(range(len(dataset)))
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    image_path = getattr(base, "image_path", None)
    if image_path is None:
        rank_zero_warn(f"{type(base).__name__} has no image_path(index): the {len(paths)} images predicted "
                       "earlier are predicted again (the merged file still lists each once).")
        return dataset
    return Subset(base, [i for i in indices if str(image_path(i)) not in paths])


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


def pixels_to_unit(xy_px: np.ndarray, width: int, height: int) -> torch.Tensor:
    """xy_px: (J, 2) (x, y) pixel indices of a width x height image -> (J, 2) float32 in [0, 1].

    Annotations give the pixel a point lies on; its centre is at ``+ 0.5`` in the continuous
    coordinates of ``data.base`` (pixel i spans [i, i + 1)). A ground-truth point on pixel i thus
    maps to the same value as a detector's argmax on that pixel (SPEC section 5.2 uses pixel
    centres). SK divided by the size without the half pixel: a shift of half a source pixel.
    """
    xy = torch.as_tensor(xy_px, dtype=torch.float32)
    return (xy + 0.5) / torch.tensor([width, height], dtype=torch.float32)


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
