"""CUB-200-2011 parsing, crop geometry, augmentation, subsets, errors and download (synthetic data)."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.cub as cub
import data.cub_files as cub_files
from data.crop import crop_matrix, crop_points, crop_resize, image_tensor
from data.cub import CUBDataModule, CUBDataset, mirror_parts, square_crop_box
from data.cub_files import (
    PART_NAMES,
    load_annotations,
    read_bounding_boxes,
    read_classes,
    read_image_class_labels,
    read_images,
    read_part_locs,
    read_part_names,
    read_train_test_split,
)
from data.demo import ensure_synthetic_cub, write_synthetic_cub
from data.sampling import SampleKey
from lightning_modules.app.errors import DownloadError
from lightning_modules.app.seeding import Draw, seeded_generator

S = 64  # small images keep the tests fast


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_cub(tmp_path_factory.mktemp("cub") / "CUB_200_2011")


@pytest.fixture
def root_copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "CUB_200_2011"))


def test_parsing_official_files(root: Path) -> None:
    images = read_images(root)
    assert len(images) == 36 and list(images)[:2] == [1, 2]
    assert images[1] == "001.Synthetic_Bird_1/Synthetic_Bird_1_0001_1.jpg"
    assert read_classes(root) == {c: f"{c:03d}.Synthetic_Bird_{c}" for c in (1, 2, 3)}
    assert read_image_class_labels(root)[13] == 2
    split = read_train_test_split(root)
    assert sum(split.values()) == 24 and split[3] is False
    assert read_part_names(root) == PART_NAMES
    x, y, w, h = read_bounding_boxes(root)[1]
    assert w > 0 and h > 0
    locs = read_part_locs(root)
    assert locs[1].shape == (15, 3)
    annotations = load_annotations(root)
    assert annotations.parts_px.shape == (36, 15, 2) and annotations.visible.shape == (36, 15)
    # Invisible parts are "0 0 0" in the file and (0, 0) here.
    assert (annotations.parts_px[~annotations.visible] == 0).all()
    assert not annotations.visible[:, PART_NAMES.index("left eye")].all()


def test_square_crop_box() -> None:
    # 40 x 20 box at (10, 20): the square of side 40 around its centre (30, 30).
    assert square_crop_box((10, 20, 40, 20)) == (10, 10, 50, 50)
    # 5 % padding: 44 x 22, still centred.
    assert np.allclose(square_crop_box((10, 20, 40, 20), [0.05] * 4), (8, 8, 52, 52))
    # Moving only the right side out shifts the centre right.
    assert np.allclose(square_crop_box((0, 0, 10, 10), (0, 0, 0.2, 0)), (0, -1, 12, 11))


def _plant_dot(root: Path, image_id: int, part: str) -> tuple[float, float]:
    """Replace image ``image_id`` by black with a white 3x3 dot on ``part``; returns its pixel index."""
    annotations = load_annotations(root)
    row = list(annotations.image_ids).index(image_id)
    px, py = annotations.parts_px[row, PART_NAMES.index(part)]
    path = root / "images" / annotations.paths[row]
    width, height = Image.open(path).size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[int(py) - 1 : int(py) + 2, int(px) - 1 : int(px) + 2] = 255
    Image.fromarray(pixels).save(path.with_suffix(".png"))
    path.unlink()
    path.with_suffix(".png").rename(path)  # PNG bytes under the .jpg name only for this lossless test image
    return px, py


@pytest.mark.parametrize("subset", ["cub_aligned", "cub_001"])
def test_keypoint_lands_on_its_pixel_and_maps_back(root_copy: Path, subset: str) -> None:
    px, py = _plant_dot(root_copy, 1, "beak")
    dataset = CUBDataset(root_copy, "train", subset, image_size=S)
    sample = dataset[0]
    assert sample["path"].endswith("_0001_1.jpg") and not sample["flipped"]
    kx, ky = sample["keypoints"][PART_NAMES.index("beak")].tolist()
    brightness = sample["image"].sum(0)
    iy, ix = divmod(int(brightness.argmax()), S)
    # The brightest output pixel is where the keypoint says, within a pixel.
    assert abs((ix + 0.5) / S - kx) <= 1 / S and abs((iy + 0.5) / S - ky) <= 1 / S
    x0, y0, x1, y1 = sample["crop_box"].tolist()
    assert x0 + kx * (x1 - x0) == pytest.approx(px + 0.5, abs=1e-3)
    assert y0 + ky * (y1 - y0) == pytest.approx(py + 0.5, abs=1e-3)


def test_aligned_is_the_tight_square_and_never_augmented(root: Path) -> None:
    annotations = load_annotations(root)
    dataset = CUBDataset(root, "train", "cub_aligned", image_size=S, augment=True, annotations=annotations)
    x, y, w, h = annotations.boxes_xywh[dataset.rows[0]]
    side = max(w, h)
    expected = (x + w / 2 - side / 2, y + h / 2 - side / 2, x + w / 2 + side / 2, y + h / 2 + side / 2)
    for epoch in range(4):
        sample = dataset[SampleKey(0, epoch, 0)]
        assert not sample["flipped"]
        assert np.allclose(sample["crop_box"].numpy(), expected, atol=1e-3)


def test_mirror_parts_swaps_left_right() -> None:
    keypoints = torch.arange(30.0).view(15, 2)
    visible = torch.zeros(15, dtype=torch.bool)
    visible[PART_NAMES.index("left eye")] = True
    visible[PART_NAMES.index("beak")] = True
    mirrored, mirrored_visible = mirror_parts(keypoints, visible)
    for name, source in (("right eye", "left eye"), ("left eye", "right eye"), ("left leg", "right leg"),
                         ("right wing", "left wing"), ("beak", "beak"), ("tail", "tail")):
        assert mirrored[PART_NAMES.index(name)].tolist() == keypoints[PART_NAMES.index(source)].tolist()
    assert mirrored_visible[PART_NAMES.index("right eye")] and not mirrored_visible[PART_NAMES.index("left eye")]
    assert mirrored_visible.sum() == 2


def test_augmented_dot_stays_on_its_part_and_the_mirror_renames_it(root_copy: Path) -> None:
    """Jittered crops and mirrors of an image that is one dot on the bird's right wing: the dot is
    always where the sample's keypoint of that wing says, named "left wing" when mirrored."""
    px, py = _plant_dot(root_copy, 1, "right wing")
    dataset = CUBDataset(root_copy, "train", "cub_001", image_size=S, augment=True)
    seen = set()
    for epoch in range(12):
        sample = dataset[SampleKey(0, epoch, 0)]
        seen.add(sample["flipped"])
        name = "left wing" if sample["flipped"] else "right wing"
        assert sample["visible"][PART_NAMES.index(name)]
        kx, ky = sample["keypoints"][PART_NAMES.index(name)].tolist()
        iy, ix = divmod(int(sample["image"].sum(0).argmax()), S)
        assert abs((ix + 0.5) / S - kx) <= 1 / S and abs((iy + 0.5) / S - ky) <= 1 / S
        x0, y0, x1, y1 = sample["crop_box"].double().tolist()
        source_x = x1 - kx * (x1 - x0) if sample["flipped"] else x0 + kx * (x1 - x0)
        assert source_x == pytest.approx(px + 0.5, abs=1e-3) and y0 + ky * (y1 - y0) == pytest.approx(py + 0.5, abs=1e-3)
    assert seen == {True, False}


