"""``data.protocol``: ``default`` and ``stablekeypoints`` on small fixtures, every benchmark, literal values.

Expected numbers are worked out by hand from StableKeypoints' documented formulas (its
``unsupervised_keypoints/eval.py``, ``keypoint_regressor.py``, ``datasets/*.py``), written out
in each test's comments. The evaluation tests fit the regressor on rows whose targets equal
their keypoints (K = J), so the fit is the identity and a test image's error is the offset the
test puts between its keypoints and its ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.base
from data.base import Evaluation
from data.celeba import CelebADataModule
from data.cub import CUBDataModule, CUBDataset
from data.deepfashion import DeepFashionDataModule, DeepFashionDataset
from data.human36m import H36M_LEFT_RIGHT_SWAP, SK_LEFT_RIGHT_SWAP, Human36MDataModule
from data.protocol import cmr_square_box, sk_regression_indices
from data.taichi import TaiChiDataModule
from lightning_modules.app.errors import ConfigError
from lightning_modules.evaluation import RegressorEvaluation
from lightning_modules.metrics import sk_swap_index, swap_permutation

from tests.test_datasets_other import CELEBA_SIZES, celeba_landmarks, make_celeba, make_deepfashion

S = 64


# ---------------------------------------------------------------------------------------------- the option


def test_every_labelled_datamodule_takes_the_protocol_and_rejects_a_typo(tmp_path: Path) -> None:
    for module in (CelebADataModule, TaiChiDataModule, DeepFashionDataModule, Human36MDataModule):
        assert module(root="unused").evaluation().protocol == "default"
        assert module(root="unused", protocol="stablekeypoints").evaluation().protocol == "stablekeypoints"
        with pytest.raises(ConfigError, match=r"data.protocol='sk'.*'default', 'stablekeypoints'"):
            module(root="unused", protocol="sk")


def test_paper_base_config_names_the_protocol() -> None:
    text = (Path(__file__).parents[1] / "conf" / "paper" / "base.yaml").read_text()
    assert "protocol: default" in text and "stablekeypoints" in text


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(evaluation: Evaluation, keypoints: torch.Tensor, targets: torch.Tensor, visible: torch.Tensor) -> float:
    """Fits on 80 rows with targets = keypoints (the identity), then scores the given test rows."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.rand(80, keypoints.shape[1], 2, generator=generator, dtype=torch.float64).float()
    run = RegressorEvaluation.of(evaluation)
    run.update(0, torch.arange(80), rows, rows, torch.ones(rows.shape[:2], dtype=torch.bool))
    run.fit()
    run.update(1, torch.arange(len(keypoints)), keypoints, targets, visible)
    return run.score()


