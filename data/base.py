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
from collections.abc import Callable, Collection
from pathlib import Path
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from data.decode_check import find_unreadable
from data.image_folder import ImageFolderDataset
from data.sampling import ResumableDataLoader, ResumableSampler, SampleSubset, ranking_indices, without_paths
from data.images import GRAY_RGB
from data.protocol import SK_MAX_REGRESSION_IMAGES, Protocol, check_protocol, sk_regression_indices
from lightning_modules.app.errors import ConfigError, MissingFileError

#: The splits each stage reads (``predict`` without ``path`` reads the test split).
STAGE_SPLITS = {"fit": ("train", "regression"), "test": ("regression", "test"), "predict": ("test",)}
#: Unreadable files listed in full in an error or warning; the rest are counted.
_LISTED_FILES = 20


def _listing(bad: list[tuple[str, str]]) -> str:
    """The first ``_LISTED_FILES`` unreadable files with their reasons, one per line, and how many more."""
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:_LISTED_FILES])
    if len(bad) > _LISTED_FILES:
        listing += f"\n  ... and {len(bad) - _LISTED_FILES} more"
    return listing


@dataclass(frozen=True)
class Evaluation:
    """How a labelled dataset is scored, named in plain values (``lightning_modules.evaluation`` builds it),
    so that ``data/`` needs no metric or regressor code.

    Attributes:
        metric: ``normalized_keypoint_error``, ``inter_ocular_error``, ``summed_keypoint_error``,
            ``percentage_correct_keypoints`` or ``orientation_invariant_error`` (``lightning_modules.metrics``),
            also the name of the logged ``test/<metric>``.
        metric_args: the metric's keyword arguments, e.g. ``{"scale": 256}``.
        regressor: ``linear`` (least squares on each ground-truth keypoint's visible rows) or
            ``orientation_invariant`` (Human3.6M: refit with left/right-swapped ground truth).
        swap_pairs: left/right keypoint pairs, 0-based: the swap of ``orientation_invariant`` (regressor and metric).
        protocol: ``default`` or ``stablekeypoints`` (``data.protocol``): with ``stablekeypoints`` the swap
            follows SK's ``swap_points`` (pairs assigned in order, not a permutation) and visibility is read
            only where SK's evaluation method reads it (``visible``, ``mean_average_error``).
    """

    metric: str
    metric_args: dict[str, float] = field(default_factory=dict)
    regressor: Literal["linear", "orientation_invariant"] = "linear"
    swap_pairs: tuple[tuple[int, int], ...] = ()
    protocol: Protocol = "default"


class KeypointDataModule(L.LightningDataModule):
    """Base class of the project's DataModules.

    Stages and loaders:
    - ``fit``: ``train_dataloader`` (training split with augmentation, shuffled by ``seed`` and the
      epoch; a ``ResumableDataLoader``, so a run resumed from a mid-epoch checkpoint sees the samples
      and augmentations the uninterrupted run would have).
    - ``test``: ``test_dataloader`` returns two loaders run in order: the regression split (the
      regressor from keypoints to ground truth is fitted on it) and the test split (it is scored);
      under ``protocol: stablekeypoints`` at most 50,000 regression images, drawn as SK's shuffle.
    - ``predict``: ``predict_dataloader`` over ``path`` (a folder or one image) when given, else
      over the test split.
    - ``keypoint_index_dataloader``: training images without augmentation (``ranking_dataset``); the
      global keypoint tokens are ranked on ``num_indices`` of them drawn at random (docs/method.md section 5.1).

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
        protocol: ``default`` (the project's evaluation) or ``stablekeypoints`` (StableKeypoints'
            evaluation exactly: ``data.protocol``, docs/faithfulness.md); changes ``test`` only.
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
        protocol: Protocol = "default",
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
        self.protocol = check_protocol(protocol)

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

    def evaluation(self) -> Evaluation:
        """How the test split is scored, by name (``Evaluation``): built by ``lightning_modules.evaluation``."""
        raise NotImplementedError(f"{type(self).__name__} has no labelled test split: it cannot be used for `test`.")

    def check_stage(self, stage: str | None) -> None:
        """Raises ``ConfigError`` when the splits ``stage`` reads cannot feed it with these settings.

        Subclasses call it at the end of ``setup``: before any weights load, the run's folder or its
        W&B run exist. ``fit``: each device gets at least one full training batch (the training loader
        drops a last partial one, and shards are padded to equal length) and there are images to rank
        the keypoint tokens on; ``test``: a labelled regression and test split, neither empty;
        ``predict``: at least one image.
        """
        if stage == "fit":
            devices = self.trainer.world_size if self.trainer is not None else 1
            size = len(self.train_dataset())
            per_device = math.ceil(size / devices)
            if per_device < self.batch_size:
                shared = f" ({per_device} per device on {devices} devices)" if devices > 1 else ""
                raise ConfigError(
                    f"data.batch_size={self.batch_size} is larger than the training split of {type(self).__name__}: "
                    f"{size} images{shared}, so not one training step could run. Set data.init_args.batch_size to at "
                    f"most {per_device}, or give more training images."
                )
            batches = per_device // self.batch_size
            limit = self.trainer.limit_train_batches if self.trainer is not None else None
            if isinstance(limit, float) and int(batches * limit) < 1:
                raise ConfigError(
                    f"trainer.limit_train_batches={limit} of the {batches} training batches per device is less than one "
                    f"batch, so not one training step could run: use at least {1 / batches:.3g}, or leave it unset."
                )
            if not len(self.ranking_dataset()):
                raise ConfigError(f"{type(self).__name__} has no images to rank the keypoint tokens on (its ranking "
                                  "split is empty): give a dataset with training images.")
        elif stage == "test":
            for split, dataset in (("regression", self.regression_dataset), ("test", self.test_dataset)):
                try:
                    size = len(dataset())
                except NotImplementedError as error:
                    raise ConfigError(f"{error} Use a labelled DataModule (e.g. data.cub.CUBDataModule), or run "
                                      "`predict`.") from error
                if not size:
                    raise ConfigError(f"The {split} split of {type(self).__name__} is empty: `test` fits the regressor "
                                      "on the regression split and scores the test split; give a dataset with both.")
        elif stage == "predict":
            try:
                size = len(self.path_dataset() if self.path is not None else self.test_dataset())
            except NotImplementedError as error:
                raise ConfigError(f"{error} Give the images to predict with data.init_args.path.") from error
            if not size:
                raise ConfigError(f"Nothing to predict: {self.path or 'the test split'} holds no images.")

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
        regression = self.regression_dataset()
        if self.protocol == "stablekeypoints" and len(regression) > SK_MAX_REGRESSION_IMAGES:
            regression = SampleSubset(regression, sk_regression_indices(len(regression), self.seed, SK_MAX_REGRESSION_IMAGES))
        return [self._loader(regression, shuffle=False), self._loader(self.test_dataset(), shuffle=False)]

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


def require_file(path: Path, source: str) -> Path:
    """``path`` when it exists, else a FileNotFoundError naming it and where the data comes from."""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist. {source}")
    return path