def test_training_mirror_flips_image_and_parts(root: Path) -> None:
    dataset = CUBDataset(root, "train", "cub_001", image_size=S, augment=True)
    seen = set()
    for epoch in range(20):
        sample = dataset[SampleKey(1, epoch, 0)]
        seen.add(sample["flipped"])
        box = sample["crop_box"].double().tolist()
        row = dataset.rows[1]
        image = image_tensor(Image.open(sample["path"]))
        plain = crop_resize(image, box, S, (0, 0, 0))
        keypoints = crop_points(dataset.annotations.parts_px[row], crop_matrix(box, S), S)
        visible = torch.from_numpy(dataset.annotations.visible[row])
        if sample["flipped"]:
            plain = plain.flip(-1)
            keypoints[:, 0] = 1 - keypoints[:, 0]
            keypoints, visible = mirror_parts(keypoints, visible)
            # The bird's visible right-side parts become left-side ones.
            original = dataset.annotations.visible[row]
            assert sample["visible"][PART_NAMES.index("left wing")] == bool(original[PART_NAMES.index("right wing")])
        keypoints = keypoints.masked_fill(~visible[:, None], 0.0)
        # crop_box is float32, the crop used float64: allow a little resampling difference.
        assert torch.allclose(sample["image"], plain, atol=1e-3)
        assert torch.allclose(sample["keypoints"], keypoints, atol=1e-4)
        assert torch.equal(sample["visible"], visible)
    assert seen == {True, False}


