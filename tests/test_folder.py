"""Unlabelled image folders: padding geometry, unreadable files, and the DataModule's stages."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.sampling import SampleKey
from data.folder import ImageFolderDataModule
from data.image_folder import PAD_RGB, ImageFolderDataset, content_key
from lightning_modules.app.errors import ConfigError

S = 40


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two good images (landscape with a white dot, portrait) in nested folders, plus two bad files."""
    (tmp_path / "nested").mkdir()
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[5, 30] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.new("RGB", (16, 48), (200, 10, 10)).save(tmp_path / "nested" / "tall.jpg")
    (tmp_path / "nested" / "garbage.jpg").write_bytes(b"not an image at all")
    good = tmp_path / "nested" / "tall.jpg"
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    return tmp_path


def test_unreadable_files_fail_setup_with_their_list(folder: Path) -> None:
    datamodule = ImageFolderDataModule(str(folder), image_size=S, num_workers=0)
    with pytest.raises(ConfigError, match="2 of the 4 images of the train split cannot be decoded") as error:
        datamodule.setup("fit")
    assert "garbage.jpg" in str(error.value) and "truncated.jpg" in str(error.value)
    assert "skip_unreadable=true" in str(error.value)


def test_skip_unreadable_leaves_them_out_with_a_warning(folder: Path) -> None:
    datamodule = ImageFolderDataModule(str(folder), image_size=S, batch_size=2, num_workers=0, skip_unreadable=True)
    with pytest.warns(UserWarning, match="Skipping 2 unreadable images") as records:
        datamodule.setup("fit")
    train = datamodule.train_dataset()
    assert sorted(Path(train[i]["path"]).name for i in range(len(train))) == ["tall.jpg", "wide.png"]
    assert sorted(path.name for path, _ in datamodule.unreadable) == ["garbage.jpg", "truncated.jpg"]
    warned = " ".join(str(record.message) for record in records)
    assert "garbage.jpg" in warned and "truncated.jpg" in warned


def test_padding_geometry_maps_back_to_source_pixels(folder: Path) -> None:
    dataset = ImageFolderDataset(folder / "wide.png", S)
    sample = dataset[0]
    assert sample["image"].shape == (3, S, S) and set(sample) == {
        "image", "index", "sample_key", "path", "crop_box", "flipped", "source_size", "image_region"
    }
    # 40 x 20 padded to a 40 x 40 square centred on the image: 10 gray rows above and below.
    assert sample["crop_box"].tolist() == [0.0, -10.0, 40.0, 30.0]
    assert sample["source_size"].tolist() == [40, 20]
    assert sample["image_region"].tolist() == [0.0, 0.25, 1.0, 0.75]
    assert torch.allclose(sample["image"][:, :9], torch.tensor(PAD_RGB).view(3, 1, 1) / 255)
    iy, ix = divmod(int(sample["image"].sum(0).argmax()), S)
    x0, y0, x1, y1 = sample["crop_box"].tolist()
    # The dot at source pixel (30, 5) comes back through crop_box to that pixel's centre.
    assert (x0 + (ix + 0.5) / S * (x1 - x0), y0 + (iy + 0.5) / S * (y1 - y0)) == (30.5, 5.5)


def test_mirror_flips_image(folder: Path) -> None:
    plain = ImageFolderDataset(folder / "wide.png", S)[0]
    dataset = ImageFolderDataset(folder / "wide.png", S, mirror=True)
    flips = set()
    for epoch in range(10):
        sample = dataset[SampleKey(0, epoch, 0)]
        flips.add(sample["flipped"])
        expected = plain["image"].flip(-1) if sample["flipped"] else plain["image"]
        assert torch.equal(sample["image"], expected)
    assert flips == {True, False}


def test_all_unreadable_raises_even_when_skipping(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    datamodule = ImageFolderDataModule(str(tmp_path), image_size=S, num_workers=0, skip_unreadable=True)
    with pytest.raises(ConfigError, match="1 of the 1 images of the train split cannot be decoded"):
        datamodule.setup("fit")


def test_datamodule_train_predict_and_no_test(folder: Path) -> None:
    datamodule = ImageFolderDataModule(str(folder), image_size=S, batch_size=2, num_workers=0, skip_unreadable=True)
    with pytest.warns(UserWarning, match="Skipping 2 unreadable images of the train split"):
        datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (2, 3, S, S)
    assert len(next(iter(datamodule.keypoint_index_dataloader()))["image"]) == 2
    ranking = next(iter(datamodule.keypoint_index_dataloader(num_images=1, seed=0)))
    assert len(ranking["image"]) == 1 and not ranking["flipped"].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same files again: left out without a second warning
        predicted = next(iter(datamodule.predict_dataloader()))
    assert len(predicted["image"]) == 2 and len(datamodule.unreadable) == 2
    assert not predicted["flipped"].any()
    with pytest.raises(ValueError, match="unlabelled"):
        datamodule.setup("test")


def test_sample_key_is_the_files_content_not_its_name_or_position(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10), (10, 200, 30)).save(tmp_path / "b.png")
    Image.new("RGB", (12, 12), (90, 90, 90)).save(tmp_path / "c.png")
    (tmp_path / "a_copy.png").write_bytes((tmp_path / "c.png").read_bytes())
    dataset = ImageFolderDataset(tmp_path, S)
    keys = {Path(dataset[i]["path"]).name: dataset[i]["sample_key"] for i in range(len(dataset))}
    assert [f.name for f in dataset.files] == ["a_copy.png", "b.png", "c.png"]
    assert keys["a_copy.png"] == keys["c.png"] != keys["b.png"]
    assert keys["c.png"] == content_key(tmp_path / "c.png") < 2**56
