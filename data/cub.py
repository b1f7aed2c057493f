"""CUB-200-2011 read from the official archive's text files (no MATLAB caches).

``root`` is the extracted ``CUB_200_2011/`` folder. Conventions of its files:
- ``bounding_boxes.txt``: ``id x y w h`` in source pixels; the box spans [x, x + w) x [y, y + h).
- ``parts/part_locs.txt``: ``id part x y visible`` with integer pixel indices (the part's continuous
  coordinate is the pixel centre, index + 0.5); invisible parts are ``0 0 0``.

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

import hashlib
import os
import shutil
import tarfile
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset
from torchmetrics import Metric
from tqdm import tqdm

from data.base import STAGE_SPLITS, KeypointDataModule, crop_matrix, crop_points, crop_resize, image_region, image_tensor
from data.images import GRAY_RGB, read_image
from lightning_modules.errors import ConfigError, MissingFileError

#: The official archive (about 1.1 GB) and its md5; module constants so tests can point elsewhere.
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_PAGE = "https://data.caltech.edu/records/65de6-vp158"

PART_NAMES: tuple[str, ...] = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
    "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip
#: 0-based part order after a horizontal flip: left/right eye, leg and wing trade places.
FLIP_PERMUTATION: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 10, 11, 12, 9, 6, 7, 8, 13, 14)
ANNOTATION_FILES = (
    "images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt", "bounding_boxes.txt",
    "parts/parts.txt", "parts/part_locs.txt",
)  # fmt: skip

Subset = Literal["cub_all", "cub_001", "cub_002", "cub_003", "cub_aligned"]
Split = Literal["train", "test"]
PAD_FRAC = 0.05
JITTER_FRAC = 0.05
#: StableKeypoints drops `cub_all` images with fewer visible parts than this.
MIN_VISIBLE_PARTS = 6
_DOWNLOAD_CHUNK_BYTES = 1 << 20
#: The split files StableKeypoints reads from CMR's cachedir (``datasets/cub_parts.py``:
#: ``'%s_cub_cleaned.mat' % split`` under ``<cachedir>/data``); its ``sfm/anno_*.mat`` hold camera
#: poses no keypoint protocol uses, so they are not needed here.
CMR_SPLIT_FILES: dict[str, str] = {"train": "data/train_cub_cleaned.mat", "test": "data/test_cub_cleaned.mat"}
CMR_SOURCE = (
    "CMR's CUB cachedir comes from https://github.com/akanazawa/cmr (cachedir.tar.gz, see its issue 3); "
    "point data.init_args.cmr_cachedir at its cachedir/cub folder, the one holding data/train_cub_cleaned.mat."
)


def _missing_message(path: Path) -> str:
    return (
        f"CUB-200-2011: {str(path)!r} is missing. `root` must be the extracted `CUB_200_2011/` folder of the "
        f"official archive: set `download: true` to fetch it (about 1.1 GB), or download {CUB_URL} and extract it."
    )


def _read_rows(root: Path, name: str, num_fields: int) -> list[list[str]]:
    """Whitespace-separated rows of ``root/name``, each with exactly ``num_fields`` fields."""
    path = root / name
    if not path.is_file():
        raise MissingFileError(_missing_message(path))
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=num_fields - 1)
        if len(fields) != num_fields:
            raise ValueError(f"{path}:{line_number}: expected {num_fields} fields, got {line!r}; the file is damaged, re-extract it.")
        rows.append(fields)
    return rows


def read_images(root: str | Path) -> dict[int, str]:
    """``images.txt``: image id -> path relative to ``images/``, in file order."""
    return {int(i): path for i, path in _read_rows(Path(root), "images.txt", 2)}


def read_image_class_labels(root: str | Path) -> dict[int, int]:
    """``image_class_labels.txt``: image id -> class id (1-based)."""
    return {int(i): int(c) for i, c in _read_rows(Path(root), "image_class_labels.txt", 2)}


def read_classes(root: str | Path) -> dict[int, str]:
    """``classes.txt``: class id -> folder name such as ``001.Black_footed_Albatross``."""
    return {int(c): name for c, name in _read_rows(Path(root), "classes.txt", 2)}


def read_train_test_split(root: str | Path) -> dict[int, bool]:
    """``train_test_split.txt``: image id -> True for the official training split."""
    return {int(i): flag == "1" for i, flag in _read_rows(Path(root), "train_test_split.txt", 2)}


def read_bounding_boxes(root: str | Path) -> dict[int, tuple[float, float, float, float]]:
    """``bounding_boxes.txt``: image id -> (x, y, w, h) in source pixels."""
    return {int(i): (float(x), float(y), float(w), float(h)) for i, x, y, w, h in _read_rows(Path(root), "bounding_boxes.txt", 5)}


def read_part_names(root: str | Path) -> tuple[str, ...]:
    """``parts/parts.txt``: the part names in part-id order."""
    rows = sorted(_read_rows(Path(root), "parts/parts.txt", 2), key=lambda row: int(row[0]))
    return tuple(name for _, name in rows)


def read_part_locs(root: str | Path, num_parts: int = len(PART_NAMES)) -> dict[int, np.ndarray]:
    """``parts/part_locs.txt``: image id -> (num_parts, 3) float64 rows ``(x, y, visible)``, pixel indices."""
    locations: dict[int, np.ndarray] = {}
    for i, part, x, y, visible in _read_rows(Path(root), "parts/part_locs.txt", 5):
        rows = locations.setdefault(int(i), np.zeros((num_parts, 3)))
        rows[int(part) - 1] = (float(x), float(y), float(visible))
    return locations


@dataclass(frozen=True)
class CUBAnnotations:
    """Everything the text files say about the N images of a CUB root, in ``images.txt`` order.

    Attributes:
        image_ids: (N,) int64 official ids.
        paths: N paths relative to ``images/``.
        class_ids: (N,) int64, 1-based.
        is_train: (N,) bool, the official split.
        boxes_xywh: (N, 4) float64 source pixels.
        parts_px: (N, J, 2) float64 (x, y) pixel indices; (0, 0) where invisible.
        visible: (N, J) bool.
    """

    image_ids: np.ndarray
    paths: tuple[str, ...]
    class_ids: np.ndarray
    is_train: np.ndarray
    boxes_xywh: np.ndarray
    parts_px: np.ndarray
    visible: np.ndarray


def load_annotations(root: str | Path) -> CUBAnnotations:
    """Parse and cross-check all annotation files of ``root`` (the ``CUB_200_2011/`` folder)."""
    root = Path(root)
    images = read_images(root)  # first, so that a missing root is reported as its images.txt missing
    if not images:
        raise ValueError(f"{root / 'images.txt'} lists no images; re-extract the archive.")
    names = read_part_names(root)
    if names != PART_NAMES:
        raise ValueError(f"{root / 'parts/parts.txt'} lists {names}, not the 15 official CUB parts {PART_NAMES}.")
    per_image = {
        "image_class_labels.txt": read_image_class_labels(root),
        "train_test_split.txt": read_train_test_split(root),
        "bounding_boxes.txt": read_bounding_boxes(root),
        "parts/part_locs.txt": read_part_locs(root),
    }
    for name, table in per_image.items():
        missing = images.keys() - table.keys()
        if missing:
            raise ValueError(f"{root / name} has no entry for image id {min(missing)} ({len(missing)} ids missing); re-extract the archive.")
    ids = list(images)
    locs = np.stack([per_image["parts/part_locs.txt"][i] for i in ids])
    return CUBAnnotations(
        image_ids=np.array(ids, dtype=np.int64),
        paths=tuple(images[i] for i in ids),
        class_ids=np.array([per_image["image_class_labels.txt"][i] for i in ids], dtype=np.int64),
        is_train=np.array([per_image["train_test_split.txt"][i] for i in ids], dtype=bool),
        boxes_xywh=np.array([per_image["bounding_boxes.txt"][i] for i in ids], dtype=np.float64),
        parts_px=locs[..., :2],
        visible=locs[..., 2] > 0,
    )


def _import_loadmat():
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise ConfigError(
            "data.init_args.cmr_cachedir is set, and reading CMR's .mat split files needs scipy: pip install scipy "
            "(or leave cmr_cachedir unset to use the official split)."
        ) from error
    return loadmat


def cmr_split_file(cachedir: str | Path, split: Split) -> Path:
    """The cleaned split file of ``split`` in CMR's cachedir; a MissingFileError naming it when absent."""
    path = Path(cachedir) / CMR_SPLIT_FILES[split]
    if not path.is_file():
        raise MissingFileError(f"data.init_args.cmr_cachedir={str(cachedir)!r} has no {CMR_SPLIT_FILES[split]}. {CMR_SOURCE}")
    return path


