"""Command line: ``python run.py {fit,test,predict} --config conf/<experiment>.yaml``."""

from __future__ import annotations

from callbacks.progress import StepProgressBar
from data.base import KeypointDataModule
from lightning_modules.app.cli import StableKeypointsCLI
from lightning_modules.app.errors import TRACEBACK_VARIABLE, run_for_user
from lightning_modules.stable_keypoints import StableKeypoints

__all__ = ["TRACEBACK_VARIABLE", "main", "run"]


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
    """``main`` for a person at a terminal: a user's mistake is one ``error:`` line and exit status 2
    (``lightning_modules/app/errors.py``); any other exception is a bug and keeps its traceback."""
    run_for_user(lambda: main(args))


if __name__ == "__main__":
    run()
