"""Command line: ``python run.py {fit,validate,test,predict} --config conf/<experiment>.yaml``."""

from lightning.pytorch.cli import LightningCLI

from data.base import KeypointDataModule
from lightning_modules.stable_keypoints import StableKeypoints


def main() -> None:
    LightningCLI(
        StableKeypoints,
        KeypointDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