def test_augmentation_is_drawn_from_seed_epoch_and_index_only(root: Path) -> None:
    dataset = CUBDataset(root, "train", "cub_all", image_size=S, augment=True)
    rng = torch.get_rng_state()
    first = [dataset[SampleKey(i, 2, 5)]["crop_box"] for i in range(3)]
    torch.manual_seed(123)  # the global RNG plays no part
    second = [dataset[SampleKey(i, 2, 5)]["crop_box"] for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.set_rng_state(rng)
    assert not torch.equal(first[0], dataset[SampleKey(0, 3, 5)]["crop_box"])  # another epoch
    assert not torch.equal(first[0], dataset[SampleKey(0, 2, 6)]["crop_box"])  # another seed
    assert torch.equal(dataset[0]["crop_box"], dataset[SampleKey(0, 0, 0)]["crop_box"])  # an int is epoch 0, seed 0
    outward, flipped = dataset.sample_crop_params(seeded_generator(5, Draw.AUGMENTATION, 2, 0))
    box = square_crop_box(dataset.annotations.boxes_xywh[dataset.rows[0]], outward)
    torch.testing.assert_close(first[0], torch.tensor(box, dtype=torch.float32))
    assert dataset[SampleKey(0, 2, 5)]["flipped"] == flipped


def test_evaluation_samples_are_never_augmented(root: Path) -> None:
    dataset = CUBDataset(root, "train", "cub_all", image_size=S, augment=False)
    boxes = {tuple(dataset[SampleKey(0, epoch, 0)]["crop_box"].tolist()) for epoch in range(5)}
    assert len(boxes) == 1 and not any(dataset[SampleKey(0, epoch, 0)]["flipped"] for epoch in range(5))


def test_samples_follow_the_contract_and_invisible_parts_are_zero(root: Path) -> None:
    dataset = CUBDataset(root, "test", "cub_aligned", image_size=S)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["image"].shape == (3, S, S) and sample["image"].dtype == torch.float32
        assert 0 <= sample["image"].min() and sample["image"].max() <= 1
        assert sample["keypoints"].shape == (15, 2) and sample["keypoints"].dtype == torch.float32
        assert sample["visible"].dtype == torch.bool and sample["index"] == index
        assert (sample["keypoints"][~sample["visible"]] == 0).all()
        assert sample["visible"].sum() == dataset.annotations.visible[dataset.rows[index]].sum()


def test_subset_sizes_and_visibility_filter(root: Path) -> None:
    annotations = load_annotations(root)
    sizes = {
        subset: tuple(len(CUBDataset(root, split, subset, S, annotations=annotations)) for split in ("train", "test"))
        for subset in ("cub_all", "cub_001", "cub_002", "cub_003", "cub_aligned")
    }
    # 12 images per class, every 3rd a test image; every 4th is occluded (< 6 visible parts).
    assert sizes == {"cub_all": (18, 9), "cub_001": (8, 4), "cub_002": (8, 4), "cub_003": (8, 4), "cub_aligned": (24, 12)}
    dataset = CUBDataset(root, "train", "cub_all", S, annotations=annotations)
    assert (annotations.visible[dataset.rows].sum(1) >= 6).all()
    assert (annotations.visible.sum(1) < 6).sum() == 9
    assert set(annotations.class_ids[CUBDataset(root, "test", "cub_002", S, annotations=annotations).rows]) == {2}


def test_datamodule_loaders(root: Path) -> None:
    datamodule = CUBDataModule(str(root), subset="cub_all", image_size=S, batch_size=4, num_workers=0)
    assert datamodule.keypoint_names == PART_NAMES
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, S, S) and batch["keypoints"].shape == (4, 15, 2)
    regression, test = datamodule.test_dataloader()
    assert len(regression.dataset) == 18 and len(test.dataset) == 9
    assert not next(iter(regression))["flipped"].any()


