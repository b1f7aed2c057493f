"""Unlabelled images from a folder (searched recursively) or one file: train and predict only.

Each image is centre-padded to a square with uniform gray (127, 127, 127), the background
zero123plus was trained on and a neutral value for SD, then resized to S x S. ``crop_box`` records
the padded square in source pixels, so predicted keypoints map back to the original image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from data.base import KeypointDataModule, crop_resize, image_region, image_tensor, list_images
from data.images import GRAY_RGB, read_image

PAD_RGB = GRAY_RGB


class ImageFolderDataset(Dataset):
    """Unlabelled images of ``path`` (a folder searched recursively, or one image file).

    Files are read with ``data.images.read_image`` (upright, transparency on ``background_rgb``);
    the DataModule decode-checks them at set-up (``KeypointDataModule.checked``).

    Args:
        path: folder or image file.
        image_size: side S of the returned images, in pixels.
        mirror: randomly mirror half of the samples (training augmentation; torch's RNG, so
            seeding and DataLoader worker seeds apply).
        background_rgb: 0-255 colour under transparent pixels.
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

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        image = image_tensor(read_image(path, self.background_rgb))
        height, width = image.shape[-2:]
        side = max(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        flipped = self.mirror and bool(torch.rand(()) < 0.5)
        pixels = crop_resize(image, box, self.image_size, PAD_RGB, mirror=flipped)
        return {
            "image": pixels,
            "index": index,
            "path": str(path),
            "crop_box": torch.tensor(box, dtype=torch.float32),
            "flipped": flipped,
            "source_size": torch.tensor([width, height]),
            "image_region": image_region(box, width, height, flipped),
        }


class ImageFolderDataModule(KeypointDataModule):
    """A folder of unlabelled images for ``fit`` (random mirror) and ``predict``; no ``test``.

    Args:
        path: folder of images (searched recursively) or one image file; used for both stages.
        image_size: side S of the square images fed to the model, in pixels.
        batch_size: images per device and step.
        num_workers: DataLoader worker processes.
        background_rgb: 0-255 colour under transparent pixels (see ``KeypointDataModule``).
        skip_unreadable: leave out (and list) files that cannot be decoded instead of failing at set-up.
    """

    def __init__(
        self,
        path: str,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        background_rgb: tuple[int, int, int] = GRAY_RGB,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, path=path,
                         background_rgb=background_rgb, skip_unreadable=skip_unreadable)
        self._train: Dataset | None = None
        self._plain: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            raise ValueError(
                f"ImageFolderDataModule ({self.path!r}) holds unlabelled images: `test` needs ground-truth "
                "keypoints. Use a labelled DataModule (e.g. data.cub.CUBDataModule) or run `predict`."
            )
        if stage in (None, "fit") and self._train is None:
            self._train = self.checked(
                ImageFolderDataset(self.path, self.image_size, mirror=True, background_rgb=self.background_rgb), "train"
            )
        if stage == "predict":
            self.path_dataset()

    def train_dataset(self) -> Dataset:
        if self._train is None:
            self.setup("fit")
        return self._train

    def keypoint_index_dataloader(self) -> DataLoader:
        # No labelled regression split here: rank the keypoint tokens on the unaugmented images.
        if self._plain is None:
            self._plain = self.checked(ImageFolderDataset(self.path, self.image_size, background_rgb=self.background_rgb),
                                       "train")
        return self._loader(self._plain, shuffle=False)
