"""CUB-200-2011's official annotation files, read and cross-checked (no MATLAB caches), and CMR's split files.

``root`` is the extracted ``CUB_200_2011/`` folder. Conventions of its files:
- ``bounding_boxes.txt``: ``id x y w h`` in source pixels; the box spans [x, x + w) x [y, y + h).
- ``parts/part_locs.txt``: ``id part x y visible`` with integer pixel indices (the part's continuous
  coordinate is the pixel centre, index + 0.5); invisible parts are ``0 0 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lightning_modules.app.errors import ConfigError, DamagedFileError, MissingFileError

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
#: StableKeypoints drops `cub_all` images with fewer visible parts than this.
MIN_VISIBLE_PARTS = 6
#: The split files StableKeypoints reads from CMR's cachedir (``datasets/cub_parts.py``:
#: ``'%s_cub_cleaned.mat' % split`` under ``<cachedir>/data``); its ``sfm/anno_*.mat`` hold camera
#: poses no keypoint protocol uses, so they are not needed here.
CMR_SPLIT_FILES: dict[str, str] = {"train": "data/train_cub_cleaned.mat", "test": "data/test_cub_cleaned.mat"}
CMR_SOURCE = (
    "CMR's CUB cachedir comes from https://github.com/akanazawa/cmr (cachedir.tar.gz, see its issue 3); "
    "point data.init_args.cmr_cachedir at its cachedir/cub folder, the one holding data/train_cub_cleaned.mat."
)



def missing_message(path: Path) -> str:
    return (
        f"CUB-200-2011: {str(path)!r} is missing. `root` must be the extracted `CUB_200_2011/` folder of the "
        f"official archive: set `download: true` to fetch it (about 1.1 GB), or download {CUB_URL} and extract it."
    )


#: How a field is checked: an integer, a number, or any text.
_PARSERS = {"i": int, "f": float, "s": str}
_KIND_NAMES = {"i": "an integer", "f": "a number", "s": "text"}


def _read_rows(root: Path, name: str, kinds: str) -> list[list[str]]:
    """Whitespace-separated rows of ``root/name``, each with one field per letter of ``kinds``
    (``i`` an integer, ``f`` a number, ``s`` any text: the last one takes the rest of the line).

    Raises:
        MissingFileError: the file is missing.
        DamagedFileError: a row has too few fields or one that does not parse (a truncated or damaged file).
    """
    path = root / name
    if not path.is_file():
        raise MissingFileError(missing_message(path))
    rows = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=len(kinds) - 1)
        if len(fields) != len(kinds):
            raise DamagedFileError(f"{path}:{line_number}: expected {len(kinds)} fields, got {line!r}; the file is "
                                   "damaged or truncated: re-extract the archive.")
        for field, kind in zip(fields, kinds):
            try:
                _PARSERS[kind](field)
            except ValueError as error:
                raise DamagedFileError(f"{path}:{line_number}: {field!r} is not {_KIND_NAMES[kind]} (line {line!r}); "
                                       "the file is damaged: re-extract the archive.") from error
        rows.append(fields)
    return rows


def read_images(root: str | Path) -> dict[int, str]:
    """``images.txt``: image id -> path relative to ``images/``, in file order."""
    return {int(i): path for i, path in _read_rows(Path(root), "images.txt", "is")}


def read_image_class_labels(root: str | Path) -> dict[int, int]:
    """``image_class_labels.txt``: image id -> class id (1-based)."""
    return {int(i): int(c) for i, c in _read_rows(Path(root), "image_class_labels.txt", "ii")}


def read_classes(root: str | Path) -> dict[int, str]:
    """``classes.txt``: class id -> folder name such as ``001.Black_footed_Albatross``."""
    return {int(c): name for c, name in _read_rows(Path(root), "classes.txt", "is")}


def read_train_test_split(root: str | Path) -> dict[int, bool]:
    """``train_test_split.txt``: image id -> True for the official training split."""
    return {int(i): flag == "1" for i, flag in _read_rows(Path(root), "train_test_split.txt", "ii")}


def read_bounding_boxes(root: str | Path) -> dict[int, tuple[float, float, float, float]]:
    """``bounding_boxes.txt``: image id -> (x, y, w, h) in source pixels."""
    return {int(i): (float(x), float(y), float(w), float(h)) for i, x, y, w, h in _read_rows(Path(root), "bounding_boxes.txt", "iffff")}


def read_part_names(root: str | Path) -> tuple[str, ...]:
    """``parts/parts.txt``: the part names in part-id order."""
    rows = sorted(_read_rows(Path(root), "parts/parts.txt", "is"), key=lambda row: int(row[0]))
    return tuple(name for _, name in rows)


def read_part_locs(root: str | Path, num_parts: int = len(PART_NAMES)) -> dict[int, np.ndarray]:
    """``parts/part_locs.txt``: image id -> (num_parts, 3) float64 rows ``(x, y, visible)``, pixel indices."""
    locations: dict[int, np.ndarray] = {}
    for i, part, x, y, visible in _read_rows(Path(root), "parts/part_locs.txt", "iifff"):
        rows = locations.setdefault(int(i), np.zeros((num_parts, 3)))
        if not 1 <= int(part) <= num_parts:
            raise DamagedFileError(f"{Path(root) / 'parts/part_locs.txt'}: part id {part} of image {i} is outside "
                                   f"1..{num_parts}; the file is damaged: re-extract the archive.")
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
        raise DamagedFileError(f"{root / 'images.txt'} lists no images; re-extract the archive.")
    names = read_part_names(root)
    if names != PART_NAMES:
        raise DamagedFileError(f"{root / 'parts/parts.txt'} lists {names}, not the 15 official CUB parts {PART_NAMES}.")
    per_image = {
        "image_class_labels.txt": read_image_class_labels(root),
        "train_test_split.txt": read_train_test_split(root),
        "bounding_boxes.txt": read_bounding_boxes(root),
        "parts/part_locs.txt": read_part_locs(root),
    }
    for name, table in per_image.items():
        missing = images.keys() - table.keys()
        if missing:
            raise DamagedFileError(f"{root / name} has no entry for image id {min(missing)} ({len(missing)} ids missing); re-extract the archive.")
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


def import_loadmat():
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
    loadmat = import_loadmat()
    path = cmr_split_file(cachedir, split)
    contents = loadmat(str(path), struct_as_record=False, squeeze_me=True)
    if "images" not in contents:
        raise ConfigError(f"{path} holds no 'images' struct array: it is not one of CMR's *_cub_cleaned.mat files.")
    try:
        return [str(image.rel_path) for image in np.atleast_1d(contents["images"])]
    except AttributeError as error:
        raise ConfigError(f"{path}: an entry of 'images' has no rel_path: it is not one of CMR's *_cub_cleaned.mat files.") from error


def read_cmr_annotations(cachedir: str | Path, split: Split, num_parts: int = len(PART_NAMES)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CMR's annotations of ``split``: {path relative to ``images/``: (bbox (4,) ``x1, y1, x2, y2``, parts (J, 3) ``x, y, visible``)}.

    The values are the files' own, 1-based as MATLAB wrote them (StableKeypoints subtracts 1 when it
    reads them, ``datasets/cub_parts.py``); each entry's ``bbox`` is a struct and ``parts`` a (3, J) array.
    """
    loadmat = import_loadmat()
    path = cmr_split_file(cachedir, split)
    images = loadmat(str(path), struct_as_record=False, squeeze_me=True).get("images")
    if images is None:
        raise ConfigError(f"{path} holds no 'images' struct array: it is not one of CMR's *_cub_cleaned.mat files.")
    out = {}
    for image in np.atleast_1d(images):
        try:
            box = np.array([image.bbox.x1, image.bbox.y1, image.bbox.x2, image.bbox.y2], dtype=np.float64)
            parts = np.asarray(image.parts, dtype=np.float64).T
        except AttributeError as error:
            raise ConfigError(f"{path}: an entry of 'images' lacks bbox or parts: it is not one of CMR's *_cub_cleaned.mat files.") from error
        if parts.shape != (num_parts, 3):
            raise ConfigError(f"{path}: {image.rel_path} has parts of shape {parts.T.shape}; CMR's files hold (3, {num_parts}).")
        out[str(image.rel_path)] = (box, parts)
    return out


def cmr_from_text(annotations: CUBAnnotations) -> tuple[np.ndarray, np.ndarray]:
    """The official text files' boxes and parts in CMR's ``.mat`` convention: (N, 4) ``x1, y1, x2, y2`` and (N, J, 3).

    CMR's box is ``(x, y, x + w - 1, y + h - 1)`` of ``bounding_boxes.txt``'s ``x y w h`` (its published
    dump of image 2, Black_Footed_Albatross_0009_34, holds 139 30 291 293 for the text's 139 30 153 264);
    its parts are taken to be the text's values unchanged (not checked against a real ``.mat`` here).
    """
    x, y, w, h = annotations.boxes_xywh.T
    boxes = np.stack([x, y, x + w - 1, y + h - 1], axis=1)
    parts = np.concatenate([annotations.parts_px, annotations.visible[..., None].astype(np.float64)], axis=-1)
    return boxes, parts


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


def missing_annotation_files(root: str | Path) -> list[Path]:
    """The annotation files of ``root`` that do not exist."""
    return [Path(root) / name for name in ANNOTATION_FILES if not (Path(root) / name).is_file()]
