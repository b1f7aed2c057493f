"""CelebA, Tai-Chi-HD, DeepFashion and Human3.6M read tiny fixtures written in their published layouts.

Each fixture draws a red dot on the pixel of one annotated keypoint, so a test checks both the
label convention (normalized (x, y), pixel centres) and that the image agrees with it.
Tai-Chi needs pandas and Human3.6M scipy to read their labels (optional; requirements.txt pins scipy):
those tests skip without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.celeba import CelebADataModule, CelebADataset
from data.deepfashion import DeepFashionDataModule, DeepFashionDataset
from data.human36m import Human36MDataModule, Human36MDataset
from data.taichi import TaiChiDataModule, TaiChiDataset

S = 64  # returned image side


def draw(path: Path, width: int, height: int, dot_xy: tuple[int, int], background: int = 128) -> None:
    """A width x height gray image with a red 3 x 3 dot centred on pixel ``dot_xy``."""
    pixels = np.full((height, width, 3), background, dtype=np.uint8)
    x, y = dot_xy
    pixels[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def check_sample(sample: dict, num_keypoints: int | None) -> None:
    """The ``data.base`` contract: keys, shapes, dtypes, ranges, invisible keypoints at (0, 0)."""
    expected = {"image", "index", "sample_key", "path", "crop_box", "flipped", "source_size", "image_region"}
    expected |= {"keypoints", "visible"} if num_keypoints else set()
    assert set(sample) == expected
    # Whole images: the crop is the source image, all of the model's image shows it.
    assert sample["crop_box"][2:].tolist() == sample["source_size"].tolist()
    assert sample["image_region"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert sample["image"].shape == (3, S, S) and sample["image"].dtype == torch.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["crop_box"].shape == (4,) and sample["crop_box"].dtype == torch.float32
    assert isinstance(sample["path"], str) and isinstance(sample["index"], int)
    if num_keypoints:
        assert sample["keypoints"].shape == (num_keypoints, 2) and sample["keypoints"].dtype == torch.float32
        assert sample["visible"].shape == (num_keypoints,) and sample["visible"].dtype == torch.bool
        assert (sample["keypoints"][~sample["visible"]] == 0).all()


def red_dot_xy(image: torch.Tensor) -> torch.Tensor:
    """(2,) normalized (x, y) of the reddest pixel's centre in a (3, S, S) image."""
    redness = image[0] - image[1:].mean(0)
    row, col = divmod(int(redness.argmax()), image.shape[-1])
    return torch.tensor([(col + 0.5) / image.shape[-1], (row + 0.5) / image.shape[-2]])


def expected_xy(x_px: float, y_px: float, width: int, height: int) -> torch.Tensor:
    """Pixel indices of a width x height image -> normalized (x, y) of that pixel's centre."""
    return torch.tensor([(float(x_px) + 0.5) / width, (float(y_px) + 0.5) / height])


# ----------------------------------------------------------------------------------------------
# CelebA

CELEBA_SIZES = {1: (40, 48), 2: (36, 52), 3: (44, 44), 4: (50, 40), 5: (38, 46)}  # number: (W, H)


