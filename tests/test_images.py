"""Reading real photo files: every PIL mode, EXIF orientation, and the cached decode check at set-up."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.images
from data.crop import image_region
from data.cub import CUBDataModule
from data.decode_check import find_unreadable
from data.folder import ImageFolderDataModule
from data.image_folder import ImageFolderDataset
from data.images import UnreadableImageError, read_image, upright_size
from lightning_modules.app.errors import ConfigError

S = 32


def write_png_rgb16(path: Path, pixels: np.ndarray) -> None:
    """A 48-bit RGB PNG (PIL can read, not write, them): pixels (H, W, 3) uint16."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def rgb(path: Path, background=(127, 127, 127)) -> np.ndarray:
    image = read_image(path, background)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ------------------------------------------------------------------ 12.1: modes
def test_16_bit_gray_png_is_scaled_not_saturated(tmp_path: Path) -> None:
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    # PIL's own convert("RGB") gives [0, 255, 255, 255]: white.
    assert rgb(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (rgb(tmp_path / "g16.png")[..., 0] == rgb(tmp_path / "g16.png")[..., 2]).all()


def test_16_bit_big_endian_and_32_bit_integer_modes(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    big.save(tmp_path / "big.tif")
    Image.fromarray(values.astype(np.int32), mode="I").save(tmp_path / "int.tif")
    assert Image.open(tmp_path / "big.tif").mode in ("I;16B", "I;16")
    assert Image.open(tmp_path / "int.tif").mode == "I"
    assert rgb(tmp_path / "big.tif")[0, :, 1].tolist() == [0, 128, 255]
    assert rgb(tmp_path / "int.tif")[0, :, 1].tolist() == [0, 128, 255]


def test_integer_image_beyond_16_bits_is_an_error_naming_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(UnreadableImageError, match="wide.tif.*0..70000"):
        read_image(tmp_path / "wide.tif")


def test_16_bit_rgb_png(tmp_path: Path) -> None:
    pixels = np.zeros((1, 2, 3), np.uint16)
    pixels[0, 0] = (65535, 32768, 0)
    pixels[0, 1] = (4096, 8192, 65535)
    write_png_rgb16(tmp_path / "rgb48.png", pixels)
    assert rgb(tmp_path / "rgb48.png").tolist() == [[[255, 128, 0], [16, 32, 255]]]


@pytest.mark.parametrize(("values", "expected"), [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 255.0], [0, 100, 255])])
def test_float_images_in_unit_or_byte_range(tmp_path: Path, values: list[float], expected: list[int]) -> None:
    Image.fromarray(np.array([values], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert rgb(tmp_path / "f.tif")[0, :, 0].tolist() == expected


@pytest.mark.parametrize("values", [[0.0, 300.0], [-1.0, 0.5], [0.0, float("nan")]])
def test_float_images_out_of_range_are_errors(tmp_path: Path, values: list[float]) -> None:
    Image.fromarray(np.array([values], dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(UnreadableImageError, match="f.tif"):
        read_image(tmp_path / "f.tif")


def test_gray_bilevel_and_palette_become_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.array([[10, 200]], np.uint8), mode="L").save(tmp_path / "l.png")
    Image.new("1", (2, 1), 1).save(tmp_path / "one.png")
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert rgb(tmp_path / "l.png").tolist() == [[[10, 10, 10], [200, 200, 200]]]
    assert rgb(tmp_path / "one.png").tolist() == [[[255, 255, 255], [255, 255, 255]]]
    assert rgb(tmp_path / "p.png").tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_transparency_is_composited_on_the_configured_background(tmp_path: Path) -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [255, 0, 0, 128]]], np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.array([[[200, 255], [200, 0]]], np.uint8), mode="LA").save(tmp_path / "la.png")
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "pt.png", transparency=1)  # palette entry 1 is transparent
    assert rgb(tmp_path / "rgba.png").tolist() == [[[255, 0, 0], [127, 127, 127], [191, 63, 63]]]
    assert rgb(tmp_path / "rgba.png", (0, 0, 0)).tolist()[0][1] == [0, 0, 0]
    assert rgb(tmp_path / "la.png", (10, 20, 30)).tolist() == [[[200, 200, 200], [10, 20, 30]]]
    assert rgb(tmp_path / "pt.png", (0, 255, 0)).tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_every_dataset_reads_through_read_image(tmp_path: Path) -> None:
    """A 16-bit and an RGBA image in a folder come out scaled and on the DataModule's background."""
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), mode="RGBA").save(tmp_path / "b_rgba.png")
    datamodule = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=2, num_workers=0, background_rgb=(0, 0, 255))
    datamodule.setup("fit")
    sixteen, transparent = (datamodule.keypoint_index_dataloader().dataset[i]["image"] for i in range(2))
    assert torch.allclose(sixteen, torch.full_like(sixteen, 128 / 255))
    assert transparent[:, 4, 4].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("background", [(0, 0), (0, 0, 256), (0.5, 0, 0)])