def test_cub_names_its_evaluation(root: Path) -> None:
    from lightning_modules.evaluation import build_metric, regression_protocol
    from lightning_modules.metrics import NormalizedKeypointError
    from lightning_modules.regressor import LinearKeypointRegressor

    evaluation = CUBDataModule(str(root)).evaluation()
    assert (evaluation.metric, evaluation.metric_args, evaluation.regressor) == ("normalized_keypoint_error", {}, "linear")
    assert isinstance(build_metric(evaluation), NormalizedKeypointError)
    assert regression_protocol(evaluation) == LinearKeypointRegressor.fit


def test_missing_annotation_file_error_names_it(root_copy: Path) -> None:
    (root_copy / "parts" / "part_locs.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"part_locs\.txt.*download: true"):
        CUBDataModule(str(root_copy)).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"nowhere/images\.txt"):
        CUBDataModule(str(root_copy.parent / "nowhere")).setup("fit")


def test_missing_image_error_names_it(root_copy: Path, tmp_path: Path) -> None:
    victim = root_copy / "images" / read_images(root_copy)[2]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        CUBDataModule(str(root_copy)).setup("fit")
    with pytest.raises(FileNotFoundError, match="cub_preprocess"):
        CUBDataModule(str(root_copy), images_dir=str(tmp_path / "gray")).setup("fit")


def test_images_dir_is_read_instead(root: Path, tmp_path: Path) -> None:
    mirrored = Path(shutil.copytree(root / "images", tmp_path / "gray"))
    datamodule = CUBDataModule(str(root), subset="cub_003", image_size=S, images_dir=str(mirrored), num_workers=0)
    datamodule.setup("test")
    assert datamodule.test_dataset()[0]["path"].startswith(str(mirrored))