def read_cmr_split(cachedir: str | Path, split: Split) -> list[str]:
    """Image paths (relative to ``images/``) of CMR's cleaned ``split``, in file order.

    The file holds one struct array ``images`` whose entries have ``rel_path``, ``bbox``, ``parts``
    (1-based pixels), ``mask``, ``class_id``...; it is read as StableKeypoints reads it
    (``loadmat(..., struct_as_record=False, squeeze_me=True)['images']``) and only ``rel_path`` is
    kept: the annotations come from the official text files.
    """
    loadmat = _import_loadmat()
    path = cmr_split_file(cachedir, split)
    contents = loadmat(str(path), struct_as_record=False, squeeze_me=True)
    if "images" not in contents:
        raise ConfigError(f"{path} holds no 'images' struct array: it is not one of CMR's *_cub_cleaned.mat files.")
    try:
        return [str(image.rel_path) for image in np.atleast_1d(contents["images"])]
    except AttributeError as error:
        raise ConfigError(f"{path}: an entry of 'images' has no rel_path: it is not one of CMR's *_cub_cleaned.mat files.") from error


def select_rows(
    annotations: CUBAnnotations, subset: Subset, split: Split, split_paths: Sequence[str] | None = None
) -> np.ndarray:
    """(M,) int64 rows of ``annotations`` in ``subset`` and ``split``.

    Without ``split_paths``: the official split, and for ``cub_all`` at least
    ``MIN_VISIBLE_PARTS`` visible parts. With ``split_paths`` (a CMR split, ``read_cmr_split``):
    exactly those images, in that order, with no further filter (CMR's cleaning already dropped
    truncated birds); a class subset keeps its class, as StableKeypoints' ``single_class`` does.
    """
    if split_paths is None:
        keep = annotations.is_train == (split == "train")
        if subset == "cub_all":
            keep &= annotations.visible.sum(1) >= MIN_VISIBLE_PARTS
        rows = np.flatnonzero(keep)
    else:
        row_of_path = {path: row for row, path in enumerate(annotations.paths)}
        unknown = [path for path in split_paths if path not in row_of_path]
        if unknown:
            raise ConfigError(
                f"The CMR {split} split lists {len(unknown)} images that images.txt of this CUB root does not, "
                f"e.g. {unknown[0]!r}: cmr_cachedir and root must belong to the same CUB-200-2011."
            )
        rows = np.array([row_of_path[path] for path in split_paths], dtype=np.int64)
    if subset not in ("cub_all", "cub_aligned"):
        rows = rows[annotations.class_ids[rows] == int(subset.removeprefix("cub_"))]
    return rows


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
        augment: training augmentation (box jitter and random mirror; torch's RNG so that
            ``seed_everything`` and DataLoader worker seeding make it reproducible).

    Keypoints of visible parts annotated outside the (jittered) crop lie outside [0, 1]; they are
    kept, as in StableKeypoints.
        images_dir: a folder mirroring ``root/images`` (same relative paths) to read instead, e.g. the
            gray-background tree written by ``data.cub_preprocess``.
        fill_rgb: 0-255 colour of crop regions outside the image.
        annotations: already parsed annotations of ``root`` (saves re-reading the files).
        background_rgb: 0-255 colour under transparent pixels (``images_dir`` trees may hold RGBA PNGs).
        split_paths: the images of ``split`` (paths relative to ``images/``) instead of the
            official split, e.g. ``read_cmr_split(cachedir, split)`` for StableKeypoints' splits.
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

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> Path:
        """Source image file of sample ``index``."""
        return self.images_dir / self.annotations.paths[self.rows[index]]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        path = self.image_path(index)
        image = image_tensor(read_image(path, self.background_rgb))  # a few CUB images are grayscale
        height, width = image.shape[-2:]
        outward = [self.pad_frac] * 4
        if self.jitter_frac:  # evaluation samples leave the global RNG untouched
            outward = (self.pad_frac + self.jitter_frac * (2 * torch.rand(4, dtype=torch.float64) - 1)).tolist()
        box = square_crop_box(self.annotations.boxes_xywh[row], outward)
        flipped = self.mirror and bool(torch.rand(()) < 0.5)
        # The crop, the resize and the mirror are one matrix, for the pixels and the parts alike.
        pixels = crop_resize(image, box, self.image_size, self.fill_rgb, mirror=flipped)
        visible = torch.from_numpy(self.annotations.visible[row].copy())
        keypoints = crop_points(self.annotations.parts_px[row], crop_matrix(box, self.image_size, flipped), self.image_size)
        if flipped:
            keypoints, visible = mirror_parts(keypoints, visible)
        keypoints = keypoints.masked_fill(~visible[:, None], 0.0)
        return {
            "image": pixels,
            "keypoints": keypoints,
            "visible": visible,
            "index": index,
            "path": str(path),
            "crop_box": torch.tensor(box, dtype=torch.float32),
            "flipped": flipped,
            "source_size": torch.tensor([width, height]),
            "image_region": image_region(box, width, height, flipped),
        }