def test_background_must_be_three_bytes(tmp_path: Path, background) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="data.background_rgb"):
        ImageFolderDataModule(str(tmp_path), background_rgb=background)


# ------------------------------------------------------------------ 12.2: EXIF orientation
def phone_photo(path: Path, orientation: int = 6) -> None:
    """A 40 x 20 stored JPEG (red left half) tagged to be shown turned 90 degrees clockwise (tag 6)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    phone_photo(tmp_path / "phone.jpg")
    image = np.asarray(read_image(tmp_path / "phone.jpg")).astype(int)
    # Orientation 6: the stored image is shown rotated 90 degrees clockwise, so upright it is
    # 20 wide and 40 tall, and the stored left half (red) is now the top half.
    assert image.shape == (40, 20, 3)
    assert image[5, 10, 0] > 200 and image[35, 10, 0] < 50
    assert upright_size(tmp_path / "phone.jpg") == (20, 40)


def test_folder_sample_is_in_the_upright_frame(tmp_path: Path) -> None:
    phone_photo(tmp_path / "phone.jpg")
    sample = ImageFolderDataset(tmp_path, S)[0]
    assert sample["source_size"].tolist() == [20, 40]
    assert sample["crop_box"].tolist() == [-10.0, 0.0, 30.0, 40.0]
    assert sample["image_region"].tolist() == [0.25, 0.0, 0.75, 1.0]
    assert sample["image"][0, 4, S // 2] > 0.8 and sample["image"][0, S - 4, S // 2] < 0.2


# ------------------------------------------------------------------ 12.3: the image's region of a crop
def test_image_region_of_a_crop_past_the_edges_and_mirrored() -> None:
    # A 100 x 50 image cropped by the square (-20, -40, 80, 60): its region is x 20..100 of 100
    # (u 0.2..1.0) and y 40..90 (v 0.4..0.9); mirrored, u becomes 0.0..0.8.
    assert image_region((-20, -40, 80, 60), 100, 50).tolist() == pytest.approx([0.2, 0.4, 1.0, 0.9])
    assert image_region((-20, -40, 80, 60), 100, 50, flipped=True).tolist() == pytest.approx([0.0, 0.4, 0.8, 0.9])
    assert image_region((10, 10, 20, 20), 100, 50).tolist() == [0.0, 0.0, 1.0, 1.0]


# ------------------------------------------------------------------ 12.4: decode check
@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    truncated, empty, garbage = tmp_path / "truncated.jpg", tmp_path / "empty.png", tmp_path / "garbage.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty.write_bytes(b"")
    garbage.write_bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8).tobytes())
    return {"good": good, "truncated": truncated, "empty": empty, "garbage": garbage}


def test_truncated_jpeg_error_names_the_file(bad_files: dict[str, Path]) -> None:
    with pytest.raises(UnreadableImageError, match="truncated.jpg: cannot be decoded"):
        read_image(bad_files["truncated"])


def test_find_unreadable_lists_truncated_empty_and_garbage(bad_files: dict[str, Path]) -> None:
    bad = find_unreadable(list(bad_files.values()))
    assert [path.name for path, _ in bad] == ["truncated.jpg", "empty.png", "garbage.png"]
    assert all(reason for _, reason in bad)


def test_second_check_uses_the_cache(bad_files, image_check_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    decode = data.images.decode_error
    monkeypatch.setattr(data.images, "decode_error", lambda path: calls.append(Path(path)) or decode(path))
    first = find_unreadable(list(bad_files.values()))
    assert len(calls) == 4 and len(list(image_check_cache.glob("decode_check_*.json"))) == 1
    assert find_unreadable(list(bad_files.values())) == first
    assert len(calls) == 4  # nothing decoded again
    # A changed file (new size and mtime) is checked again, and only it.
    Image.new("RGB", (8, 8)).save(bad_files["empty"])
    assert [path.name for path, _ in find_unreadable(list(bad_files.values()))] == ["truncated.jpg", "garbage.png"]
    assert calls[4:] == [bad_files["empty"]]


def test_unwritable_cache_warns_and_still_checks(bad_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(UserWarning, match="Could not write the image-check cache"):
        assert len(find_unreadable(list(bad_files.values()))) == 3


@pytest.fixture
def cub_with_bad_images(cub_root: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the test CUB whose first training image is truncated and first test image is empty."""
    import shutil

    root = tmp_path / "CUB_200_2011"
    shutil.copytree(cub_root, root)
    rows = [line.split() for line in (root / "images.txt").read_text().splitlines()]
    split = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    train = next(path for image_id, path in rows if split[image_id] == "1")
    test = next(path for image_id, path in rows if split[image_id] == "0")
    data_train, data_test = root / "images" / train, root / "images" / test
    data_train.write_bytes(data_train.read_bytes()[:200])
    data_test.write_bytes(b"")
    return root, [train, test]


