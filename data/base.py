"""What every dataset returns and what every DataModule offers the LightningModule.

One sample is a dict:

- ``image``: float32 (3, S, S) RGB in [0, 1], S = ``image_size``.
- ``index``: int, position of the sample in its dataset.
- ``sample_key``: int, the identity that seeds the sample's keypoint-extraction noise and transforms
  (``StableKeypoints.extraction_generators``): ``index`` in labelled splits, a hash of the file's bytes
  in an image folder, so an image's keypoints do not depend on its position, name or batch.
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

A dataset is indexed by an int or by the ``SampleKey`` (index, epoch, seed) a training sampler yields;
its random augmentation (crop jitter, mirror) is drawn from ``seeded_generator(seed, AUGMENTATION,
epoch, index)`` and nothing else, so a sample's augmentation is the same whatever the worker, batch
or resume. A plain int draws as epoch 0 with seed 0.

Normalized (x, y) with x along the width is the one convention for points everywhere in the
project: datasets, keypoint extraction, the regressor, metrics and the files ``predict`` writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import kornia
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchmetrics import Metric

from data.decode_check import find_unreadable
from data.images import GRAY_RGB
from lightning_modules.errors import ConfigError, MissingFileError
from lightning_modules.seeding import Draw, seeded_generator

if TYPE_CHECKING:
    from lightning_modules.regressor import LinearKeypointRegressor

#: The splits each stage reads (``predict`` without ``path`` reads the test split).
STAGE_SPLITS = {"fit": ("train", "regression"), "test": ("regression", "test"), "predict": ("test",)}
#: Unreadable files listed in full in an error or warning; the rest are counted.
_LISTED_FILES = 20

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _listing(bad: list[tuple[str, str]]) -> str:
    """The first ``_LISTED_FILES`` unreadable files with their reasons, one per line, and how many more."""
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:_LISTED_FILES])
    if len(bad) > _LISTED_FILES:
        listing += f"\n  ... and {len(bad) - _LISTED_FILES} more"
    return listing


class KeypointDataModule(L.LightningDataModule):
    """Base class of the project's DataModules.

    Stages and loaders:
    - ``fit``: ``train_dataloader`` (training split with augmentation, shuffled by ``seed`` and the
      epoch; a ``ResumableDataLoader``, so a run resumed from a mid-epoch checkpoint sees the samples
      and augmentations the uninterrupted run would have).
    - ``test``: ``test_dataloader`` returns two loaders run in order: the regression split (the
      regressor from keypoints to ground truth is fitted on it) and the test split (it is scored).
    - ``predict``: ``predict_dataloader`` over ``path`` (a folder or one image) when given, else
      over the test split.
    - ``keypoint_index_dataloader``: training images without augmentation (``ranking_dataset``); the
      global keypoint tokens are ranked on ``num_indices`` of them drawn at random (SPEC 5.1).

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
        seed: seed of the training data order and of the per-sample augmentation draws.
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
        seed: int = 0,
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
        self.seed = seed

    # Subclasses build these three datasets in ``setup``.
    def train_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no training split.")

    def regression_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no labelled regression split: it cannot be used for `test`.")

    def test_dataset(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} has no labelled test split: it cannot be used for `test`.")

    def ranking_dataset(self) -> Dataset:
        """Training images without augmentation, from which the keypoint tokens' images are drawn.

        The regression split by default: in every labelled dataset here it holds training images.
        """
        return self.regression_dataset()

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
        trainer = self.trainer
        sampler = ResumableSampler(
            self.train_dataset(),
            self.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        return ResumableDataLoader(
            sampler.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.regression_dataset(), shuffle=False), self._loader(self.test_dataset(), shuffle=False)]

    def keypoint_index_dataloader(self, num_images: int | None = None, seed: int = 0) -> DataLoader:
        """``ranking_dataset``'s images: ``num_images`` of them drawn by ``ranking_indices(.., seed)``,
        or all of them in order when ``num_images`` is None."""
        dataset = self.ranking_dataset()
        if num_images is not None:
            dataset = Subset(dataset, ranking_indices(num_images, len(dataset), seed))
        return self._loader(dataset, shuffle=False)

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
            if len(bad) == len(files) or not self.skip_unreadable:
                raise ConfigError(
                    f"{len(bad)} of the {len(files)} images of the {split} split cannot be decoded:\n{_listing(bad)}\n"
                    "Replace or delete them"
                    + ("." if len(bad) == len(files) else ", or set data.init_args.skip_unreadable=true to leave them out.")
                )
            known = {path for path, _ in self.unreadable}
            new = [(path, reason) for path, reason in bad if path not in known]
            if new:  # a split sharing files with one checked before (train, regression) says nothing new
                rank_zero_warn(f"Skipping {len(new)} unreadable images of the {split} split (skip_unreadable):\n"
                               f"{_listing(new)}")
            self.unreadable += new
            bad_paths = {path for path, _ in bad}
            dataset = SampleSubset(dataset, [i for i, path in enumerate(files) if path not in bad_paths])
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
    return SampleSubset(base, [i for i in indices if str(image_path(i)) not in paths])


