"""A DataModule over a folder of unlabelled images (``data.image_folder``): train and predict only."""

from __future__ import annotations

from torch.utils.data import Dataset

from data.base import KeypointDataModule
from data.image_folder import ImageFolderDataset
from data.images import GRAY_RGB
from lightning_modules.app.errors import ConfigError
class ImageFolderDataModule(KeypointDataModule):
    """A folder of unlabelled images for ``fit`` (random mirror) and ``predict``; no ``test``.

    Args:
        path: folder of images (searched recursively) or one image file; used for both stages.
        image_size: side S of the square images fed to the model, in pixels.
        batch_size: images per device and step.
        num_workers: DataLoader worker processes.
        background_rgb: 0-255 colour under transparent pixels (see ``KeypointDataModule``).
        skip_unreadable: leave out (and list) files that cannot be decoded instead of failing at set-up.
        seed: seed of the training order and of the per-sample mirror draws.
    """

    def __init__(
        self,
        path: str,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        background_rgb: tuple[int, int, int] = GRAY_RGB,
        skip_unreadable: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, path=path,
                         background_rgb=background_rgb, skip_unreadable=skip_unreadable, seed=seed)
        self._train: Dataset | None = None
        self._plain: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            raise ConfigError(
                f"ImageFolderDataModule ({self.path!r}) holds unlabelled images: `test` needs ground-truth "
                "keypoints. Use a labelled DataModule (e.g. data.cub.CUBDataModule) or run `predict`."
            )
        if stage in (None, "fit") and self._train is None:
            self._train = self.checked(
                ImageFolderDataset(self.path, self.image_size, mirror=True, background_rgb=self.background_rgb), "train"
            )
        if stage == "predict":
            self.path_dataset()
        self.check_stage(stage)

    def train_dataset(self) -> Dataset:
        if self._train is None:
            self.setup("fit")
        return self._train

    def ranking_dataset(self) -> Dataset:
        # No labelled regression split here: the unaugmented images.
        if self._plain is None:
            self._plain = self.checked(ImageFolderDataset(self.path, self.image_size, background_rgb=self.background_rgb),
                                       "train")
        return self._plain