def _tgz(path: Path, source: Path, extra: dict[str, bytes] | None = None) -> str:
    """Write ``source`` as ``CUB_200_2011/`` (plus ``extra`` members) into a .tgz; returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname="CUB_200_2011")
        for name, payload in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_over_http(root: Path, tmp_path: Path, served, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, url = served
    md5 = _tgz(folder / "CUB_200_2011.tgz", root, {"attributes.txt": b"1 has_bill_shape::curved\n"})
    monkeypatch.setattr(cub, "CUB_URL", f"{url}/CUB_200_2011.tgz")
    monkeypatch.setattr(cub, "CUB_MD5", md5)
    target = tmp_path / "datasets" / "CUB_200_2011"
    datamodule = CUBDataModule(str(target), subset="cub_001", image_size=S, download=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert len(datamodule.train_dataset()) == 8
    # No archive, temporary or lock file left beside the dataset, and only the archive's CUB_200_2011/ in it.
    assert sorted(p.name for p in target.parent.iterdir()) == ["CUB_200_2011"]
    assert not (target / "attributes.txt").exists()
    # A complete root is left alone, whatever the URL says.
    monkeypatch.setattr(cub, "CUB_URL", f"{url}/absent.tgz")
    datamodule.prepare_data()


def test_download_with_wrong_md5_raises(root: Path, tmp_path: Path, served, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, url = served
    _tgz(folder / "CUB_200_2011.tgz", root)
    monkeypatch.setattr(cub, "CUB_URL", f"{url}/CUB_200_2011.tgz")
    monkeypatch.setattr(cub, "CUB_MD5", "0" * 32)
    target = tmp_path / "datasets" / "CUB_200_2011"
    with pytest.raises(DownloadError, match="md5"):
        CUBDataModule(str(target), download=True).prepare_data()
    assert not target.parent.exists()  # nothing left: not the folder the download made, nor the archive or lock


def test_download_without_a_server_is_one_clear_error(tmp_path: Path, served, monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = served
    monkeypatch.setattr(cub, "CUB_URL", f"{url}/missing/CUB_200_2011.tgz")
    target = tmp_path / "datasets" / "CUB_200_2011"
    with pytest.raises(DownloadError, match="Could not download .*missing/CUB_200_2011.tgz.*download it by hand"):
        CUBDataModule(str(target), download=True).prepare_data()
    assert not target.parent.exists()  # nothing left: not the folder the download made, nor the archive or lock


def test_download_refuses_path_traversal(root: Path, tmp_path: Path, served) -> None:
    folder, url = served
    md5 = _tgz(folder / "evil.tgz", root / "parts", {"../escaped.txt": b"gotcha"})
    target = tmp_path / "datasets" / "CUB_200_2011"
    with pytest.raises(DownloadError, match="unsafe"):
        cub.download_cub(target, url=f"{url}/evil.tgz", md5=md5)
    assert not (tmp_path / "datasets" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not target.exists()


def test_generate_synthetic_writes_once_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / ".demo" / "CUB_200_2011"
    datamodule = CUBDataModule(".demo/CUB_200_2011", subset="cub_002", image_size=S, generate_synthetic=True)
    with caplog.at_level("INFO"):
        datamodule.prepare_data()
    assert "Wrote a synthetic demo dataset to .demo/CUB_200_2011: 120 drawn birds" in caplog.text
    datamodule.setup("fit")
    assert len(datamodule.train_dataset()) == 20  # class 002 of the demo-sized dataset: 30 images, every 3rd in test
    assert [p.name for p in target.parent.iterdir()] == ["CUB_200_2011"]
    reference = tmp_path / "reference"
    reference.mkdir()
    assert target.stat().st_mode == reference.stat().st_mode  # the umask's mode, not a temp dir's 0700
    stamp = (target / "images.txt").stat().st_mtime_ns
    ensure_synthetic_cub(target)
    assert (target / "images.txt").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="exclusive"):
        CUBDataModule(str(target), download=True, generate_synthetic=True)


def test_synthetic_dataset_is_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = write_synthetic_cub(tmp_path / "a", seed=1)
    assert time.perf_counter() - start < 2
    second = write_synthetic_cub(tmp_path / "b", seed=1)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert (first / "segmentations").is_dir()
    sizes = {Image.open(first / "images" / p).size for p in read_images(first).values()}
    assert len(sizes) > 10  # sizes vary per image


@pytest.mark.parametrize("root", ["datasets/CUB_200_2011", ".demo/CUB_200_201", ".demo/models/CUB_200_2011"])
def test_generate_synthetic_never_replaces_a_mistyped_root(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_modules.app.errors import MissingFileError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFileError, match=f"data.root='{root}' does not exist.*only at '.demo/CUB_200_2011'.*download: true"):
        CUBDataModule(root, image_size=S, generate_synthetic=True)
    assert not any(tmp_path.rglob("*"))  # nothing written


def test_generate_synthetic_uses_an_existing_root_as_it_is(cub_root: Path) -> None:
    stamp = (cub_root / "images.txt").stat().st_mtime_ns
    datamodule = CUBDataModule(str(cub_root), image_size=S, generate_synthetic=True)
    datamodule.prepare_data()
    assert (cub_root / "images.txt").stat().st_mtime_ns == stamp


# ---- StableKeypoints' splits: CMR's cleaned cachedir .mat files ----


def write_cmr_split(path: Path, annotations, rows: list[int]) -> None:
    """One ``*_cub_cleaned.mat`` as CMR wrote it: a 1 x N struct array ``images`` (1-based pixels)."""
    savemat = pytest.importorskip("scipy.io").savemat
    fields = ["id", "rel_path", "train", "test", "bbox", "width", "height", "parts", "mask", "class_id"]
    images = np.zeros((1, len(rows)), dtype=[(name, "O") for name in fields])
    for k, row in enumerate(rows):
        x, y, w, h = annotations.boxes_xywh[row]
        parts = np.vstack([(annotations.parts_px[row] + 1).T * annotations.visible[row], annotations.visible[row]])
        bbox = np.zeros((1, 1), dtype=[(name, "O") for name in ("x1", "y1", "x2", "y2")])
        bbox[0, 0] = (x + 1, y + 1, x + w, y + h)
        images[0, k] = (
            int(annotations.image_ids[row]), annotations.paths[row], int(annotations.is_train[row]),
            int(not annotations.is_train[row]), bbox, 160, 128, parts.astype(np.float64),
            np.zeros((4, 4), dtype=np.uint8), int(annotations.class_ids[row]),
        )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"images": images})


@pytest.fixture
def cmr_cachedir(root: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A cachedir whose splits differ from the official one: -> (cachedir, train paths, test paths)."""
    annotations = load_annotations(root)
    official_train = [row for row in range(36) if annotations.is_train[row]]
    official_test = [row for row in range(36) if not annotations.is_train[row]]
    # Train: the official train images with >= 6 visible parts, less class 1's first (30 -> 29 in SK).
    train = [row for row in official_train if annotations.visible[row].sum() >= 6][1:]
    # Test: a shuffled half of the official test images, occluded ones included (2874 of 5747 in SK).
    test = official_test[::-2]
    cachedir = tmp_path / "cachedir" / "cub"
    write_cmr_split(cachedir / "data" / "train_cub_cleaned.mat", annotations, train)
    write_cmr_split(cachedir / "data" / "test_cub_cleaned.mat", annotations, test)
    return cachedir, [annotations.paths[r] for r in train], [annotations.paths[r] for r in test]


