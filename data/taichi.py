"""Tai-Chi-HD: unlabelled video frames for training, 18 body keypoints for evaluation, as SK read them.

On-disk layout under ``root``:

- ``train/<video>/<frame>.png``: the unlabelled training frames (a torchvision ImageFolder tree).
- ``landmark/taichi_train_gt.pkl`` and ``landmark/taichi_test_gt.pkl``: pickled pandas DataFrames
  with columns ``file_name`` and ``value``, ``value`` an (18, 2) array of pixel coordinates in the
  256 x 256 evaluation image, columns (x, y); a missing keypoint holds negative values (-1).
- ``eval_images/taichi-256/train/<file_name>`` and ``eval_images/taichi-256/test/<file_name>``.

Keypoint order: the pickles store (x, y). SK divided by 256 and swapped the two columns to (y, x),
the (row, column) order of its argmax detector (its plotting code scatters ``pose[:, 1]`` as x);
AutoLink, whose loader SK adapted, did the same swap. Here the columns stay (x, y), the project's
order. Visibility follows SK: both coordinates > 0.

Reading the pickles needs pandas, which the project does not require: it is imported only when a
labelled split is built. Images are resized whole to S x S.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from data.base import Evaluation, require_file
from data.crop import pixels_to_unit
from data.protocol import SK_EVAL_SIDE, check_protocol
from data.image_folder import list_images
from data.whole_image import SplitsDataModule, WholeImageDataset
from lightning_modules.app.errors import DamagedFileError, MissingFileError


TAICHI_SOURCE = (
    "Tai-Chi-HD, as prepared for https://github.com/AliaksandrSiarohin/motion-cosegmentation (the link "
    "AutoLink and SK give), holds train/<video>/<frame>.png, landmark/taichi_{train,test}_gt.pkl and "
    "eval_images/taichi-256/{train,test}/ under data.root."
)


def _read_pose_table(path: Path) -> tuple[list[str], np.ndarray]:
    """A ``landmark/taichi_*_gt.pkl`` -> (file names, (N, J, 2) float32 (x, y) pixel coordinates)."""
    require_file(path, TAICHI_SOURCE)
    try:
        import pandas
    except ImportError as error:
        raise ImportError(
            f"Reading {path} needs pandas (the Tai-Chi landmarks are a pickled DataFrame): pip install pandas"
        ) from error
    table = pandas.read_pickle(path)
    if not {"file_name", "value"} <= set(table.columns):
        raise DamagedFileError(f"{path} has columns {list(table.columns)}; expected 'file_name' and 'value'.")
    values = np.asarray([np.asarray(v, dtype=np.float32) for v in table["value"]], dtype=np.float32)
    if values.ndim != 3 or values.shape[-1] != 2:
        raise DamagedFileError(f"{path}: 'value' holds arrays of shape {values.shape[1:]}; expected (J, 2).")
    return [str(name) for name in table["file_name"]], values


class TaiChiDataset(WholeImageDataset):
    """The labelled Tai-Chi evaluation frames of one split.

    Args:
        root: the Tai-Chi-HD folder.
        image_size: side S of the returned square images, in pixels.
        split: ``"train"`` (the regression frames) or ``"test"``.
        protocol: ``default``: a keypoint on pixel i lies at ``(i + 0.5) / size`` of its image;
            ``stablekeypoints``: ``i / 256``, as SK (``data.protocol``).
    """

    def __init__(self, root: str | Path, image_size: int, split: Literal["train", "test"], protocol: str = "default") -> None:
        root = Path(root)
        self.protocol = check_protocol(protocol)
        names, self.keypoints_px = _read_pose_table(root / "landmark" / f"taichi_{split}_gt.pkl")
        image_dir = require_file(root / "eval_images" / "taichi-256" / split, TAICHI_SOURCE)
        super().__init__([image_dir / name for name in names], image_size, TAICHI_SOURCE)

    def _labels(self, index: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.keypoints_px[index]
        visible = torch.from_numpy((xy > 0).all(axis=1))
        if self.protocol == "stablekeypoints":
            return pixels_to_unit(xy, SK_EVAL_SIDE, SK_EVAL_SIDE, pixel_centre=0.0), visible
        # Normalized by the image's own size, which is 256 for this release (SK divided by 256).
        return pixels_to_unit(xy, width, height), visible


class TaiChiDataModule(SplitsDataModule):
    """Tai-Chi-HD (SK's ``taichi``).

    Splits: train is ``train/`` (unlabelled, mirrored with probability ``train_flip_prob`` as SK's
    ``RandomHorizontalFlip``), regression is the labelled ``taichi-256/train`` frames, test the
    ``taichi-256/test`` frames. Metric: the sum over visible keypoints of the L2 error in pixels of
    the 256 x 256 image.

    Args:
        root: the Tai-Chi-HD folder.
        train_flip_prob: probability of mirroring a training frame.
        kwargs: ``image_size``, ``batch_size``, ``num_workers``, ``path`` (see ``KeypointDataModule``).
    """

    # The release does not name its 18 keypoints.
    keypoint_names = tuple(f"kp{j:02d}" for j in range(18))

    def __init__(
        self,
        root: str,
        train_flip_prob: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.train_flip_prob = train_flip_prob

    def _build(self, split: Literal["train", "regression", "test"]) -> Dataset:
        if split == "train":
            train_dir = require_file(Path(self.root) / "train", TAICHI_SOURCE)
            try:
                files = list_images(train_dir)
            except FileNotFoundError as error:
                raise MissingFileError(f"{train_dir} holds no images. {TAICHI_SOURCE}") from error
            return WholeImageDataset(files, self.image_size, TAICHI_SOURCE, flip_prob=self.train_flip_prob)
        return TaiChiDataset(self.root, self.image_size, "train" if split == "regression" else "test", self.protocol)

    def evaluation(self) -> Evaluation:
        """Visible rows for the regressor; the sum over visible keypoints of the error at 256 px."""
        return Evaluation("summed_keypoint_error", {"scale": 256}, protocol=self.protocol)
