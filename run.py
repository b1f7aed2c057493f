"""Command line: ``python run.py {fit,validate,test,predict} --config conf/<experiment>.yaml``."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from data.base import KeypointDataModule
from lightning_modules.checkpoints import check_config_fits
from lightning_modules.errors import UserError
from lightning_modules.stable_keypoints import StableKeypoints, check_trainer_precision

#: Set to 1 to see the full traceback of a user error (a bad value, a missing file, a mismatched checkpoint).
TRACEBACK_VARIABLE = "STABLE_KEYPOINTS_TRACEBACK"


class StableKeypointsCLI(LightningCLI):
    """LightningCLI whose configuration is what runs, checked before anything is built.

    Lightning's CLI replaces the ``--model.*`` values of the command line with the hyperparameters
    saved in ``--ckpt_path``'s checkpoint, silently. Here the configuration wins: evaluation settings
    (augmentation_iterations, soft_argmax_window_px, ...) are honoured and recorded in the saved config,
    and settings the checkpoint's context fixes (family, layers, num_tokens) must match it or the run
    stops with a ``CheckpointMismatchError`` before any weights load.
    """

    def _parse_ckpt_path(self) -> None:
        """Not Lightning's merge of the checkpoint's hyperparameters: see ``before_instantiate_classes``."""

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        check_trainer_precision(config.trainer.precision)  # the value as typed, before Lightning converts it
        if config.get("ckpt_path"):
            check_config_fits(config.ckpt_path, config.model)


def main(args: list[str] | None = None) -> LightningCLI:
    return StableKeypointsCLI(
        StableKeypoints,
        KeypointDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


def run(args: list[str] | None = None) -> None:
    """``main`` for a person at a terminal: a user error is its message alone and exit status 2.

    Any other exception is a bug and keeps its traceback.
    """
    try:
        main(args)
    except UserError as error:
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        print(f"error: {error}\n(full traceback: {TRACEBACK_VARIABLE}=1)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