def test_cmr_cachedir_gives_exactly_its_splits(root: Path, cmr_cachedir) -> None:
    cachedir, train_paths, test_paths = cmr_cachedir
    assert cub_files.read_cmr_split(cachedir, "train") == train_paths and cub_files.read_cmr_split(cachedir, "test") == test_paths
    sizes = {}
    for subset in ("cub_all", "cub_001", "cub_002", "cub_003", "cub_aligned"):
        datamodule = CUBDataModule(str(root), subset=subset, cmr_cachedir=str(cachedir), image_size=S, num_workers=0)
        datamodule.setup("test")
        train, regression, test = datamodule.train_dataset(), datamodule.regression_dataset(), datamodule.test_dataset()
        paths = [[dataset.annotations.paths[r] for r in dataset.rows] for dataset in (train, regression, test)]
        prefix = "" if subset in ("cub_all", "cub_aligned") else subset.removeprefix("cub_") + "."
        # The files' images in the files' order, only filtered by class; no visibility filter.
        assert paths[0] == paths[1] == [p for p in train_paths if p.startswith(prefix)]
        assert paths[2] == [p for p in test_paths if p.startswith(prefix)]
        sizes[subset] = (len(train), len(test))
    assert sizes == {"cub_all": (17, 6), "cub_001": (5, 2), "cub_002": (6, 2), "cub_003": (6, 2), "cub_aligned": (17, 6)}
    # The official split of the same root, for contrast (test_subset_sizes_and_visibility_filter).
    official = CUBDataModule(str(root), subset="cub_001", image_size=S, num_workers=0)
    official.setup("test")
    assert (len(official.train_dataset()), len(official.test_dataset())) == (8, 4)
    # cub_all keeps the files' occluded test birds: CMR's cleaning, not the >= 6 parts filter, decides.
    cub_all = CUBDataModule(str(root), subset="cub_all", cmr_cachedir=str(cachedir), image_size=S, num_workers=0)
    cub_all.setup("test")
    assert (load_annotations(root).visible[cub_all.test_dataset().rows].sum(1) < 6).sum() == 3


def test_cmr_cachedir_errors_name_the_file_and_the_fix(root: Path, cmr_cachedir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lightning_modules.app.errors import ConfigError, MissingFileError

    cachedir, _, _ = cmr_cachedir
    (cachedir / "data" / "test_cub_cleaned.mat").unlink()
    with pytest.raises(MissingFileError, match="data/test_cub_cleaned.mat"):
        CUBDataModule(str(root), cmr_cachedir=str(cachedir))
    with pytest.raises(MissingFileError, match="train_cub_cleaned.mat"):
        CUBDataModule(str(root), cmr_cachedir=str(tmp_path / "nowhere"))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import loadmat` fail
    with pytest.raises(ConfigError, match="pip install scipy"):
        CUBDataModule(str(root), cmr_cachedir=str(cachedir))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="999.Unknown/x.jpg"):
        cub_files.select_rows(load_annotations(root), "cub_all", "train", ["999.Unknown/x.jpg"])
    savemat = pytest.importorskip("scipy.io").savemat
    savemat(str(cachedir / "data" / "test_cub_cleaned.mat"), {"sfm_anno": np.zeros(3)})
    with pytest.raises(ConfigError, match="no 'images' struct array"):
        cub_files.read_cmr_split(cachedir, "test")
