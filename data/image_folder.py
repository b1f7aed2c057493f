"""Unlabelled images from a folder (searched recursively) or one file: train and predict only.

Each image is centre-padded to a square with uniform gray (127, 127, 127), the background
zero123plus was trained on and a neutral value for SD, then resized to S x S. ``crop_box`` records
the padded square in source pixels, so predicted keypoints map back to the original image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.crop import crop_resize, image_region, image_tensor
from data.images import GRAY_RGB, read_image
from data.sampling import SampleKey, sample_draws
from lightning_modules.app.errors import MissingFileError


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str | Path) -> list[Path]:
    """Image files under ``path`` (a folder, searched recursively, or one image), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingFileError(f"data.path={str(path)!r} does not exist: give a folder of images or one image file.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise MissingFileError(f"data.path={str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


PAD_RGB = GRAY_RGB


def content_key(path: Path) -> int:
    """A 56-bit identity of the file's bytes (BLAKE2b; fits int64 once batched): seeds its keypoint extraction.

    The bytes rather than the path: a copy, a renamed file and the same file in another folder are
    one image and get one set of keypoints; reading a file twice costs far less than one UNet call.
    """
    return int.from_bytes(hashlib.blake2b(Path(path).read_bytes(), digest_size=7).digest(), "little")


class ImageFolderDataset(Dataset):
    """Unlabelled images of ``path`` (a folder searched recursively, or one image file).

    Files are read with ``data.images.read_image`` (upright, transparency on ``background_rgb``);
    the DataModule decode-checks them at set-up (``KeypointDataModule.checked``).

    Args:
        path: folder or image file.
        image_size: side S of the returned images, in pixels.
        mirror: randomly mirror half of the samples (training augmentation, drawn per sample from
            its ``SampleKey``).
        background_rgb: 0-255 colour under transparent pixels.

    A sample's ``sample_key`` is ``content_key`` of its file: the same file gets the same keypoints
    wherever it lies in the folder and whatever it is called.
    """

    def __init__(
        self, path: str | Path, image_size: int, mirror: bool = False, background_rgb: tuple[int, int, int] = GRAY_RGB
    ) -> None:
        self.image_size = image_size
        self.mirror = mirror
        self.background_rgb = background_rgb
        self.files: list[Path] = list_images(path)

    def __len__(self) -> int:
        return len(self.files)

    def image_path(self, index: int) -> Path:
        return self.files[index]

    def sample_flip(self, generator: torch.Generator) -> bool:
        """One sample's random mirror (half of them when ``mirror``)."""
        return self.mirror and bool(torch.rand((), generator=generator) < 0.5)

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, generator = sample_draws(key)
        path = self.files[index]
        image = image_tensor(read_image(path, self.background_rgb))
        height, width = image.shape[-2:]
        side = max(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        flipped = self.sample_flip(generator)
        pixels = crop_resize(image, box, self.image_size, PAD_RGB, mirror=flipped)
        return {
            "image": pixels,
            "index": index,
            "sample_key": content_key(path),
            "path": str(path),
            "crop_box": torch.tensor(box, dtype=torch.float32),
            "flipped": flipped,
            "source_size": torch.tensor([width, height]),
            "image_region": image_region(box, width, height, flipped),
        }
