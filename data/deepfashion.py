"""DeepFashion In-shop person images with their body keypoints, as SK read them.

On-disk layout under ``root``:

- ``data_train.csv`` and ``data_test.csv``: a header line, then one row per image whose second
  comma-separated field is the image path relative to ``img/``.
- ``data_train.json`` and ``data_test.json``: a list, in the rows' order, of dicts whose
  ``keypoints`` is a (J, 2) list of (x, y) pixel coordinates in the 256 x 256 image.
- ``img/<path>``: the In-shop ``Img/img`` images (256 x 256).

Differences from SK, on purpose:
- SK normalized these images twice (``Normalize(0.5, 0.5)`` here, then ``2x - 1`` before the VAE:
  input in [-3, 1], docs/method.md section 9.3). Images here are in [0, 1] like every dataset.
- SK rolled the keypoints to (y, x), the (row, column) order of its argmax detector; they stay
  (x, y) here.
- SK had no visibility: every keypoint was scored. Keypoints with a coordinate <= 0 (how such
  releases mark a missing joint) are invisible here; the published files, made from confident
  detections only, should hold none, and then nothing differs. ``protocol: stablekeypoints``
  scores every keypoint, as SK.

Images are resized whole to S x S; with the square 256 x 256 images that is no distortion.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from data.base import Evaluation, require_file
from data.crop import pixels_to_unit
from data.protocol import SK_EVAL_SIDE, check_protocol
from data.whole_image import SplitsDataModule, WholeImageDataset
from lightning_modules.app.errors import DamagedFileError


DEEPFASHION_SOURCE = (
    "DeepFashion here is the In-shop Clothes benchmark (https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html; "
    "its Img/img/ goes to <root>/img) with the keypoint files data_{train,test}.csv and .json of "
    "https://github.com/theRealSuperMario/unsupervised-disentangling/tree/reproducing_baselines/"
    "original_code/custom_datasets/deepfashion (the link AutoLink and SK give)."
)


class DeepFashionDataset(WholeImageDataset):
    """The DeepFashion images of one split with their keypoints.

    Args:
        root: folder holding the csv/json files and ``img/``.
        image_size: side S of the returned square images, in pixels.
        split: ``"train"`` or ``"test"``.
        protocol: ``default``: a keypoint on pixel i lies at ``(i + 0.5) / size`` of its image and one
            with a coordinate <= 0 is invisible; ``stablekeypoints``: ``i / 256`` and every keypoint
            visible, as SK (``data.protocol``).
    """

    def __init__(self, root: str | Path, image_size: int, split: Literal["train", "test"], protocol: str = "default") -> None:
        root = Path(root)
        self.protocol = check_protocol(protocol)
        with open(require_file(root / f"data_{split}.csv", DEEPFASHION_SOURCE), newline="") as f:
            names = [row[1].strip() for row in list(csv.reader(f))[1:] if row]
        json_path = require_file(root / f"data_{split}.json", DEEPFASHION_SOURCE)
        annotations = json.loads(json_path.read_text())
        if len(annotations) != len(names):
            raise DamagedFileError(
                f"{json_path} holds {len(annotations)} annotations but {root / f'data_{split}.csv'} lists "
                f"{len(names)} images: the two files must come from the same release."
            )
        #: (N, J, 2) keypoints as (x, y) pixel coordinates of each source image.
        keypoints = np.asarray([a["keypoints"] for a in annotations], dtype=np.float32)
        self.keypoints_px = keypoints.reshape(len(names), -1, 2)
        image_dir = require_file(root / "img", DEEPFASHION_SOURCE)
        super().__init__([image_dir / name for name in names], image_size, DEEPFASHION_SOURCE)

    def _labels(self, index: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.keypoints_px[index]
        if self.protocol == "stablekeypoints":
            return pixels_to_unit(xy, SK_EVAL_SIDE, SK_EVAL_SIDE, pixel_centre=0.0), torch.ones(len(xy), dtype=torch.bool)
        # Normalized by the image's own size, 256 for this release (SK divided by 256).
        return pixels_to_unit(xy, width, height), torch.from_numpy((xy > 0).all(axis=1))


class DeepFashionDataModule(SplitsDataModule):
    """DeepFashion In-shop (SK's ``deepfashion``).

    Splits: train and regression are the ``data_train`` images (not augmented), test the
    ``data_test`` images. Metric: PCK, the fraction of keypoints within 6 pixels of the
    256 x 256 image (higher is better). ``keypoint_names`` are numbered once a labelled split is
    built: the release does not name them and J comes from its json.

    Args:
        root: folder holding the csv/json files and ``img/``.
        kwargs: ``image_size``, ``batch_size``, ``num_workers``, ``path`` (see ``KeypointDataModule``).
    """

    def __init__(
        self,
        root: str,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root

    def _build(self, split: Literal["train", "regression", "test"]) -> Dataset:
        if split == "train":
            return self._split("regression")
        dataset = DeepFashionDataset(self.root, self.image_size, "train" if split == "regression" else "test", self.protocol)
        self.keypoint_names = tuple(f"kp{j:02d}" for j in range(dataset.keypoints_px.shape[1]))
        return dataset

    def evaluation(self) -> Evaluation:
        """PCK: the share of keypoints within 6 px at 256 px, per image, then averaged (higher is better)."""
        return Evaluation("percentage_correct_keypoints", {"scale": 256, "threshold_px": 6}, protocol=self.protocol)
