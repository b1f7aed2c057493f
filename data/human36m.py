"""Human3.6M frames with the background masked out and 32 body joints, as SK read them.

On-disk layout under ``root`` (the processed release AutoLink and SK read; 128 x 128 frames):

- ``S<n>/WithBackground/<action folder>/<frame>.jpg``: the frames.
- ``S<n>/BackgroudMask/<action folder>/<frame>.png`` (sic): binary foreground masks.
- ``S<n>/Landmarks/<action folder>/<frame>.mat``: ``keypoints_2d``, (32, 2) float.

Splits follow SK: subjects 1, 5, 6, 7, 8, 9 for training and regression, 11 for testing, action
folders whose name starts with Directions, Discussion, Posing, Waiting, Greeting or Walking (the
prefix also takes the WalkingDog folders, as in SK). SK multiplied each frame by its mask (black
background) and resized to 512; here the frame and the mask are each resized to S x S, then
multiplied.

Keypoint units: ``keypoints_2d`` holds (y, x) in [0, 1] of the frame. Evidence: SK used the values
raw as regression targets for its (row, column) argmax keypoints normalized to [0, 1], fitted with
``Y - 0.5`` and no intercept, and scored them x128, the frame side in pixels; another public
regression loader of the same files maps them with ``2k - 1`` to [-1, 1] and reads column 1 as x.
Here the columns are swapped to (x, y). A file holding pixel
values instead fails loudly (see ``Human36MDataset``). All joints are visible, as in SK.

Reading the ``.mat`` files needs scipy (pinned in ``requirements.txt`` for the tests, but optional):
it is imported only when a labelled split is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from data.base import Evaluation, require_file
from data.crop import crop_resize
from data.images import read_image
from data.whole_image import SplitsDataModule, WholeImageDataset
from lightning_modules.app.errors import DamagedFileError, MissingFileError



H36M_SOURCE = (
    "Human3.6M comes from http://vision.imar.ro/human3.6m/ (registration required); this loader reads the "
    "processed S<n>/WithBackground, S<n>/BackgroudMask (sic) and S<n>/Landmarks folders that AutoLink "
    "(https://github.com/xingzhehe/"
    "AutoLink-Self-supervised-Learning-of-Human-Skeletons-and-Object-Outlines-by-Linking-Keypoints) "
    "and SK use, under data.root."
)
#: Left/right joint pairs of the 32-joint Human3.6M skeleton, 0-based, exactly StableKeypoints'
#: list (``unsupervised_keypoints/eval.py``, ``swap_points``) except one pair. The joints: right
#: hip, knee, ankle, foot, toes = 1-5 <-> left 6-10; left shoulder, elbow, wrist, hand, small
#: finger, centre finger, thumb = 17-23 <-> right 25-31. Joints 0 and 11 (hip), 12-15 (spine, neck,
#: head) lie on the midline, and 16 and 24 are duplicates of a midline joint in the 32-joint
#: release (SK leaves them unswapped too). SK lists (21, 28) where (21, 29) is meant (docs/method.md
#: section 9, bug 9): with joint 28 paired twice, SK's "swap" copies joint 28 into both 20 and 21,
#: drops joint 20 and never moves 29. Here it is (21, 29), the two small fingers, so the swap is a
#: permutation; ``lightning_modules.metrics.swap_permutation`` rejects a list that names a joint twice.
H36M_LEFT_RIGHT_SWAP: tuple[tuple[int, int], ...] = (
    (1, 6), (2, 7), (3, 8), (4, 9), (5, 10),
    (17, 25), (18, 26), (19, 27), (20, 28), (21, 29), (22, 30), (23, 31),
)  # fmt: skip
#: StableKeypoints' own list (``unsupervised_keypoints/eval.py``, ``swap_points``), used by ``protocol:
#: stablekeypoints``: joint 28 is named twice, and SK's swap assigns the pairs in order, so it reads
#: joint 28 into both 20 and 21, joint 21 into 28, and drops joint 20 (``lightning_modules.metrics.sk_swap_index``).
SK_LEFT_RIGHT_SWAP: tuple[tuple[int, int], ...] = (
    (1, 6), (2, 7), (3, 8), (4, 9), (5, 10),
    (17, 25), (18, 26), (19, 27), (20, 28), (21, 28), (22, 30), (23, 31),
)  # fmt: skip
H36M_ACTIONS = ("Directions", "Discussion", "Posing", "Waiting", "Greeting", "Walking")


def _frame_order(path: Path) -> tuple[int, int | str]:
    """Sort key: numeric frame names in numeric order (``2.jpg`` before ``10.jpg``)."""
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def _import_loadmat() -> Callable[..., dict]:
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise ImportError("Reading Human3.6M's Landmarks/*.mat files needs scipy: pip install scipy") from error
    return loadmat


class Human36MDataset(WholeImageDataset):
    """Masked Human3.6M frames of some subjects, with their 32 joints when ``labelled``.

    Args:
        root: the folder holding ``S1/``, ``S5/``, ...
        image_size: side S of the returned square images, in pixels.
        subjects: subject numbers n of the ``S<n>`` folders to read.
        actions: action-folder name prefixes to keep.
        labelled: read ``Landmarks/*.mat`` (needs scipy) and return keypoints.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        subjects: Sequence[int],
        actions: Sequence[str] = H36M_ACTIONS,
        labelled: bool = True,
    ) -> None:
        root = Path(root)
        self._loadmat = _import_loadmat() if labelled else None
        files = []
        for subject in subjects:
            frames_dir = require_file(root / f"S{subject}" / "WithBackground", H36M_SOURCE)
            for folder in sorted(d for d in frames_dir.iterdir() if d.is_dir() and d.name.startswith(tuple(actions))):
                files += sorted((f for f in folder.iterdir() if f.suffix.lower() == ".jpg"), key=_frame_order)
        if not files:
            raise MissingFileError(
                f"No frames of subjects {list(subjects)} and actions {list(actions)} under {root}. {H36M_SOURCE}"
            )
        super().__init__(files, image_size, H36M_SOURCE)

    def _sibling(self, index: int, folder: str, suffix: str) -> Path:
        """The file of frame ``index`` in another top folder of its subject (mask, landmarks)."""
        frame = self.files[index]
        return require_file(frame.parents[2] / folder / frame.parent.name / (frame.stem + suffix), H36M_SOURCE)

    def _load(self, index: int, mirror: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        image, size = super()._load(index, mirror)
        mask = read_image(self._sibling(index, "BackgroudMask", ".png"))
        # Binarized first: the masks are bilevel, stored as 0/1 or 0/255 depending on the writer.
        mask = torch.from_numpy(np.array(mask.convert("L")) > 0).float().expand(3, -1, -1)
        # Resized like the image so its edge is as soft as SK's bilinear-upsampled mask.
        height, width = mask.shape[-2:]
        return image * crop_resize(mask, (0, 0, width, height), self.image_size, (0, 0, 0), mirror=mirror), size

    def _labels(self, index: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._loadmat is None:
            return None
        path = self._sibling(index, "Landmarks", ".mat")
        yx = np.asarray(self._loadmat(path)["keypoints_2d"], dtype=np.float32)
        if np.abs(yx).max() > 2:
            raise DamagedFileError(
                f"{path}: keypoints_2d reaches {np.abs(yx).max():.1f}; this loader expects (y, x) in [0, 1] of "
                "the frame (the processed release SK used), not pixels."
            )
        return torch.from_numpy(yx[:, ::-1].copy()), torch.ones(len(yx), dtype=torch.bool)


class Human36MDataModule(SplitsDataModule):
    """Human3.6M, background masked (SK's ``human3.6m``).

    Splits: train (unlabelled) and regression are the frames of ``train_subjects``, test those of
    ``test_subjects``. Regressor: StableKeypoints' orientation-invariant fit (``fit_regressor``).
    Metric: mean joint error x128, the smaller of the plain and the left/right-swapped ground truth.

    Args:
        root: the folder holding ``S1/``, ``S5/``, ...
        train_subjects: subjects of the train and regression splits.
        test_subjects: subjects of the test split.
        actions: action-folder name prefixes to keep.
        kwargs: ``image_size``, ``batch_size``, ``num_workers``, ``path`` (see ``KeypointDataModule``).
    """

    # Numbered: the release stores the 32 joints of the Human3.6M skeleton without names.
    keypoint_names = tuple(f"kp{j:02d}" for j in range(32))

    def __init__(
        self,
        root: str,
        train_subjects: tuple[int, ...] = (1, 5, 6, 7, 8, 9),
        test_subjects: tuple[int, ...] = (11,),
        actions: tuple[str, ...] = H36M_ACTIONS,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.train_subjects = train_subjects
        self.test_subjects = test_subjects
        self.actions = actions

    def _build(self, split: Literal["train", "regression", "test"]) -> Dataset:
        subjects = self.test_subjects if split == "test" else self.train_subjects
        return Human36MDataset(self.root, self.image_size, subjects, self.actions, labelled=split != "train")

    def evaluation(self) -> Evaluation:
        """StableKeypoints' orientation-invariant fit and error (x128), with ``H36M_LEFT_RIGHT_SWAP`` (``default``)
        or SK's own ``SK_LEFT_RIGHT_SWAP`` and swap (``stablekeypoints``)."""
        pairs = SK_LEFT_RIGHT_SWAP if self.protocol == "stablekeypoints" else H36M_LEFT_RIGHT_SWAP
        return Evaluation("orientation_invariant_error", {"scale": 128}, regressor="orientation_invariant",
                          swap_pairs=pairs, protocol=self.protocol)