def test_labelled_setup_fails_before_training_with_the_bad_files(cub_with_bad_images) -> None:
    root, (train, test) = cub_with_bad_images
    datamodule = CUBDataModule(str(root), image_size=S, num_workers=0)
    with pytest.raises(ConfigError, match="of the train split cannot be decoded") as error:
        datamodule.setup("fit")
    assert train in str(error.value) and test not in str(error.value)  # fit reads no test image
    with pytest.raises(ConfigError, match="of the regression split cannot be decoded"):
        CUBDataModule(str(root), image_size=S, num_workers=0).setup("test")


def test_labelled_skip_unreadable_leaves_them_out(cub_with_bad_images) -> None:
    root, (train, test) = cub_with_bad_images
    datamodule = CUBDataModule(str(root), image_size=S, num_workers=0, skip_unreadable=True)
    plain = CUBDataModule(str(root), image_size=S, num_workers=0, skip_unreadable=True)
    with pytest.warns(UserWarning, match="Skipping 1 unreadable images") as records:
        datamodule.setup("test")
    warned = [str(r.message).splitlines()[0] for r in records if "unreadable" in str(r.message)]
    assert warned == [f"Skipping 1 unreadable images of the {split} split (skip_unreadable):" for split in ("regression", "test")]
    plain._build_datasets()
    assert len(datamodule.regression_dataset()) == len(plain._datasets["regression"]) - 1
    assert len(datamodule.test_dataset()) == len(plain._datasets["test"]) - 1
    assert sorted(path.relative_to(root / "images").as_posix() for path, _ in datamodule.unreadable) == sorted(
        [train, test]
    )
    for dataset in (datamodule.regression_dataset(), datamodule.test_dataset()):
        assert all(dataset[i]["image"].shape == (3, S, S) for i in range(len(dataset)))