def offsets_case(offsets: list[list[float]], visible: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One test image: ground truth on a diagonal, keypoints = ground truth + ``offsets``."""
    targets = torch.tensor([[[0.2 + 0.1 * j, 0.3 + 0.05 * j] for j in range(len(offsets))]])
    return targets + torch.tensor([offsets]), targets, torch.tensor([visible])


@pytest.mark.parametrize("protocol", ["default", "stablekeypoints"])
def test_cub_visible_error_both_protocols(protocol: str) -> None:
    # Distances 0.05, 0.1 (visible) and 0.5 (invisible): SK's `visible` = sum(l2 * vis) / sum(vis)
    # = 0.075, x100 here under both protocols (SK logs the fraction 0.075).
    case = offsets_case([[0.03, 0.04], [0.0, 0.1], [0.3, 0.4]], [True, True, False])
    value = evaluate(Evaluation("normalized_keypoint_error", protocol=protocol), *case)
    assert value == pytest.approx(7.5, abs=1e-5)


@pytest.mark.parametrize("protocol", ["default", "stablekeypoints"])
def test_taichi_summed_error_both_protocols(protocol: str) -> None:
    # SK's `mean_average_error`: sum over visible keypoints of l2 x 256 = (0.05 + 0.1) x 256 = 38.4.
    case = offsets_case([[0.03, 0.04], [0.0, 0.1], [0.3, 0.4]], [True, True, False])
    value = evaluate(Evaluation("summed_keypoint_error", {"scale": 256}, protocol=protocol), *case)
    assert value == pytest.approx(38.4, abs=1e-5)


@pytest.mark.parametrize(("protocol", "expected"), [("default", 3.125), ("stablekeypoints", 7.5)])
def test_celeba_inter_ocular_error_reads_visibility_only_by_default(protocol: str, expected: float) -> None:
    # Ground-truth eyes 0.4 apart; distances 0.05, 0, 0.1, 0, 0.
    # default: landmark 2 invisible -> 0.05 / 4 / 0.4 = 0.03125 -> 3.125; SK's `inter_eye_distance`
    # averages all five: 0.15 / 5 / 0.4 = 0.075 -> 7.5 (CelebA's landmarks are all visible: no difference there).
    targets = torch.tensor([[[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]])
    offsets = torch.tensor([[[0.03, 0.04], [0.0, 0.0], [0.0, 0.1], [0.0, 0.0], [0.0, 0.0]]])
    visible = torch.tensor([[True, True, False, True, True]])
    evaluation = Evaluation("inter_ocular_error", {"left_eye": 0, "right_eye": 1}, protocol=protocol)
    assert evaluate(evaluation, targets + offsets, targets, visible) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("protocol", "expected"), [("default", 200 / 3), ("stablekeypoints", 75.0)])
def test_deepfashion_pck_scores_every_keypoint_under_stablekeypoints(protocol: str, expected: float) -> None:
    # Offsets 3, 5, 7 px (visible) and 2 px (invisible) at 256 px, threshold 6 px (strict):
    # default 2 of 3 visible = 66.67 %; SK's `pck` takes all four: 3 of 4 = 75 % (SK logs 0.75).
    case = offsets_case([[3 / 256, 0.0], [5 / 256, 0.0], [7 / 256, 0.0], [2 / 256, 0.0]], [True, True, True, False])
    value = evaluate(Evaluation("percentage_correct_keypoints", {"scale": 256, "threshold_px": 6}, protocol=protocol), *case)
    assert value == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("protocol", "pck", "weight"), [
    ("default", 200 / 3, [[1.0, 0.0], [0.0, 1.0]]),
    ("stablekeypoints", 75.0, [[5 / 9, -4 / 9], [-4 / 9, 5 / 9]]),
])
def test_built_metric_and_fit_read_visibility_only_where_sk_does(protocol: str, pck: float, weight: list) -> None:
    from lightning_modules.evaluation import build_metric, regression_protocol

    evaluation = DeepFashionDataModule(root="unused", protocol=protocol).evaluation()
    metric = build_metric(evaluation)
    keypoints, targets, visible = offsets_case([[3 / 256, 0], [5 / 256, 0], [7 / 256, 0], [2 / 256, 0]], [True, True, True, False])
    metric.update(keypoints, targets, visible)
    assert float(metric.compute()) == pytest.approx(pck, abs=1e-5)
    # One keypoint, three rows; centred keypoints (0.1, 0), (0, 0.1), (0.2, 0.2), targets equal to
    # them except the third, (0, 0) and invisible. default fits rows 1-2: W = I. SK fits all three:
    # W = (X^T X)^-1 X^T Y = [[0.05, 0.04], [0.04, 0.05]]^-1 x 0.01 = [[5, -4], [-4, 5]] / 9.
    keypoints = torch.tensor([[[0.6, 0.5]], [[0.5, 0.6]], [[0.7, 0.7]]])
    targets = torch.tensor([[[0.6, 0.5]], [[0.5, 0.6]], [[0.5, 0.5]]])
    regressor = regression_protocol(evaluation)(keypoints, targets, torch.tensor([[True], [True], [False]]))
    torch.testing.assert_close(regressor.weight, torch.tensor(weight, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sk_swap_index_is_sks_assignment_not_a_permutation() -> None:
    index = sk_swap_index(32, SK_LEFT_RIGHT_SWAP).tolist()
    # (20, 28) then (21, 28): 20 and 21 both read 28, 28 reads 21, 29 stays, 20 is read by none.
    assert index[20] == 28 and index[21] == 28 and index[28] == 21 and index[29] == 29
    assert index[:11] == [0, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5] and index[22:24] == [30, 31] and index[30:] == [22, 23]
    assert 20 not in index
    # The project's pairs make a permutation: 20 <-> 28 and 21 <-> 29.
    assert swap_permutation(32, H36M_LEFT_RIGHT_SWAP).tolist()[20:30] == [28, 29, 30, 31, 24, 17, 18, 19, 20, 21]
    with pytest.raises(ValueError, match="more than one swap pair"):
        swap_permutation(32, SK_LEFT_RIGHT_SWAP)


@pytest.mark.parametrize(("protocol", "expected"), [("default", 0.0), ("stablekeypoints", 0.8)])
def test_h36m_orientation_invariant_error_with_each_swap(protocol: str, expected: float) -> None:
    # Predictions P_j = (0.1 + 0.02 j, 0.5); ground truth G = P mirrored with the true pairs
    # (21, 29 fixed). default: the swapped prediction is G exactly -> 0. SK: plain error
    # 0.02 (10 x 5 + 14 x 8) / 32 x 128 = 12.96; SK's swapped prediction differs from G at
    # joints 21 (P28 vs P29: 1 step), 28 (P21 vs P20: 1) and 29 (P29 vs P21: 8):
    # 0.02 x 10 / 32 x 128 = 0.8, the smaller.
    predictions = torch.tensor([[[0.1 + 0.02 * j, 0.5] for j in range(32)]])
    targets = predictions[:, swap_permutation(32, H36M_LEFT_RIGHT_SWAP)]
    evaluation = Human36MDataModule(root="unused", protocol=protocol).evaluation()
    assert evaluation.swap_pairs == (SK_LEFT_RIGHT_SWAP if protocol == "stablekeypoints" else H36M_LEFT_RIGHT_SWAP)
    value = evaluate(evaluation, predictions, targets, torch.ones(1, 32, dtype=torch.bool))
    assert value == pytest.approx(expected, abs=1e-5)


def test_h36m_stablekeypoints_fit_swaps_ground_truth_with_sks_index() -> None:
    # 300 rows whose ground truth equals the keypoints and 100 mirrored with the true pairs: the
    # default fit swaps the 100 back and is the identity (a test image scores 0); SK's index cannot
    # restore joints 20, 21, 28 and 29, so its fit keeps an error there.
    generator = torch.Generator().manual_seed(1)
    rows = torch.rand(400, 32, 2, generator=generator, dtype=torch.float64).float()
    mirrored = rows.clone()
    mirrored[300:] = rows[300:][:, swap_permutation(32, H36M_LEFT_RIGHT_SWAP)]
    test = torch.rand(1, 32, 2, generator=generator, dtype=torch.float64).float()
    scores = {}
    for protocol in ("default", "stablekeypoints"):
        run = RegressorEvaluation.of(Human36MDataModule(root="unused", protocol=protocol).evaluation())
        run.update(0, torch.arange(400), rows, mirrored, torch.ones(400, 32, dtype=torch.bool))
        run.fit()
        run.update(1, torch.tensor([0]), test, test, torch.ones(1, 32, dtype=torch.bool))
        scores[protocol] = run.score()
    assert scores["default"] == pytest.approx(0.0, abs=1e-5)
    assert scores["stablekeypoints"] > 0.01


# ---------------------------------------------------------------------------------------------- 50,000 cap


def test_sk_regression_cap_takes_the_images_of_sks_shuffle() -> None:
    assert sk_regression_indices(7, seed=0, cap=4) == [0, 1, 4, 5]
    assert sk_regression_indices(7, seed=5, cap=4) == [0, 2, 3, 6]
    assert sk_regression_indices(3, seed=0, cap=4) == [0, 1, 2]
    # The draw SK's own loader makes after torch.manual_seed(0): 0, 4, 1, 5, then 2, 6, 3.
    torch.manual_seed(0)
    first = [int(batch) for batch in torch.utils.data.DataLoader(list(range(7)), shuffle=True, batch_size=1)][:4]
    assert sorted(first) == [0, 1, 4, 5]


@pytest.mark.parametrize(("protocol", "regression_images"), [("default", 2), ("stablekeypoints", 1)])
def test_regression_loader_is_capped_under_stablekeypoints_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                protocol: str, regression_images: int) -> None:
    monkeypatch.setattr(data.base, "SK_MAX_REGRESSION_IMAGES", 1)
    datamodule = DeepFashionDataModule(str(make_deepfashion(tmp_path)), image_size=S, batch_size=2, num_workers=0,
                                       protocol=protocol)
    datamodule.setup("test")
    regression, test = datamodule.test_dataloader()
    assert (len(regression.dataset), len(test.dataset)) == (regression_images, 1)


# ---------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize(("protocol", "offset"), [("default", 0.5), ("stablekeypoints", 0.0)])
def test_celeba_pixel_to_unit(tmp_path: Path, protocol: str, offset: float) -> None:
    # Image 5 is 38 x 46 with its left eye on pixel (9, 15): (9.5 / 38, 15.5 / 46) by default,
    # SK's (9 / 38, 15 / 46) (datasets/celeba.py: keypoints / [width, height]).
    root = make_celeba(tmp_path, "aligned")
    datamodule = CelebADataModule(str(root), image_size=S, num_workers=0, protocol=protocol)
    sample = datamodule.test_dataset()[1]
    assert celeba_landmarks(5)[:2] == [9, 15] and CELEBA_SIZES[5] == (38, 46)
    torch.testing.assert_close(sample["keypoints"][0], torch.tensor([(9 + offset) / 38, (15 + offset) / 46]))


def test_deepfashion_stablekeypoints_divides_by_256_and_scores_every_keypoint(tmp_path: Path) -> None:
    # Train image 1 (48 x 40): keypoints (15, 30), (24, 8), (40, 20), (-1, 12).
    root = make_deepfashion(tmp_path)
    default = DeepFashionDataset(root, S, "train")[1]
    sk = DeepFashionDataset(root, S, "train", protocol="stablekeypoints")[1]
    assert default["visible"].tolist() == [True, True, True, False]
    torch.testing.assert_close(default["keypoints"][[0, 3]], torch.tensor([[15.5 / 48, 30.5 / 40], [0.0, 0.0]]))
    assert sk["visible"].tolist() == [True, True, True, True]
    torch.testing.assert_close(sk["keypoints"], torch.tensor([[15, 30], [24, 8], [40, 20], [-1, 12]]) / 256.0)


@pytest.mark.parametrize("protocol", ["default", "stablekeypoints"])
def test_taichi_pixel_to_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    # A 128 x 96 frame with keypoint 0 on pixel (64, 48) and keypoint 1 missing (-1, -1):
    # default (64.5 / 128, 48.5 / 96); SK divides by 256 whatever the frame's size: (0.25, 0.1875).
    import data.taichi as taichi

    image_dir = tmp_path / "eval_images" / "taichi-256" / "test"
    image_dir.mkdir(parents=True)
    Image.fromarray(np.full((96, 128, 3), 100, dtype=np.uint8)).save(image_dir / "a.png")
    values = np.array([[[64, 48], [-1, -1]]], dtype=np.float32)
    monkeypatch.setattr(taichi, "_read_pose_table", lambda path: (["a.png"], values))
    sample = taichi.TaiChiDataset(tmp_path, S, "test", protocol=protocol)[0]
    expected = [64.5 / 128, 48.5 / 96] if protocol == "default" else [0.25, 0.1875]
    torch.testing.assert_close(sample["keypoints"][0], torch.tensor(expected))
    assert sample["visible"].tolist() == [True, False]  # both coordinates > 0, as SK


# ---- CUB: one 200 x 100 image per split, CMR box (51, 21, 150, 60), beak on (101, 41), back on (61, 31)

PARTS = {0: (61, 31), 1: (101, 41), 2: (121, 51), 3: (81, 45), 4: (141, 35), 5: (91, 55)}


def write_cub(root: Path) -> Path:
    """The official layout, two images (train, test) of class 1, box ``51 21 100 40`` (x y w h)."""
    names = ["001.Bird/a.jpg", "001.Bird/b.jpg"]
    (root / "images" / "001.Bird").mkdir(parents=True)
    (root / "parts").mkdir()
    for name in names:
        Image.fromarray(np.full((100, 200, 3), 90, dtype=np.uint8)).save(root / "images" / name)
    from data.cub_files import PART_NAMES

    files = {
        "images.txt": [f"{i} {name}" for i, name in enumerate(names, start=1)],
        "image_class_labels.txt": ["1 1", "2 1"],
        "classes.txt": ["1 001.Bird"],
        "train_test_split.txt": ["1 1", "2 0"],
        "bounding_boxes.txt": ["1 51.0 21.0 100.0 40.0", "2 51.0 21.0 100.0 40.0"],
        "parts/parts.txt": [f"{j + 1} {name}" for j, name in enumerate(PART_NAMES)],
        "parts/part_locs.txt": [
            f"{i} {j + 1} {PARTS[j][0] if j in PARTS else 0}.0 {PARTS[j][1] if j in PARTS else 0}.0 {int(j in PARTS)}"
            for i in (1, 2) for j in range(15)
        ],
    }  # fmt: skip
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def write_cmr(cachedir: Path, beak: tuple[int, int]) -> Path:
    """CMR's two split files for the fixture, its box (51, 21, 150, 60) and the beak moved to ``beak``."""
    savemat = pytest.importorskip("scipy.io").savemat
    for split, name in (("train", "001.Bird/a.jpg"), ("test", "001.Bird/b.jpg")):
        parts = np.zeros((3, 15))
        for j, xy in {**PARTS, 1: beak}.items():
            parts[:, j] = (*xy, 1)
        bbox = np.zeros((1, 1), dtype=[(k, "O") for k in ("x1", "y1", "x2", "y2")])
        bbox[0, 0] = (51, 21, 150, 60)
        images = np.zeros((1, 1), dtype=[(k, "O") for k in ("rel_path", "bbox", "parts")])
        images[0, 0] = (name, bbox, parts)
        (cachedir / "data").mkdir(parents=True, exist_ok=True)
        savemat(str(cachedir / "data" / f"{split}_cub_cleaned.mat"), {"images": images})
    return cachedir


def test_cmr_square_box_is_sks_padded_whole_pixel_square() -> None:
    # SK: box - 1 = (50, 20, 149, 59), 100 x 40; 5 % out: (45, 18, 154, 61), 110 x 44; square:
    # y0 = 18 - round(66 / 2) = -15.
    assert cmr_square_box(np.array([51, 21, 150, 60]), np.array([0.05] * 4)) == (45, -15, 110)
    # A jittered box 115 x 42: round(73 / 2) = round(36.5) = 36 (half to even, as Python rounds).
    assert cmr_square_box(np.array([51, 21, 150, 60]), np.array([0.1, 0.0, 0.05, 0.05])) == (40, -16, 115)


@pytest.mark.parametrize(
    ("protocol", "cmr", "beak", "back"),
    [
        # default: the text box (51, 21, 100 x 40) + 5 % is the continuous square (46, -14, 156, 96);
        # a part on pixel i lies at its centre: beak (101.5 - 46) / 110, (41.5 + 14) / 110.
        ("default", False, (55.5 / 110, 55.5 / 110), (15.5 / 110, 45.5 / 110)),
        # SK from the text files (CMR's box (51, 21, 150, 60)): square (45, -15) side 110,
        # (x - 1 - x0) / side: beak (55 / 110, 55 / 110), back (15 / 110, 45 / 110).
        ("stablekeypoints", False, (0.5, 0.5), (15 / 110, 45 / 110)),
        # SK from CMR's .mat files, whose beak is at (111, 41): (65 / 110, 55 / 110).
        ("stablekeypoints", True, (65 / 110, 0.5), (15 / 110, 45 / 110)),
    ],
)
def test_cub_test_crops_under_each_protocol(tmp_path: Path, protocol: str, cmr: bool, beak: tuple, back: tuple) -> None:
    root = write_cub(tmp_path / "CUB_200_2011")
    cachedir = str(write_cmr(tmp_path / "cachedir" / "cub", beak=(111, 41))) if cmr else None
    datamodule = CUBDataModule(str(root), subset="cub_all", image_size=S, num_workers=0, protocol=protocol, cmr_cachedir=cachedir)
    datamodule.setup("test")
    sample = datamodule.test_dataset()[0]
    torch.testing.assert_close(sample["keypoints"][[1, 0]], torch.tensor([beak, back], dtype=torch.float32))
    box = [46.0, -14.0, 156.0, 96.0] if protocol == "default" else [45.0, -15.0, 155.0, 95.0]
    assert sample["crop_box"].tolist() == box


@pytest.mark.parametrize(
    ("protocol", "beak", "back", "box"),
    [
        # default: the tight square of (51, 21, 151, 61): (51, -9, 151, 91); (101.5 - 51) / 100 = 0.505.
        ("default", (0.505, 0.505), (0.105, 0.405), [51.0, -9.0, 151.0, 91.0]),
        # AutoLink's cub.h5: 200 x 100 trims to 192 x 96 (ox 4, oy 2); square (51, -9, 150, 90)
        # clamped to (51, 0, 150, 90), shifted on its low side: (47, 0, 150, 90); raw parts - (4, 2):
        # beak (97 - 47) / 103, 39 / 90; back (57 - 47) / 103, 29 / 90. Pixels: (47 + 4, 0 + 2, 154, 92).
        ("stablekeypoints", (50 / 103, 39 / 90), (10 / 103, 29 / 90), [51.0, 2.0, 154.0, 92.0]),
    ],
)
def test_cub_aligned_crops_under_each_protocol(tmp_path: Path, protocol: str, beak: tuple, back: tuple, box: list) -> None:
    root = write_cub(tmp_path / "CUB_200_2011")
    datamodule = CUBDataModule(str(root), subset="cub_aligned", image_size=S, num_workers=0, protocol=protocol)
    sample = datamodule.test_dataset()[0]
    torch.testing.assert_close(sample["keypoints"][[1, 0]], torch.tensor([beak, back], dtype=torch.float32))
    assert sample["crop_box"].tolist() == box


def test_cub_stablekeypoints_mirror_flips_pixel_indices(tmp_path: Path) -> None:
    # Mirrored 64 px crop: x -> (64 - 1) / 64 - x (CMR flips pixel indices); the beak (index 1) keeps its
    # name: 63 / 64 - 0.5 = 0.484375. The back: 63 / 64 - 15 / 110.
    dataset = CUBDataset(write_cub(tmp_path / "CUB_200_2011"), split="test", image_size=S, protocol="stablekeypoints")
    box, keypoints, visible = dataset.stablekeypoints_crop(0, [0.05] * 4, True, 200, 100)
    assert box == (45.0, -15.0, 155.0, 95.0) and visible[:6].all() and not visible[6:].any()
    torch.testing.assert_close(keypoints[[1, 0]], torch.tensor([[0.484375, 0.5], [63 / 64 - 15 / 110, 45 / 110]]))


@pytest.mark.parametrize("protocol", ["default", "stablekeypoints"])
def test_cub_regression_crops_are_augmented_and_repeatable_under_stablekeypoints_only(tmp_path: Path, protocol: str) -> None:
    root = write_cub(tmp_path / "CUB_200_2011")
    datamodule = CUBDataModule(str(root), subset="cub_all", image_size=S, num_workers=0, protocol=protocol)
    datamodule.setup("test")
    regression = datamodule.regression_dataset()
    first, again = regression[0], regression[0]
    assert torch.equal(first["crop_box"], again["crop_box"]) and first["flipped"] == again["flipped"]
    # Unjittered: (46, -14, 156, 96) (default) or SK's (45, -15, 155, 95); the ranking images stay unaugmented.
    plain = [46.0, -14.0, 156.0, 96.0] if protocol == "default" else [45.0, -15.0, 155.0, 95.0]
    assert (first["crop_box"].tolist() == plain) == (protocol == "default")
    assert datamodule.ranking_dataset()[0]["crop_box"].tolist() == plain
