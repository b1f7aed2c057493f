"""CUB-200-2011 as a dataset: crops, augmentation, subsets and splits (annotations: ``data.cub_files``).

Crops follow StableKeypoints (from CMR): the box, padded by 5 % of its size on each side (training:
each side also jittered by up to 5 %, and a random mirror), made square around its centre, cropped
(outside the image filled) and resized to S. ``cub_aligned`` uses the tight square crop of the box
with no augmentation, like the pre-cropped "aligned" CUB of AutoLink that StableKeypoints used.

Splits. By default the official ``train_test_split.txt`` (``cub_all`` keeps images with at least
6 visible parts). StableKeypoints' published numbers used the cleaned split files of CMR's
cachedir instead (``datasets/cub_parts.py``, ``CUBDataset``: ``<cachedir>/data/{train,test}_cub_cleaned.mat``;
AutoLink built the ``cub.h5`` of ``cub_aligned`` from the same two files): 5964 train images and a
test split of 2874 (a seeded random half of CMR's cleaned official test images), so per class
29/17 (001), 30/14 (002), 30/15 (003). ``cmr_cachedir`` reads the image lists of those files
(scipy needed) and takes every image's annotations from the official text files as usual, so the
splits are exactly SK's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from data.base import STAGE_SPLITS, Evaluation, KeypointDataModule
from data.protocol import autolink_aligned_box, check_protocol, cmr_square_box, python_round

from data.crop import crop_matrix, crop_points, crop_resize, image_region, image_tensor

from data.sampling import SampleKey, sample_draws
from data.cub_files import (
    CUB_MD5,
    CUB_PAGE,
    CUB_URL,
    FLIP_PERMUTATION,
    PART_NAMES,
    CUBAnnotations,
    Split,
    Subset,
    import_loadmat,
    missing_message,
    cmr_from_text,
    cmr_split_file,
    load_annotations,
    read_cmr_annotations,
    missing_annotation_files,
    read_cmr_split,
    select_rows,
)
from data.download import download_extracted
from data.images import GRAY_RGB, read_image
from lightning_modules.app.errors import ConfigError, MissingFileError

PAD_FRAC = 0.05
JITTER_FRAC = 0.05


def square_crop_box(box_xywh: Sequence[float], outward_frac: Sequence[float] = (0.0, 0.0, 0.0, 0.0)) -> tuple[float, float, float, float]:
    """Square ``(x0, y0, x1, y1)`` around a box whose sides were moved outward first.

    Args:
        box_xywh: (x, y, w, h) in source pixels.
        outward_frac: how far the left, top, right and bottom sides move outward, as fractions of
            the box width (left, right) or height (top, bottom); negative moves inward.

    Returns:
        The square of side max(width, height) of the moved box, centred on it, in source pixels.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    left, top, right, bottom = (float(v) for v in outward_frac)
    x0, y0, x1, y1 = x - left * w, y - top * h, x + w + right * w, y + h + bottom * h
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    return cx - half, cy - half, cx + half, cy + half


