"""The command line: LightningCLI with one folder per run (``run_folder.py``) and only the output that matters."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules import detector
from lightning_modules.app.checkpoints import (
    CKPT_KEYWORDS,
    check_continuation,
    read_checkpoint,
    recorded_signature,
)
from lightning_modules.app.errors import cause_chain, unwrap_user_error
from lightning_modules.app.run_folder import (
    CHECKPOINTS,
    FolderSnapshot,
    RunConfigSaver,
    RunFolderLogger,
    RunLayout,
    as_source,
    check_output_folder,
    code_version,
)
from lightning_modules.app.settings import check_trainer_precision, check_training_steps
from lightning_modules.backbones.signature import check_fits

#: How a process hands its planned folders to the processes it launches (Lightning's DDP launcher
#: starts them before anything is written, so they would plan a run of their own: another timestamp).
LAYOUT_VARIABLE = "STABLE_KEYPOINTS_RUN_LAYOUT"

VALIDATE_REFUSAL = (
    "`validate` is not offered: this method has no validation split (StableKeypoints trains on the training "
    "images and its only evaluation fits a regressor on the training split and scores the test split). "
    "Run `python run.py test --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt`; to keep "
    "checkpoints by a number, ModelCheckpoint can monitor train/loss."
)


def quiet_unactionable_output() -> None:
    """Silences, by their exact text, the messages a user of this project can do nothing about.

    Each filter names one message and why it is noise here; every other warning still shows.
    """
    # The frozen backbone is kept in eval mode on purpose (no dropout, no norm statistics updates).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # Lightning 2.6's own pytree helper calls an API torch 2.13 deprecated; nothing to change on our side.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # An advertisement for a logger this project does not use, printed at every Trainer construction.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTip())
    # A warning shows where it came from and its message, not the source line that raised it.
    warnings.formatwarning = _without_source_line


def _without_source_line(message, category, filename, lineno, line=None) -> str:
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def inherited_layout(command: str) -> RunLayout | None:
    """The layout the parent process planned for this same command, when it launched this one."""
    raw = os.environ.get(LAYOUT_VARIABLE)
    if not raw:
        return None
    handed = json.loads(raw)
    # Lightning's launcher reruns this very command line in a child of the planner; anything else (this
    # process's own earlier command, a test runner that ran the CLI in-process and then starts run.py)
    # plans its own.
    if handed["pid"] != os.getppid() or handed["argv"] != sys.argv[1:] or handed["command"] != command:
        return None
    return RunLayout.from_json(handed["layout"])


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud")


class StableKeypointsCLI(LightningCLI):
    """``fit``, ``test`` and ``predict``: the configuration is what runs, checked before anything is
    built, and each command writes into its run's folder (see ``run_folder.py``).

    Lightning's CLI replaces the ``--model.*`` values of the command line with the hyperparameters
    saved in ``--ckpt_path``'s checkpoint, silently. Here the configuration wins: evaluation settings
    (augmentation_iterations, soft_argmax_window_px, ...) are honoured and recorded in the saved config,
    and settings the checkpoint's context fixes (family, layers, num_tokens) must match it or the run
    stops with a ``CheckpointMismatchError`` before any weights load.

    Adds ``--output_dir`` (this command's folder instead of the planned one), saves each command's
    config beside its results (``RunConfigSaver``), points the checkpoints and the loggers that can
    (``RunFolderLogger``) at the run's folder, shows training progress with ``progress_bar`` (unless
    the config has a progress bar or turns it off) and ends ``fit`` by printing where everything is.
    """

    def __init__(self, *args, progress_bar: type[ProgressBar] | None = None, **kwargs) -> None:
        quiet_unactionable_output()
        self.progress_bar = progress_bar
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands.pop("validate")
        return commands

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list) and argv[:1] == ["validate"]:
            parser.error(VALIDATE_REFUSAL)
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir", type=str | None, default=None,
            help="Folder of this command's files (default: the run's folder; for test/predict from a run's "
                 "checkpoint, its test/ or predict/<images>/).",
        )

    def _parse_ckpt_path(self) -> None:
        """Not Lightning's merge of the checkpoint's hyperparameters: see ``before_instantiate_classes``."""

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        check_trainer_precision(config.trainer.precision)  # the value as typed, before Lightning converts it
        if self.subcommand == "fit":
            check_training_steps(config.trainer)
        path = config.data.init_args.get("path") if config.get("data") else None
        images = Path(path) if path else None
        self.layout = inherited_layout(self.subcommand) or RunLayout.plan(
            self.subcommand,
            config.trainer.default_root_dir or ".",
            ckpt_path=config.get("ckpt_path"),
            predict_name=None if images is None else images.name if images.is_dir() else images.stem,
            output_dir=config.get("output_dir"),
        )
        check_output_folder(self.layout.output_dir, "--output_dir" if config.get("output_dir") else "The run's folder")
        os.environ[LAYOUT_VARIABLE] = json.dumps(
            {"pid": os.getpid(), "argv": sys.argv[1:], "command": self.subcommand, "layout": self.layout.to_json()})

    def instantiate_trainer(self, **kwargs) -> Trainer:
        layout = self.layout
        config = self.config[self.subcommand]
        ckpt = config.get("ckpt_path") or config.model.get("pretrained_context")
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": str(layout.config_file),
                                   "command": self.subcommand, "checkpoint": ckpt and as_source(ckpt)}
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        if self.progress_bar is not None and trainer_config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, self.progress_bar()]
        trainer = super().instantiate_trainer(default_root_dir=str(layout.output_dir), **kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(layout.run_dir / CHECKPOINTS)
                if layout.resumed:  # a resume writes beside the checkpoints it continues, by design
                    warnings.filterwarnings(
                        "ignore", message=f"Checkpoint directory {re.escape(callback.dirpath)} exists and is not empty"
                    )
        for logger in trainer.loggers:
            if isinstance(logger, RunFolderLogger):
                logger.use_run(layout.output_dir, layout.wandb_id, group=layout.run_dir.name)
            if hasattr(logger, "add_run_config"):  # callbacks.wandb_logger.WandbLogger: the dashboard's config
                logger.add_run_config(self.run_config())
        return trainer

    def run_config(self) -> dict:
        """This command's resolved config for a dashboard: every setting, what the backbone resolved
        (family, model id, captured layers) and the code version."""
        signature = self.model.signature()
        config = json.loads(json.dumps(self.config[self.subcommand].as_dict(), default=str))
        return {**config, "command": self.subcommand, "family": signature.family, "model_id": signature.model,
                "layers": list(signature.layers or ()), "code_version": code_version()}

    def test(self, **kwargs) -> list:
        """``trainer.test`` without Lightning's results table (its columns are the two loaders, regression
        images and test images, with one number and truncated names): ``RegressorEvaluation`` prints the
        test split's metrics by their full names."""
        return self.trainer.test(**{**kwargs, "verbose": False})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            # jsonargparse reports what a class's __init__ raised as its own ValueError: the user's mistake
            # is the error inside.
            mistake = unwrap_user_error(error)
            if mistake is error:
                raise
            # (the cause itself: raised without its wrapper, whose cause it is)
            raise mistake from (None if any(mistake is cause for cause in cause_chain(error)) else error)
        # Built, nothing loaded or written yet: a checkpoint that cannot serve this model stops here.
        config = self.config[self.subcommand] if self.subcommand else None
        ckpt_path = config.get("ckpt_path") if config else None
        if ckpt_path and ckpt_path not in CKPT_KEYWORDS:
            checkpoint = read_checkpoint(ckpt_path)
            check_fits(recorded_signature(checkpoint), self.model.signature(), f"ckpt_path={ckpt_path!r}")
            if self.subcommand == "fit":
                check_continuation(checkpoint, self.trainer.max_steps, ckpt_path)
        hp = self.model.hparams
        if hp.get("pretrained_context"):  # a context file, checked as a checkpoint is (its width once the model loads)
            detector.load_pretrained(hp.pretrained_context, hp.pretrained_keypoint_tokens, self.model.signature(),
                                     hp.top_k, need_tokens=self.subcommand in ("test", "predict") and not ckpt_path)

    def _run_subcommand(self, subcommand: str) -> None:
        # Everything that can be checked before the run's folder, its W&B run and the weights exist has been;
        # what remains can fail only once they do (a weight file, a full disk at the first picture). A
        # command that fails before its first result takes back what it made: a rerun starts clean.
        before = FolderSnapshot.of(self.layout.output_dir)
        try:
            super()._run_subcommand(subcommand)
        except Exception:
            if self.trainer.is_global_zero and not before.new_results(self.layout.config_file):
                before.remove_new()
            raise

    def after_fit(self) -> None:
        trainer, layout = self.trainer, self.layout
        lines = [f"Run folder: {layout.run_dir}", f"  config:      {layout.config_file}"]
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            lines.append(f"  checkpoint:  {callback.last_model_path}")
            # Without a monitor, "best" is only the newest periodic checkpoint: not worth a line.
            if callback.monitor is not None and callback.best_model_path:
                score = callback.best_model_score
                shown = "" if score is None else f" = {float(score):.6g}"
                lines.append(f"  best:        {callback.best_model_path} ({callback.monitor}{shown})")
        for label, name in (("embedding:", "embedding.safetensors"), ("pictures:", "visualizations")):
            if (layout.run_dir / name).exists():
                lines.append(f"  {label:<12} {layout.run_dir / name}")
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            lines += [
                "Next:",
                f"  python run.py test --config {layout.config_file} --ckpt_path {callback.last_model_path}",
                f"  python -m lightning_modules.detector export {layout.run_dir}",
            ]
        rank_zero_info("\n".join(lines))
