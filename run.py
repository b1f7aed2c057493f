"""Command line: ``python run.py {fit,validate,test,predict} --config conf/<experiment>.yaml``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from data.base import KeypointDataModule
from lightning_modules.stable_keypoints import StableKeypoints


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        StableKeypoints,
        KeypointDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()