def mirror_parts(keypoints: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints (J, 2) and visible (J,) of a mirrored image, whose points already moved: the
    bird's left parts are now on the image's right, so left and right parts trade names."""
    permutation = list(FLIP_PERMUTATION)
    return keypoints[permutation], visible[permutation]


class CUBDataset(Dataset):
    """One subset and split of CUB-200-2011; samples follow ``data.base``.

    Args:
        root: the ``CUB_200_2011/`` folder.
        split: the official ``train`` or ``test`` split.
        subset: ``cub_all`` (all classes, >= 6 visible parts), ``cub_001``/``cub_002``/``cub_003`` (one
            class each) or ``cub_aligned`` (all classes, tight square box crops, never augmented).
        image_size: side S of the returned images, in pixels.
        augment: training augmentation (box jitter and random mirror), drawn per sample from its
            ``SampleKey`` (``data.base.sample_draws``).

    Keypoints of visible parts annotated outside the (jittered) crop lie outside [0, 1]; they are
    kept, as in StableKeypoints.
        images_dir: a folder mirroring ``root/images`` (same relative paths) to read instead, e.g. the
            gray-background tree written by ``data.cub_preprocess``.
        fill_rgb: 0-255 colour of crop regions outside the image.
        annotations: already parsed annotations of ``root`` (saves re-reading the files).
        background_rgb: 0-255 colour under transparent pixels (``images_dir`` trees may hold RGBA PNGs).
        split_paths: the images of ``split`` (paths relative to ``images/``) instead of the
            official split, e.g. ``read_cmr_split(cachedir, split)`` for StableKeypoints' splits.
        protocol: ``default``, or ``stablekeypoints``: boxes, parts and crops as StableKeypoints made
            them (``stablekeypoints_crop``).
        cmr_annotations: ``read_cmr_annotations`` of ``split``: with ``stablekeypoints``, the boxes and
            parts come from CMR's ``.mat`` files instead of the text files (``cmr_from_text``).
    """

    def __init__(
        self,
        root: str | Path,
        split: Split = "train",
        subset: Subset = "cub_all",
        image_size: int = 512,
        augment: bool = False,
        images_dir: str | Path | None = None,
        fill_rgb: tuple[int, int, int] = (0, 0, 0),
        annotations: CUBAnnotations | None = None,
        background_rgb: tuple[int, int, int] = GRAY_RGB,
        split_paths: Sequence[str] | None = None,
        protocol: str = "default",
        cmr_annotations: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        if subset not in get_args(Subset):
            raise ConfigError(f"subset={subset!r}: choose one of {get_args(Subset)}.")
        if split not in get_args(Split):
            raise ConfigError(f"split={split!r}: choose 'train' or 'test'.")
        self.annotations = load_annotations(root) if annotations is None else annotations
        self.images_dir = Path(root) / "images" if images_dir is None else Path(images_dir)
        self.rows = select_rows(self.annotations, subset, split, split_paths)
        self.image_size = image_size
        self.fill_rgb = fill_rgb
        self.background_rgb = background_rgb
        aligned = subset == "cub_aligned"
        self.pad_frac = 0.0 if aligned else PAD_FRAC
        self.jitter_frac = JITTER_FRAC if augment and not aligned else 0.0
        self.mirror = augment and not aligned
        self.protocol = check_protocol(protocol)
        self.aligned = aligned
        if cmr_annotations is not None:
            records = [cmr_annotations[self.annotations.paths[row]] for row in self.rows]
            self.cmr_boxes = np.stack([box for box, _ in records])
            self.cmr_parts = np.stack([parts for _, parts in records])
        else:
            boxes, parts = cmr_from_text(self.annotations)
            self.cmr_boxes, self.cmr_parts = boxes[self.rows], parts[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        """Source image file of sample ``index``."""
        return self.images_dir / self.annotations.paths[self.rows[index]]

    def sample_crop_params(self, generator: torch.Generator) -> tuple[list[float], bool]:
        """One sample's random crop parameters: the box's outward fractions (left, top, right, bottom)
        and whether to mirror. Without augmentation: the fixed padding, no mirror."""
        jitter, flip = torch.rand(5, dtype=torch.float64, generator=generator).split([4, 1])
        outward = (self.pad_frac + self.jitter_frac * (2 * jitter - 1)).tolist()
        return outward, self.mirror and bool(flip < 0.5)

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, generator = sample_draws(key)
        row = self.rows[index]
        path = self.image_path(index)
        image = image_tensor(read_image(path, self.background_rgb))  # a few CUB images are grayscale
        height, width = image.shape[-2:]
        outward, flipped = self.sample_crop_params(generator)
        if self.protocol == "stablekeypoints":
            box, keypoints, visible = self.stablekeypoints_crop(index, outward, flipped, width, height)
        else:
            box = square_crop_box(self.annotations.boxes_xywh[row], outward)
            visible = torch.from_numpy(self.annotations.visible[row].copy())
            # The crop, the resize and the mirror are one matrix, for the pixels and the parts alike.
            keypoints = crop_points(self.annotations.parts_px[row], crop_matrix(box, self.image_size, flipped), self.image_size)
        pixels = crop_resize(image, box, self.image_size, self.fill_rgb, mirror=flipped)
        if flipped:
            keypoints, visible = mirror_parts(keypoints, visible)
        keypoints = keypoints.masked_fill(~visible[:, None], 0.0)
        return {
            "image": pixels,
            "keypoints": keypoints,
            "visible": visible,
            "index": index,
            "sample_key": index,
            "path": str(path),
            "crop_box": torch.tensor(box, dtype=torch.float32),
            "flipped": flipped,
            "source_size": torch.tensor([width, height]),
            "image_region": image_region(box, width, height, flipped),
        }

    def stablekeypoints_crop(
        self, index: int, outward: list[float], flipped: bool, width: int, height: int
    ) -> tuple[tuple[float, float, float, float], torch.Tensor, torch.Tensor]:
        """Crop box (continuous source pixels), keypoints (J, 2) and visible (J,) as StableKeypoints made them.

        From CMR's 1-based boxes and parts (``cmr_boxes``, ``cmr_parts``). ``cub_all``/``cub_00x``
        (``datasets/cub_parts.py``): the parts minus 1, over the whole-pixel square of ``cmr_square_box``,
        ``(x - 1 - x0) / side`` with no half pixel; mirrored, ``x`` becomes ``(S - 1) / S - x`` (CMR flips
        pixel indices, ``S - 1 - x``, on the S-px crop). ``cub_aligned`` (AutoLink's ``cub.h5``): the raw
        parts, shifted by the 16-px trim (a part then outside the trimmed image turns invisible), over
        ``autolink_aligned_box``; the pixels are cropped at that box rounded to whole pixels, as PIL does.
        """
        box_cmr, parts = self.cmr_boxes[index], self.cmr_parts[index]
        visible = parts[:, 2] > 0
        if self.aligned:
            x_min, y_min, x_max, y_max, ox, oy = autolink_aligned_box(box_cmr, width, height)
            xy = parts[:, :2] - (ox, oy)
            inside = (xy >= 0).all(1) & (xy[:, 0] < width - width % 16) & (xy[:, 1] < height - height % 16)
            visible &= inside
            keypoints = (xy - (x_min, y_min)) / (x_max - x_min, y_max - y_min)
            box = tuple(float(python_round(v) + o) for v, o in zip((x_min, y_min, x_max, y_max), (ox, oy, ox, oy)))
        else:
            x0, y0, side = cmr_square_box(box_cmr, outward)
            keypoints = (parts[:, :2] - 1 - (x0, y0)) / side
            if flipped:
                keypoints[:, 0] = (self.image_size - 1) / self.image_size - keypoints[:, 0]
            box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
        return box, torch.from_numpy(keypoints).float(), torch.from_numpy(visible)


def download_cub(root: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """Downloads and extracts the official archive so that ``root`` becomes its ``CUB_200_2011/`` folder
    (``data.download.download_extracted``); nothing happens when ``root`` is already complete.

    Args:
        root: destination folder.
        url: archive address; default ``CUB_URL``.
        md5: expected hex digest; default ``CUB_MD5``.
    """
    return download_extracted(root, CUB_URL if url is None else url, CUB_MD5 if md5 is None else md5, "CUB_200_2011",
                              missing_annotation_files, CUB_PAGE)


class CUBDataModule(KeypointDataModule):
    """CUB-200-2011 from the official archive layout.

    Splits: ``fit`` trains on the train split (augmented); ``test`` fits the regressor on the
    train split (no augmentation) and scores the test split. The splits are the official ones, or
    StableKeypoints' (CMR's cleaned split files) with ``cmr_cachedir``.

    Args:
        root: the ``CUB_200_2011/`` folder.
        subset: ``cub_all``, ``cub_001``, ``cub_002``, ``cub_003`` or ``cub_aligned`` (see ``CUBDataset``).
        images_dir: a folder mirroring ``root/images`` to read instead (e.g. the gray-background tree
            of ``python -m data.cub_preprocess``).
        fill_rgb: 0-255 colour of crop regions outside the image; (127, 127, 127) suits ``images_dir``
            trees composited on gray.
        download: fetch and extract the official archive (about 1.1 GB) into ``root`` if missing.
        generate_synthetic: demo only: if ``root`` is missing and is the demo's folder
            (``data.demo.DEMO_CUB_ROOT``, ``.demo/CUB_200_2011``), write the small synthetic dataset
            of ``data.demo`` there (and say so); a missing ``root`` anywhere else is an error.
        cmr_cachedir: CMR's ``cachedir/cub`` folder: take the train and test images from its
            ``data/train_cub_cleaned.mat`` and ``data/test_cub_cleaned.mat``, the splits of
            StableKeypoints' published numbers (needs scipy); ``None``: the official split. With
            ``protocol: stablekeypoints`` the boxes and parts are read from these files too (SK's
            convention, ``CUBDataset.stablekeypoints_crop``); with ``default`` they come from the
            official text files.
        kwargs: ``image_size``, ``batch_size``, ``num_workers``, ``path``, ``protocol`` (see
            ``KeypointDataModule``). ``protocol: stablekeypoints`` also fits the regressor on augmented
            training crops (5 % box jitter and a random mirror, drawn per image from its index), as SK's
            regression pass read its training dataset; the keypoint tokens are still ranked on
            unaugmented crops.
    """

    keypoint_names = PART_NAMES

    def __init__(
        self,
        root: str,
        subset: Subset = "cub_all",
        images_dir: str | None = None,
        fill_rgb: tuple[int, int, int] = (0, 0, 0),
        download: bool = False,
        generate_synthetic: bool = False,
        cmr_cachedir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if subset not in get_args(Subset):
            raise ConfigError(f"data.subset={subset!r}: choose one of {get_args(Subset)}.")
        if download and generate_synthetic:
            raise ConfigError("data.download and data.generate_synthetic are exclusive: download the real dataset or write the demo one.")
        if generate_synthetic and not Path(root).exists():
            from data.demo import require_demo_root

            require_demo_root(root)  # before anything runs: a mistyped root must not become a made-up dataset
        self.root = root
        self.subset = subset
        self.images_dir = images_dir
        self.fill_rgb = fill_rgb
        self.download = download
        self.generate_synthetic = generate_synthetic
        self.cmr_cachedir = cmr_cachedir
        if cmr_cachedir is not None:  # before any download or model loading
            import_loadmat()
            for split in get_args(Split):
                cmr_split_file(cmr_cachedir, split)
        self._datasets: dict[str, CUBDataset] = {}

    def prepare_data(self) -> None:
        if self.download:
            download_cub(self.root)
        elif self.generate_synthetic and not Path(self.root).exists():
            from data.demo import DEMO_SIZE, ensure_synthetic_cub, require_demo_root

            require_demo_root(self.root)
            ensure_synthetic_cub(self.root, **DEMO_SIZE)

    def setup(self, stage: str | None = None) -> None:
        self._build_datasets()
        if stage == "predict" and self.path is not None:
            self.path_dataset()
        else:
            for split in ("train", "regression", "test") if stage is None else STAGE_SPLITS.get(stage, ()):
                self._datasets[split] = self.checked(self._datasets[split], split)
        self.check_stage(stage)

    def _build_datasets(self) -> None:
        if self._datasets:
            return
        annotations = load_annotations(self.root)
        common = dict(root=self.root, subset=self.subset, image_size=self.image_size, images_dir=self.images_dir, fill_rgb=self.fill_rgb, annotations=annotations, background_rgb=self.background_rgb)
        split_paths = {split: None if self.cmr_cachedir is None else read_cmr_split(self.cmr_cachedir, split) for split in get_args(Split)}
        sk = self.protocol == "stablekeypoints"
        cmr = {split: read_cmr_annotations(self.cmr_cachedir, split) if sk and self.cmr_cachedir else None for split in get_args(Split)}
        train = dict(split="train", split_paths=split_paths["train"], protocol=self.protocol, cmr_annotations=cmr["train"], **common)
        self._datasets = {
            "train": CUBDataset(augment=True, **train),
            "regression": CUBDataset(augment=sk, **train),
            "test": CUBDataset(split="test", augment=False, split_paths=split_paths["test"], protocol=self.protocol,
                               cmr_annotations=cmr["test"], **common),
        }
        if sk:
            self._datasets["ranking"] = CUBDataset(augment=False, **train)
        for dataset in (self._datasets["train"], self._datasets["test"]):
            missing = [dataset.image_path(i) for i in range(len(dataset)) if not dataset.image_path(i).is_file()]
            if missing and self.images_dir:
                raise MissingFileError(
                    f"data.images_dir={self.images_dir!r} lacks {len(missing)} images of {self.subset}, e.g. {str(missing[0])!r}: "
                    f"rerun `python -m data.cub_preprocess --root {self.root} --output {self.images_dir}` (it resumes)."
                )
            if missing:
                raise MissingFileError(f"{len(missing)} images of {self.subset} are missing. {missing_message(missing[0])}")

    def _dataset(self, name: str) -> Dataset:
        if not self._datasets:
            self._build_datasets()
        self._datasets[name] = self.checked(self._datasets[name], name)
        return self._datasets[name]

    def train_dataset(self) -> Dataset:
        return self._dataset("train")

    def regression_dataset(self) -> Dataset:
        return self._dataset("regression")

    def ranking_dataset(self) -> Dataset:
        """Unaugmented training crops under either protocol (the protocol changes the evaluation only)."""
        if not self._datasets:
            self._build_datasets()
        return self._dataset("ranking") if "ranking" in self._datasets else self.regression_dataset()

    def test_dataset(self) -> Dataset:
        return self._dataset("test")

    def evaluation(self) -> Evaluation:
        """Visible rows for the regressor; error over the visible parts x100 (StableKeypoints' ``visible``)."""
        return Evaluation("normalized_keypoint_error", protocol=self.protocol)