class SampleKey(NamedTuple):
    """What ``ResumableSampler`` yields: a sample and the epoch and seed of its augmentation draws."""

    index: int
    epoch: int
    seed: int


def sample_draws(key: int | SampleKey) -> tuple[int, torch.Generator]:
    """The dataset index of ``key`` and the generator of that sample's augmentation draws.

    The generator is ``seeded_generator(seed, AUGMENTATION, epoch, index)``; a plain int is epoch 0, seed 0.
    """
    key = key if isinstance(key, tuple) else SampleKey(int(key), 0, 0)
    return key.index, seeded_generator(key.seed, Draw.AUGMENTATION, key.epoch, key.index)


class SampleSubset(Subset):
    """A ``Subset`` that also maps the index inside a ``SampleKey`` (a training sampler's keys), so
    the sample keeps the augmentation draws of its index in the underlying dataset."""

    def __getitem__(self, key: int | SampleKey):
        if isinstance(key, tuple):
            return self.dataset[key._replace(index=self.indices[key.index])]
        return super().__getitem__(key)

    def __getitems__(self, keys: list) -> list:
        return [self[key] for key in keys]


class ResumableSampler(DistributedSampler):
    """The training order: a permutation drawn from ``(seed, DATA_ORDER, epoch)``, one shard per rank.

    It yields ``SampleKey``s, so a sample's augmentation travels with its index (DataLoader workers
    hold copies of the dataset that never learn the epoch otherwise). ``start`` skips the first
    samples of this rank's shard once (a resumed epoch); ``ResumableDataLoader`` sets it.
    A ``DistributedSampler``, so Lightning uses it as is under DDP instead of wrapping it; like
    torch's, it pads the shards to equal length with samples from the start of the permutation.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        order = torch.randperm(len(self.dataset), generator=seeded_generator(self.seed, Draw.DATA_ORDER, self.epoch))
        order = order.repeat(math.ceil(self.total_size / len(order)))[: self.total_size].tolist()
        shard = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0
        for index in shard[start:]:
            yield SampleKey(index, self.epoch, self.seed)


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a ``ResumableSampler`` whose position Lightning checkpoints.

    Lightning saves ``state_dict()`` of a training loader that has one in every checkpoint and
    calls ``load_state_dict`` on resume (``fit_loop.on_save_checkpoint``); the state is the epoch
    and the samples of this rank's shard already handed out. Counted here, in the main process,
    as batches leave the loader (worker prefetching does not count; Lightning does not prefetch
    from a loader with a length).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Lightning rebuilds the loader with its own sampler for ``overfit_batches`` (a debugging
        # mode): then it is a plain DataLoader with nothing to resume.
        self._resumable = isinstance(self.sampler, ResumableSampler)
        self._consumed = 0

    def __iter__(self) -> Iterator:
        self._consumed = self.sampler.start if self._resumable else 0
        for batch in super().__iter__():
            self._consumed += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "samples": self._consumed} if self._resumable else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._resumable and state:
            self.sampler.set_epoch(int(state["epoch"]))
            self.sampler.start = self._consumed = int(state["samples"])


def ranking_indices(num_images: int, dataset_size: int, seed: int) -> list[int]:
    """``num_images`` distinct indices of ``range(dataset_size)`` (all of them when fewer), drawn at
    random from ``seeded_generator(seed, RANKING)``: StableKeypoints ranks tokens on random training
    images, and a draw over the whole split spreads them over its classes or videos (the first
    images of a file list often share one)."""
    order = torch.randperm(dataset_size, generator=seeded_generator(seed, Draw.RANKING))
    return order[:num_images].tolist()


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