def missing_annotation_files(root: str | Path) -> list[Path]:
    """The annotation files of ``root`` that do not exist."""
    return [Path(root) / name for name in ANNOTATION_FILES if not (Path(root) / name).is_file()]


def download_cub(root: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """Download and extract the official archive so that ``root`` becomes its ``CUB_200_2011/`` folder.

    Nothing happens when ``root`` is already complete. The archive is streamed to a ``.part`` file
    beside ``root``, checked against ``md5``, renamed, extracted into a temporary folder and moved
    into place, so an interrupted run never leaves a half dataset at ``root``; the archive is kept
    until extraction succeeds, so a failed extraction does not cost a new download.

    Args:
        root: destination folder.
        url: archive address (http(s) or file://); default ``CUB_URL``.
        md5: expected hex digest; default ``CUB_MD5``.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Lightning runs prepare_data once per node (prepare_data_per_node), which node-local disks
    # need; on a shared filesystem the nodes would then fetch into the same .part file at once.
    # A lock beside root (flock: local disks, NFS, and Lustre mounted with -o flock) makes the
    # later nodes wait and then find the dataset complete.
    lock = FileLock(root.parent / f".{root.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        rank_zero_info(f"Waiting for another process to finish downloading {root} (lock {lock.lock_file}).")
        lock.acquire()
    try:
        return _download_unlocked(root, CUB_URL if url is None else url, CUB_MD5 if md5 is None else md5)
    finally:
        lock.release()


def _download_unlocked(root: Path, url: str, md5: str) -> Path:
    if root.exists():
        missing = missing_annotation_files(root)
        if not missing:
            return root
        raise FileExistsError(f"{root} exists but is incomplete (no {missing[0]}): delete it, then download again.")
    archive = root.parent / f"{root.name}.tgz"
    if not (archive.is_file() and _md5(archive) == md5):
        _fetch(url, archive, md5)
    rank_zero_info(f"Extracting {archive} to {root}.")
    tmp = root.parent / f".{root.name}.{uuid.uuid4().hex}.tmp"  # mkdtemp's 0700 mode would outlive the rename
    tmp.mkdir()
    try:
        _safe_extract(archive, tmp)
        extracted = tmp / "CUB_200_2011"
        missing = missing_annotation_files(extracted)
        if missing:
            raise ValueError(f"{url} is not the CUB-200-2011 archive: it has no CUB_200_2011/{missing[0].relative_to(extracted)}.")
        os.rename(extracted, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink()
    return root


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(_DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, destination: Path, md5: str) -> None:
    """Stream ``url`` to ``destination`` through a ``.part`` file, checking its md5 on the way."""
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url) as response, partial.open("wb") as file:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {destination.name}") as bar:
                for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK_BYTES), b""):
                    file.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OSError(f"Could not download {url} ({error}); check the connection, or download it by hand from {CUB_PAGE} and extract it.") from error
    if digest.hexdigest() != md5:
        partial.unlink()
        raise ValueError(f"{url} downloaded with md5 {digest.hexdigest()}, expected {md5}: the file is damaged or not the CUB-200-2011 archive; retry.")
    os.replace(partial, destination)


def _safe_extract(archive: Path, destination: Path) -> None:
    """Extract a tar archive into ``destination``, refusing members that would land outside it."""
    with tarfile.open(archive) as tar:
        try:
            # The "data" filter rejects absolute paths, "..", links leaving the folder and device files.
            tar.extractall(destination, filter="data")
        except tarfile.FilterError as error:
            raise ValueError(f"{archive} holds an unsafe member ({error}); extraction stopped. Delete the archive and download it again.") from error


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
            StableKeypoints' published numbers (needs scipy); ``None``: the official split.
        kwargs: ``image_size``, ``batch_size``, ``num_workers``, ``path`` (see ``KeypointDataModule``).
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
            _import_loadmat()
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
            return
        for split in ("train", "regression", "test") if stage is None else STAGE_SPLITS.get(stage, ()):
            self._datasets[split] = self.checked(self._datasets[split], split)

    def _build_datasets(self) -> None:
        if self._datasets:
            return
        annotations = load_annotations(self.root)
        common = dict(root=self.root, subset=self.subset, image_size=self.image_size, images_dir=self.images_dir, fill_rgb=self.fill_rgb, annotations=annotations, background_rgb=self.background_rgb)
        split_paths = {split: None if self.cmr_cachedir is None else read_cmr_split(self.cmr_cachedir, split) for split in get_args(Split)}
        self._datasets = {
            "train": CUBDataset(split="train", augment=True, split_paths=split_paths["train"], **common),
            "regression": CUBDataset(split="train", augment=False, split_paths=split_paths["train"], **common),
            "test": CUBDataset(split="test", augment=False, split_paths=split_paths["test"], **common),
        }
        for dataset in (self._datasets["train"], self._datasets["test"]):
            missing = [dataset.image_path(i) for i in range(len(dataset)) if not dataset.image_path(i).is_file()]
            if missing and self.images_dir:
                raise MissingFileError(
                    f"data.images_dir={self.images_dir!r} lacks {len(missing)} images of {self.subset}, e.g. {str(missing[0])!r}: "
                    f"rerun `python -m data.cub_preprocess --root {self.root} --output {self.images_dir}` (it resumes)."
                )
            if missing:
                raise MissingFileError(f"{len(missing)} images of {self.subset} are missing. {_missing_message(missing[0])}")

    def _dataset(self, name: str) -> Dataset:
        if not self._datasets:
            self._build_datasets()
        self._datasets[name] = self.checked(self._datasets[name], name)
        return self._datasets[name]

    def train_dataset(self) -> Dataset:
        return self._dataset("train")

    def regression_dataset(self) -> Dataset:
        return self._dataset("regression")

    def test_dataset(self) -> Dataset:
        return self._dataset("test")

    def make_metric(self) -> Metric:
        from lightning_modules.metrics import NormalizedKeypointError

        return NormalizedKeypointError()