def celeba_landmarks(number: int) -> list[int]:
    """x1 y1 ... x5 y5 of image ``number``: the left eye (drawn) at a quarter of the width, a third of the height."""
    width, height = CELEBA_SIZES[number]
    points = [(width // 4, height // 3), (3 * width // 4, height // 3), (width // 2, height // 2)]
    points += [(width // 3, 3 * height // 4), (2 * width // 3, 3 * height // 4)]
    return [v for point in points for v in point]


def make_celeba(root: Path, variant: str) -> Path:
    """CelebA's layout with images 1-5 (MAFL train 1-3, test 4-5); in the wild, image 2's face box is tiny."""
    aligned = variant == "aligned"
    parts = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
    lines = ["6", " ".join(f"{part}_{axis}" for part in parts for axis in "xy")]
    for number, (width, height) in CELEBA_SIZES.items():
        landmarks = celeba_landmarks(number)
        lines.append(f"{number:06d}.jpg " + " ".join(map(str, landmarks)))
        image_name = f"img_align_celeba_png/{number:06d}.png" if aligned else f"img_celeba/{number:06d}.jpg"
        draw(root / "Img" / image_name, width, height, (landmarks[0], landmarks[1]))
    lines.append("000006.jpg " + " ".join(["1"] * 10))  # an image outside MAFL: never read
    (root / "Anno").mkdir(parents=True)
    landmark_file = "list_landmarks_align_celeba.txt" if aligned else "list_landmarks_celeba.txt"
    (root / "Anno" / landmark_file).write_text("\n".join(lines) + "\n")
    boxes = ["6", "image_id x_1 y_1 width height"]
    boxes += [f"{n:06d}.jpg 0 0 {w} {h}" if n != 2 else f"{n:06d}.jpg 5 5 4 4" for n, (w, h) in CELEBA_SIZES.items()]
    (root / "Anno" / "list_bbox_celeba.txt").write_text("\n".join(boxes) + "\n")
    (root / "MAFL").mkdir()
    (root / "MAFL" / "training.txt").write_text("000001.jpg\n000002.jpg\n000003.jpg\n")
    (root / "MAFL" / "testing.txt").write_text("000004.jpg\n000005.jpg\n")
    return root


def test_celeba_aligned_samples_keypoints_and_splits(tmp_path: Path) -> None:
    root = make_celeba(tmp_path, "aligned")
    train, test = CelebADataset(root, S, "train"), CelebADataset(root, S, "test")
    assert (len(train), len(test)) == (3, 2)
    sample = test[1]
    check_sample(sample, 5)
    width, height = CELEBA_SIZES[5]
    assert sample["path"].endswith("img_align_celeba_png/000005.png")
    assert torch.equal(sample["crop_box"], torch.tensor([0.0, 0.0, width, height]))
    assert sample["visible"].all()
    landmarks = celeba_landmarks(5)
    for j in range(5):
        expected = expected_xy(landmarks[2 * j], landmarks[2 * j + 1], width, height)
        torch.testing.assert_close(sample["keypoints"][j], expected)
    assert (red_dot_xy(sample["image"]) - sample["keypoints"][0]).abs().max() <= 1.5 / S


def test_celeba_wild_drops_small_faces_like_sk(tmp_path: Path) -> None:
    root = make_celeba(tmp_path, "wild")
    train = CelebADataset(root, S, "train", variant="wild")
    assert [Path(p).name for p in train.files] == ["000001.jpg", "000003.jpg"]
    assert len(CelebADataset(root, S, "train", variant="wild", min_face_area_frac=0)) == 3
    sample = train[1]
    check_sample(sample, 5)
    assert (red_dot_xy(sample["image"]) - sample["keypoints"][0]).abs().max() <= 1.5 / S


def test_celeba_missing_files_name_the_path_and_the_source(tmp_path: Path) -> None:
    root = make_celeba(tmp_path, "aligned")
    (root / "MAFL" / "testing.txt").unlink()
    with pytest.raises(FileNotFoundError, match="TCDCN") as error:
        CelebADataset(root, S, "test")
    assert str(root / "MAFL" / "testing.txt") in str(error.value)
    # mafl_dir points elsewhere (SK kept the split files in TCDCN-face-alignment/MAFL).
    mafl = tmp_path / "TCDCN-face-alignment" / "MAFL"
    mafl.mkdir(parents=True)
    (mafl / "testing.txt").write_text("000004.jpg\n")
    assert len(CelebADataset(root, S, "test", mafl_dir=mafl)) == 1
    image = root / "Img" / "img_align_celeba_png" / "000001.png"
    image.unlink()
    with pytest.raises(FileNotFoundError, match="mmlab") as error:
        CelebADataset(root, S, "train")[0]
    assert str(image) in str(error.value)


def test_celeba_datamodule_loaders(tmp_path: Path) -> None:
    data = CelebADataModule(str(make_celeba(tmp_path, "aligned")), image_size=S, batch_size=2, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 3, S, S) and batch["keypoints"].shape == (2, 5, 2)
    data.setup("test")
    regression, test = data.test_dataloader()
    assert (len(regression.dataset), len(test.dataset)) == (3, 2)
    assert len(data.keypoint_names) == 5


def test_splits_read_16_bit_and_rgba_on_the_datamodule_background(tmp_path: Path) -> None:
    """SplitsDataModule's datasets read through data.images: 16-bit scaled, RGBA on background_rgb."""
    root = make_celeba(tmp_path, "aligned")
    width, height = CELEBA_SIZES[4]
    Image.fromarray(np.full((height, width), 128 * 257, np.uint16)).save(root / "Img/img_align_celeba_png/000004.png")
    Image.fromarray(np.zeros((46, 38, 4), np.uint8), mode="RGBA").save(root / "Img/img_align_celeba_png/000005.png")
    data = CelebADataModule(str(root), image_size=S, num_workers=0, background_rgb=(0, 255, 0))
    data.setup("test")
    sixteen, transparent = data.test_dataset()[0]["image"], data.test_dataset()[1]["image"]
    assert torch.allclose(sixteen, torch.full_like(sixteen, 128 / 255))  # PIL's convert("RGB") gave 1.0
    assert transparent[:, S // 2, S // 2].tolist() == [0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Tai-Chi-HD

TAICHI_SIZES = {"a.png": (32, 32), "b.png": (40, 40), "c.png": (48, 48)}


def taichi_pose(name: str) -> np.ndarray:
    """(18, 2) (x, y) pixels: keypoint 0 drawn, 5 missing (-1), 6 on the left border (x = 0)."""
    width, height = TAICHI_SIZES[name]
    pose = np.stack([np.linspace(2, width - 3, 18), np.linspace(height - 3, 2, 18)], axis=1).round()
    pose[0] = (width // 5, height // 2)
    pose[5] = (-1, -1)
    pose[6] = (0, height // 2)
    return pose


def make_taichi(root: Path) -> Path:
    """Tai-Chi's layout: 3 unlabelled training frames, labelled regression frames a, b and test frame c."""
    pandas = pytest.importorskip("pandas")
    for video, frame in (("vidA", "0001"), ("vidA", "0002"), ("vidB", "0001")):
        draw(root / "train" / video / f"{frame}.png", 30, 30, (3, 27))
    (root / "landmark").mkdir(parents=True)
    for split, names in (("train", ["a.png", "b.png"]), ("test", ["c.png"])):
        for name in names:
            pose = taichi_pose(name)
            dot = (int(pose[0, 0]), int(pose[0, 1]))
            draw(root / "eval_images" / "taichi-256" / split / name, *TAICHI_SIZES[name], dot)
        table = pandas.DataFrame({"file_name": names, "value": [taichi_pose(n) for n in names]})
        table.to_pickle(root / "landmark" / f"taichi_{split}_gt.pkl")
    return root


def test_taichi_keypoints_are_xy_with_sk_visibility(tmp_path: Path) -> None:
    root = make_taichi(tmp_path)
    regression, test = TaiChiDataset(root, S, "train"), TaiChiDataset(root, S, "test")
    assert (len(regression), len(test)) == (2, 1)
    sample = test[0]
    check_sample(sample, 18)
    pose = taichi_pose("c.png")
    torch.testing.assert_close(sample["keypoints"][0], expected_xy(*pose[0], 48, 48))
    assert (red_dot_xy(sample["image"]) - sample["keypoints"][0]).abs().max() <= 1.5 / S
    assert sample["visible"].tolist() == [j not in (5, 6) for j in range(18)]


def test_taichi_datamodule_train_frames_and_flip(tmp_path: Path) -> None:
    root = make_taichi(tmp_path)
    plain = TaiChiDataModule(str(root), train_flip_prob=0.0, image_size=S, num_workers=0)
    flipping = TaiChiDataModule(str(root), train_flip_prob=1.0, image_size=S, num_workers=0)
    plain.setup("fit")
    flipping.setup("fit")
    assert len(plain.train_dataset()) == 3 and len(plain.regression_dataset()) == 2
    kept, mirrored = plain.train_dataset()[0], flipping.train_dataset()[0]
    check_sample(kept, None)
    assert mirrored["flipped"] and not kept["flipped"]
    assert torch.equal(mirrored["image"], kept["image"].flip(-1))


def test_taichi_missing_files_and_pandas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "landmark" / "taichi_test_gt.pkl"
    with pytest.raises(FileNotFoundError, match="motion-cosegmentation") as error:
        TaiChiDataset(tmp_path, S, "test")
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="motion-cosegmentation") as error:
        TaiChiDataModule(str(tmp_path), image_size=S).setup("fit")
    assert str(tmp_path / "train") in str(error.value)
    missing.parent.mkdir()
    missing.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    with pytest.raises(ImportError, match="pip install pandas"):
        TaiChiDataset(tmp_path, S, "test")


# ----------------------------------------------------------------------------------------------
# DeepFashion

DEEPFASHION_IMAGES = {
    "train": ["MEN/Denim/id_01/01_1_front.jpg", "WOMEN/Dresses/id_02/02_2_side.jpg"],
    "test": ["WOMEN/Tees/id_03/01_1_front.jpg"],
}


def deepfashion_keypoints(i: int) -> list[list[float]]:
    """(4, 2) (x, y) pixels of a 48 x 40 image: keypoint 0 drawn, keypoint 3 missing (negative)."""
    return [[10 + 5 * i, 30], [24, 8], [40, 20], [-1, 12]]


def make_deepfashion(root: Path) -> Path:
    """DeepFashion's layout: csv rows (index, path, extra), json keypoints, images under img/."""
    for split, names in DEEPFASHION_IMAGES.items():
        rows = [",image,keypoints"] + [f"{i},{name},unused" for i, name in enumerate(names)]
        (root / f"data_{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"data_{split}.csv").write_text("\n".join(rows) + "\n")
        annotations = [{"keypoints": deepfashion_keypoints(i)} for i in range(len(names))]
        (root / f"data_{split}.json").write_text(json.dumps(annotations))
        for i, name in enumerate(names):
            draw(root / "img" / name, 48, 40, tuple(deepfashion_keypoints(i)[0]))
    return root


def test_deepfashion_keypoints_visibility_and_range(tmp_path: Path) -> None:
    root = make_deepfashion(tmp_path)
    train, test = DeepFashionDataset(root, S, "train"), DeepFashionDataset(root, S, "test")
    assert (len(train), len(test)) == (2, 1)
    sample = train[1]
    check_sample(sample, 4)
    assert sample["path"].endswith("img/WOMEN/Dresses/id_02/02_2_side.jpg")
    torch.testing.assert_close(sample["keypoints"][0], expected_xy(15, 30, 48, 40))
    assert (red_dot_xy(sample["image"]) - sample["keypoints"][0]).abs().max() <= 1.5 / S
    assert sample["visible"].tolist() == [True, True, True, False]
    # [0, 1] like every dataset: SK's double normalization put DeepFashion in [-3, 1].
    assert sample["image"].min() >= 0
    assert sample["image"][:, 0, 0].tolist() == pytest.approx([128 / 255] * 3, abs=2 / 255)


def test_deepfashion_errors_name_the_file(tmp_path: Path) -> None:
    root = make_deepfashion(tmp_path)
    (root / "data_test.json").write_text(json.dumps([]))
    with pytest.raises(ValueError, match="same release"):
        DeepFashionDataset(root, S, "test")
    (root / "data_test.json").unlink()
    with pytest.raises(FileNotFoundError, match="unsupervised-disentangling") as error:
        DeepFashionDataset(root, S, "test")
    assert str(root / "data_test.json") in str(error.value)


def test_deepfashion_datamodule_names_keypoints_from_the_data(tmp_path: Path) -> None:
    data = DeepFashionDataModule(str(make_deepfashion(tmp_path)), image_size=S, batch_size=2, num_workers=0)
    data.setup("test")
    assert len(data.keypoint_names) == 4
    assert len(data.test_dataset()) == 1 and data.train_dataset() is data.regression_dataset()


# ----------------------------------------------------------------------------------------------
# Human3.6M

H36M_FRAMES = {  # subject: {action folder: frame names}
    1: {"Directions 1.54138969": ["1", "2"], "Eating 1.54138969": ["1"]},
    5: {"WalkingDog.55011271": ["10", "2"]},
    11: {"Posing 1.60457274": ["1"]},
}


def h36m_joints_yx() -> np.ndarray:
    """(32, 2) (y, x) in [0, 1] of a 32 x 32 frame; joint 0 (drawn) on pixel (x=20, y=8)."""
    joints = np.stack([np.linspace(0.1, 0.9, 32), np.linspace(0.9, 0.1, 32)], axis=1)
    joints[0] = ((8 + 0.5) / 32, (20 + 0.5) / 32)
    return joints.astype(np.float32)


def make_h36m(root: Path, labelled: bool = True) -> Path:
    """The processed layout: 32 x 32 frames, masks with the right half foreground, (y, x) joints."""
    mask = np.zeros((32, 32), dtype=bool)
    mask[:, 16:] = True
    for subject, folders in H36M_FRAMES.items():
        for folder, frames in folders.items():
            for frame in frames:
                draw(root / f"S{subject}" / "WithBackground" / folder / f"{frame}.jpg", 32, 32, (20, 8), background=200)
                (root / f"S{subject}" / "BackgroudMask" / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / f"S{subject}" / "BackgroudMask" / folder / f"{frame}.png")
                if labelled:
                    savemat = pytest.importorskip("scipy.io").savemat
                    (root / f"S{subject}" / "Landmarks" / folder).mkdir(parents=True, exist_ok=True)
                    landmarks = root / f"S{subject}" / "Landmarks" / folder / f"{frame}.mat"
                    savemat(landmarks, {"keypoints_2d": h36m_joints_yx()})
    return root


def test_h36m_masks_background_and_swaps_to_xy(tmp_path: Path) -> None:
    root = make_h36m(tmp_path)
    train = Human36MDataset(root, S, subjects=(1, 5))
    # Eating is not an SK action; WalkingDog starts with "Walking"; frames in numeric order.
    assert [str(Path(p).relative_to(root)) for p in train.files] == [
        "S1/WithBackground/Directions 1.54138969/1.jpg",
        "S1/WithBackground/Directions 1.54138969/2.jpg",
        "S5/WithBackground/WalkingDog.55011271/2.jpg",
        "S5/WithBackground/WalkingDog.55011271/10.jpg",
    ]
    assert len(Human36MDataset(root, S, subjects=(11,))) == 1
    sample = train[2]
    check_sample(sample, 32)
    assert sample["visible"].all()
    torch.testing.assert_close(sample["keypoints"][0], expected_xy(20, 8, 32, 32))
    assert (red_dot_xy(sample["image"]) - sample["keypoints"][0]).abs().max() <= 1.5 / S
    assert sample["image"][:, :, : S // 2 - 2].max() == 0  # background (left half) masked to black
    assert sample["image"][:, S // 2 :, S // 2 + 2 :].min() > 0.5  # foreground away from the dot


def test_h36m_training_frames_need_no_scipy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_h36m(tmp_path, labelled=False)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import loadmat` fail
    data = Human36MDataModule(str(root), train_subjects=(1, 5), image_size=S, batch_size=2, num_workers=0)
    check_sample(data.train_dataset()[0], None)
    with pytest.raises(ImportError, match="pip install scipy"):
        data.regression_dataset()
    mask = root / "S1" / "BackgroudMask" / "Directions 1.54138969" / "1.png"
    mask.unlink()
    with pytest.raises(FileNotFoundError, match="vision.imar.ro") as error:
        data.train_dataset()[0]
    assert str(mask) in str(error.value)
    with pytest.raises(FileNotFoundError, match="vision.imar.ro") as error:
        Human36MDataset(root, S, subjects=(9,), labelled=False)
    assert str(root / "S9" / "WithBackground") in str(error.value)


def test_h36m_rejects_pixel_keypoints(tmp_path: Path) -> None:
    root = make_h36m(tmp_path)
    savemat = pytest.importorskip("scipy.io").savemat
    savemat(root / "S11" / "Landmarks" / "Posing 1.60457274" / "1.mat", {"keypoints_2d": h36m_joints_yx() * 128})
    with pytest.raises(ValueError, match="not pixels"):
        Human36MDataset(root, S, subjects=(11,))[0]


# ----------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize(
    ("datamodule", "metric_name", "metric_args", "regressor"),
    [
        (CelebADataModule, "InterOcularError", {"left_eye": 0, "right_eye": 1}, "linear"),
        (TaiChiDataModule, "SummedKeypointError", {"scale": 256}, "linear"),
        (DeepFashionDataModule, "PercentageCorrectKeypoints", {"scale": 256, "threshold_px": 6}, "linear"),
        (Human36MDataModule, "OrientationInvariantError", {"scale": 128}, "orientation_invariant"),
    ],
)
def test_each_datamodule_names_its_evaluation(datamodule: type, metric_name: str, metric_args: dict, regressor: str) -> None:
    from lightning_modules import metrics
    from lightning_modules.evaluation import build_metric

    evaluation = datamodule(root="unused").evaluation()
    assert (evaluation.metric_args, evaluation.regressor) == (metric_args, regressor)
    metric = build_metric(evaluation)
    assert type(metric) is getattr(metrics, metric_name)
    assert evaluation.metric == metric_name_of(metric_name)
    for key, value in metric_args.items():
        assert getattr(metric, key) == value


def metric_name_of(class_name: str) -> str:
    """``InterOcularError`` -> ``inter_ocular_error``: the name logged as ``test/<name>``."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in class_name).lstrip("_")
