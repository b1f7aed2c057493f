"""Command line: ``python run.py {fit,test,predict} --config conf/<experiment>.yaml``."""

from __future__ import annotations

import os
import sys

from callbacks.progress import StepProgressBar
from data.base import KeypointDataModule
from lightning_modules.app.cli import StableKeypointsCLI
from lightning_modules.app.errors import UserError
from lightning_modules.stable_keypoints import StableKeypoints

#: Set to 1 to see the full traceback of a user error (a bad value, a missing file, a mismatched checkpoint).
TRACEBACK_VARIABLE = "STABLE_KEYPOINTS_TRACEBACK"


def main(args: list[str] | None = None) -> StableKeypointsCLI:
    return StableKeypointsCLI(
        StableKeypoints,
        KeypointDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        progress_bar=StepProgressBar,
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
