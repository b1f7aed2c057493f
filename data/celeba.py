"""CelebA faces with their 5 landmarks on the MAFL split, aligned or in the wild, as SK read them.

On-disk layout under ``root`` (the official CelebA release):

- ``Anno/list_landmarks_align_celeba.txt`` (aligned) or ``Anno/list_landmarks_celeba.txt`` (wild):
  two header lines, then ``NNNNNN.jpg x1 y1 ... x5 y5`` in pixels of that image, landmarks in the
  order lefteye, righteye, nose, leftmouth, rightmouth.
- ``Img/img_align_celeba_png/NNNNNN.png`` (aligned, 178 x 218) or ``Img/img_celeba/NNNNNN.jpg`` (wild).
- ``Anno/list_bbox_celeba.txt`` (wild only): two header lines, then ``NNNNNN.jpg x y w h``.
- MAFL split files ``training.txt`` and ``testing.txt``, one file name per line; the number is the
  1-based CelebA index. They come with TCDCN, not with CelebA (see ``mafl_dir``).

Both variants resize the whole image to S x S with no crop, as SK did (the aligned 178 x 218 faces
are stretched; ``crop_box`` is then the whole, non-square image). SK returned the landmarks as
(y, x) to match its row-major argmax; here they are (x, y) like every dataset of the project.

"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.base import Evaluation, require_file
from data.crop import pixels_to_unit
from data.protocol import check_protocol, pixel_centre
from data.whole_image import SplitsDataModule, WholeImageDataset
from lightning_modules.app.errors import DamagedFileError

# ---------------------------------------------------------------------------------------------
# CelebA

CELEBA_SOURCE = (
    "CelebA comes from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Anno/ and Img/ under data.root); "
    "the MAFL split files training.txt and testing.txt come from "
    "https://github.com/zhzhanp/TCDCN-face-alignment (folder MAFL/; SK kept them at "
    "TCDCN-face-alignment/MAFL/): put them in <root>/MAFL or set data.mafl_dir."
)


def _read_celeba_rows(path: Path, numbers: set[int], num_values: int) -> dict[int, np.ndarray]:
    """Rows ``NNNNNN.jpg v1 ... vn`` of a CelebA annotation file (2 header lines) for the wanted numbers.

    Returns {1-based image number: (num_values,) float32}. Only the wanted rows are kept: the
    files list all 202,599 images.
    """
    rows = {}
    with open(require_file(path, CELEBA_SOURCE)) as f:
        for line in f.readlines()[2:]:
            fields = line.split()
            if not fields or int(Path(fields[0]).stem) not in numbers:
                continue
            if len(fields) != 1 + num_values:
                raise DamagedFileError(f"{path}: the row of {fields[0]} has {len(fields) - 1} values, expected {num_values}.")
            rows[int(Path(fields[0]).stem)] = np.asarray(fields[1:], dtype=np.float32)
    missing = sorted(numbers - rows.keys())
    if missing:
        raise DamagedFileError(f"{path} has no row for {len(missing)} images of the split, e.g. {missing[0]:06d}.jpg.")
    return rows


def _image_area(path: Path) -> int:
    """Pixel count of an image, from its header alone (the wild filter reads 20,000 of them)."""
    with Image.open(require_file(path, CELEBA_SOURCE)) as image:
        return image.size[0] * image.size[1]


class CelebADataset(WholeImageDataset):
    """CelebA images of one MAFL split with their 5 landmarks.

    Args:
        root: folder holding ``Anno/`` and ``Img/``.
        image_size: side S of the returned square images, in pixels.
        split: ``"train"`` (MAFL ``training.txt``) or ``"test"`` (MAFL ``testing.txt``).
        variant: ``"aligned"`` (aligned PNG crops) or ``"wild"`` (the original JPEGs).
        mafl_dir: folder holding ``training.txt`` and ``testing.txt``; default ``root/MAFL``.
        min_face_area_frac: wild only: drop images whose face box (``list_bbox_celeba.txt``)
            covers less than this fraction of the image area, as SK did with 0.3; 0 keeps all.
        protocol: ``default``: a landmark on pixel i lies at its centre, ``(i + 0.5) / size``;
            ``stablekeypoints``: ``i / size``, as SK (``data.protocol``).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        split: Literal["train", "test"],
        variant: Literal["aligned", "wild"] = "aligned",
        mafl_dir: str | Path | None = None,
        min_face_area_frac: float = 0.3,
        protocol: str = "default",
    ) -> None:
        root = Path(root)
        self.pixel_centre = pixel_centre(check_protocol(protocol))
        mafl_dir = Path(mafl_dir) if mafl_dir is not None else root / "MAFL"
        split_file = require_file(mafl_dir / ("training.txt" if split == "train" else "testing.txt"), CELEBA_SOURCE)
        numbers = [int(Path(name).stem) for name in split_file.read_text().split()]
        if variant == "aligned":
            landmark_file, image_dir, suffix = "list_landmarks_align_celeba.txt", "img_align_celeba_png", ".png"
        else:
            landmark_file, image_dir, suffix = "list_landmarks_celeba.txt", "img_celeba", ".jpg"
        landmarks = _read_celeba_rows(root / "Anno" / landmark_file, set(numbers), 10)
        image_dir = require_file(root / "Img" / image_dir, CELEBA_SOURCE)
        if variant == "wild" and min_face_area_frac > 0:
            boxes = _read_celeba_rows(root / "Anno" / "list_bbox_celeba.txt", set(numbers), 4)
            numbers = [
                n
                for n in numbers
                if boxes[n][2] * boxes[n][3] >= min_face_area_frac * _image_area(image_dir / f"{n:06d}{suffix}")
            ]
        super().__init__([image_dir / f"{n:06d}{suffix}" for n in numbers], image_size, CELEBA_SOURCE)
        #: (N, 5, 2) landmarks as (x, y) pixel indices of each source image.
        self.landmarks_px = np.asarray([landmarks[n] for n in numbers], dtype=np.float32).reshape(-1, 5, 2)

    def _labels(self, index: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels_to_unit(self.landmarks_px[index], width, height, self.pixel_centre), torch.ones(5, dtype=torch.bool)


class CelebADataModule(SplitsDataModule):
    """CelebA on the MAFL split (SK's ``celeba_aligned`` and ``celeba_wild``).

    Splits: train and regression are MAFL training (19,000 images before the wild filter), not
    augmented; test is MAFL testing (1,000). Metric: mean landmark error over the inter-ocular
    distance, x100.

    Args:
        root: CelebA folder holding ``Anno/`` and ``Img/``.
        variant: ``"aligned"`` or ``"wild"`` (see ``CelebADataset``).
        mafl_dir: folder of the MAFL ``training.txt`` / ``testing.txt``; default ``root/MAFL``.
        min_face_area_frac: wild only: minimum face-box fraction of the image area (SK: 0.3).
        kwargs: ``image_size``, ``batch_size``, ``num_workers``, ``path`` (see ``KeypointDataModule``).
    """

    keypoint_names = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

    def __init__(
        self,
        root: str,
        variant: Literal["aligned", "wild"] = "aligned",
        mafl_dir: str | None = None,
        min_face_area_frac: float = 0.3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.variant = variant
        self.mafl_dir = mafl_dir
        self.min_face_area_frac = min_face_area_frac

    def _build(self, split: Literal["train", "regression", "test"]) -> Dataset:
        if split == "train":
            return self._split("regression")
        return CelebADataset(
            self.root,
            self.image_size,
            "train" if split == "regression" else "test",
            variant=self.variant,
            mafl_dir=self.mafl_dir,
            min_face_area_frac=self.min_face_area_frac,
            protocol=self.protocol,
        )

    def evaluation(self) -> Evaluation:
        """Every row for the regressor; mean error over the 5 landmarks / inter-ocular distance x100."""
        return Evaluation("inter_ocular_error", {"left_eye": 0, "right_eye": 1}, protocol=self.protocol)
