"""Command line: ``python run.py {fit,test,predict} --config conf/<experiment>.yaml``."""

from __future__ import annotations

from data.base import KeypointDataModule
from lightning_modules.cli import KeypointsCLI
from lightning_modules.stable_keypoints import StableKeypoints


def main(args: list[str] | None = None) -> KeypointsCLI:
    return KeypointsCLI(
        StableKeypoints,
        KeypointDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()
