"""Where each command writes, and what its artifacts record about where they came from.

One folder per fit run, under ``trainer.default_root_dir`` (the experiment's folder)::

    <default_root_dir>/<run>/            run = <YYYYmmdd-HHMMSS>-<6 hex>, also the W&B run id
        config.yaml                      the fit's config (a resume adds config.resume-1.yaml, ...)
        checkpoints/last.ckpt ...
        embedding.safetensors            the context and its keypoint tokens
        visualizations/step_*/           attention pictures during training
        wandb/                           the W&B run (offline-run-* when offline)
        test/                            `test --ckpt_path <run>/checkpoints/*.ckpt`: config.yaml,
                                         metrics.json, regressor.safetensors, test_examples/
        predict/<images>/                `predict --ckpt_path ...`: config.yaml, keypoints.json, overlays/
        detector/                        `python -m lightning_modules.detector export <run>`

A resume (``fit --ckpt_path <run>/checkpoints/last.ckpt``) continues in the same folder and W&B
run. ``test``/``predict`` from a checkpoint of a run write inside that run (``test-2``,
``predict/<images>-2``, ... when the folder already holds results: nothing is overwritten; a killed
``predict`` run again continues in its folder); from
anything else (a detector, a context file, a checkpoint outside a run) they start a new run
folder. ``--output_dir`` puts a command's files in a folder of your choice instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback

from lightning_modules.app import files
from lightning_modules.app.errors import (
    ConfigError,
    DamagedFileError,
    MissingFileError,
    output_error,
)

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
EMBEDDING_FILE = "embedding.safetensors"
METRICS_FILE = "metrics.json"
REGRESSOR_FILE = "regressor.safetensors"


@functools.cache
def code_version() -> str:
    """The git commit of this code (``<sha>-dirty`` with uncommitted changes), ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if changes else sha


def new_run_id(now: datetime.datetime | None = None) -> str:
    """``20261201-093000-1a2b3c``: sorts by start time; the random tail keeps simultaneous runs apart."""
    now = now or datetime.datetime.now()
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def run_of_checkpoint(ckpt_path: str | Path | None) -> Path | None:
    """``<run>/checkpoints/<name>.ckpt`` -> ``<run>``; None for a checkpoint that is not in a run folder."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == CHECKPOINTS else None


def unused_folder(path: Path) -> Path:
    """``path`` if it is absent or empty, else the first absent or empty ``path-2``, ``path-3``, ..."""
    candidate, n = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def unfinished_predict(folder: Path) -> bool:
    """A ``predict`` folder that was killed before it merged its shards (``KeypointWriter``): rerunning
    the same command continues it there instead of starting over elsewhere."""
    return (folder / "shards").is_dir() and not any(folder.glob("keypoints.*"))


def free_config_file(folder: Path) -> Path:
    """``config.yaml``, or ``config.resume-<n>.yaml`` beside the configs of the runs this one continues."""
    config, n = folder / CONFIG_FILE, 0
    while config.exists():
        n += 1
        config = folder / f"config.resume-{n}.yaml"
    return config


def wandb_id(name: str) -> str:
    """A folder name as a W&B run id (letters, digits, ``-``, ``_``, ``.`` only)."""
    return re.sub(r"[^\w.-]+", "-", name)


@runtime_checkable
class RunFolderLogger(Protocol):
    """A logger that can be told, before its run starts, to write into the run's folder under its run id
    (``callbacks.wandb_logger.WandbLogger``; the CLI calls ``use_run`` with the planned layout)."""

    def use_run(self, folder: str | Path, run_id: str, group: str | None = None) -> None: ...


@dataclass(frozen=True)
class RunLayout:
    """The folders of one command.

    Attributes:
        run_dir: the fit run's folder (for test/predict: the run the checkpoint belongs to, or a new one).
        output_dir: where this command writes: ``run_dir`` for fit, its ``test``/``predict/<name>`` folder.
        config_file: this command's saved config.
        resumed: fit continues a run from one of its checkpoints, or predict a killed predict.
        wandb_id: the W&B run of this command (fit and its resumes share one).
    """

    run_dir: Path
    output_dir: Path
    config_file: Path
    resumed: bool
    wandb_id: str

    def to_json(self) -> str:
        return json.dumps({key: str(value) if isinstance(value, Path) else value
                           for key, value in dataclasses.asdict(self).items()})

    @staticmethod
    def from_json(text: str) -> RunLayout:
        fields = json.loads(text)
        return RunLayout(**{key: value if key in ("resumed", "wandb_id") else Path(value)
                            for key, value in fields.items()})

    @staticmethod
    def plan(
        command: str,
        root_dir: str | Path,
        ckpt_path: str | None = None,
        predict_name: str | None = None,
        output_dir: str | None = None,
        run_id: str | None = None,
    ) -> RunLayout:
        """The folders of ``command`` (fit, test, predict); creates nothing.

        Args:
            root_dir: ``trainer.default_root_dir``, the folder that holds the runs.
            ckpt_path: the command's ``--ckpt_path``.
            predict_name: the name of the predicted images (``predict/<predict_name>``).
            output_dir: the user's ``--output_dir``: this command's folder instead of the planned one.
            run_id: the name of a new run (default: ``new_run_id()``).
        """
        run_of_ckpt = run_of_checkpoint(ckpt_path)
        if command == "fit":
            resumed = bool(ckpt_path)
            run = Path(output_dir) if output_dir else run_of_ckpt or Path(root_dir) / (run_id or new_run_id())
            config = free_config_file(run)  # a resume keeps the fit's config and adds its own
            return RunLayout(run.resolve(), run.resolve(), config.resolve(), resumed, wandb_id(run.name))
        run = run_of_ckpt or Path(root_dir) / (run_id or new_run_id())
        if output_dir:
            out = Path(output_dir)
            if (out / CONFIG_FILE).exists() and not (command == "predict" and unfinished_predict(out)):
                raise ConfigError(
                    f"--output_dir {out} already holds the results of an earlier command ({out / CONFIG_FILE}): "
                    "give a new or empty folder, or leave --output_dir out to write inside the run."
                )
        elif command == "predict":
            planned = run / "predict" / (predict_name or "test_split")
            out = planned if unfinished_predict(planned) else unused_folder(planned)
        else:
            out = unused_folder(run / command)
        name = out.name if out.parent == run else f"{out.parent.name}-{out.name}"
        resumed = command == "predict" and unfinished_predict(out)
        return RunLayout(run.resolve(), out.resolve(), free_config_file(out).resolve(), resumed,
                         wandb_id(f"{run.name}-{name}"))


class RunConfigSaver(SaveConfigCallback):
    """Saves each command's config in its own folder (``RunLayout.config_file``), never over another.

    The file is the config as parsed (so ``fit --config <run>/config.yaml`` starts the same run
    again, in a new folder), headed by comment lines saying which command wrote it, from which
    checkpoint, with which code version, in which working folder (the one its relative paths are
    relative to). It is written when the command's work starts (``on_fit_start``,
    ``on_test_start``, ``on_predict_start``: the data, the weights and the checkpoint are checked
    by then), not at set-up, so a command that fails to start leaves no folder behind.
    """

    def __init__(
        self, *args, config_filename: str = CONFIG_FILE, command: str = "", checkpoint: str | None = None, **kwargs
    ) -> None:
        super().__init__(*args, config_filename=config_filename, save_to_log_dir=False, **kwargs)
        self.command = command
        self.checkpoint = checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Nothing yet: see ``on_fit_start``."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module, "fit")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module, "predict")

    def _save_once(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and not self.already_saved:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = Path(self.config_filename)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        if path.exists():  # RunLayout.plan picks a new name; a race must not overwrite either
            raise FileExistsError(f"{path} already exists: the config of an earlier command is kept.")
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        header = (
            f"# Written by `run.py {self.command or stage}` at {when}.\n"
            f"# checkpoint: {self.checkpoint or checkpoint_of(trainer, pl_module)}\n"
            f"# code_version: {code_version()}\n"
            f"# working_dir: {Path.cwd()}\n"
        )
        files.write_text(path, header + self.parser.dump(self.config, skip_none=False))


#: What a command writes while it starts, before any result: removed again when it fails to start.
STARTUP_ENTRIES = ("wandb", "visualizations")


@dataclass(frozen=True)
class FolderSnapshot:
    """The files and folders two levels into a command's folder before it runs, so that a command which
    fails before its first result can take back what it made (``remove_new``): a failed start leaves nothing.

    Results are files outside ``STARTUP_ENTRIES`` and the command's config: checkpoints, the context
    file, metrics, keypoint shards, overlays.
    """

    folder: Path
    missing: tuple[Path, ...]  # the folder and its ancestors that did not exist, innermost first
    entries: dict[Path, int]  # path -> mtime_ns (files), -1 (folders)

    @staticmethod
    def of(folder: Path) -> FolderSnapshot:
        missing = [path for path in (folder, *folder.parents) if not path.exists()]
        return FolderSnapshot(folder, tuple(missing), FolderSnapshot._entries(folder))

    @staticmethod
    def _entries(folder: Path) -> dict[Path, int]:
        entries: dict[Path, int] = {}
        if not folder.is_dir():
            return entries
        for path in [*folder.iterdir(), *(p for d in folder.iterdir() if d.is_dir() for p in d.iterdir())]:
            entries[path] = path.stat().st_mtime_ns if path.is_file() else -1
        return entries

    def new_results(self, config_file: Path) -> list[Path]:
        """Files written or changed since the snapshot that are results (not the config, W&B or pictures)."""
        now = self._entries(self.folder)
        return [path for path, mtime in now.items() if mtime >= 0 and path != config_file
                and path.relative_to(self.folder).parts[0] not in STARTUP_ENTRIES and self.entries.get(path) != mtime]

    def remove_new(self) -> None:
        """Removes what appeared since the snapshot: the folder when the command made it (and the folders above
        it that it made, when they are empty), else the new entries in it."""
        if self.missing:
            shutil.rmtree(self.folder, ignore_errors=True)
            for parent in self.missing[1:]:
                try:
                    parent.rmdir()  # only when empty: another command may have started meanwhile
                except OSError:
                    break
            return
        for path in sorted(set(self._entries(self.folder)) - set(self.entries), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def header_value(config_file: str | Path, key: str) -> str | None:
    """The value of the ``# <key>: <value>`` line in the header ``RunConfigSaver`` wrote, None without one."""
    for line in Path(config_file).read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith(f"# {key}: "):
            return line[len(f"# {key}: "):]
    return None


def check_output_folder(folder: Path, option: str) -> None:
    """Raises ``ConfigError`` or ``OutputError`` naming ``folder`` (and ``option``, where it comes from) when
    the command could not write there: a file in the way, a read-only disk, no permission. Creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {folder}: {existing} is a file, not a folder. Give a folder (new or empty), "
                          "or remove the file.")
    try:
        probe = tempfile.mkdtemp(prefix=f"{files.TEMPORARY_PREFIX}write-check-", suffix=files.TEMPORARY_SUFFIX,
                                 dir=existing)
    except OSError as error:
        raise output_error(error, folder) from error
    os.rmdir(probe)


def as_source(path_or_id: str) -> str:
    """A local file or folder as an absolute path; anything else (a hub id) as it is."""
    path = Path(path_or_id)
    return str(path.resolve()) if path.exists() else str(path_or_id)


def config_file_of(trainer: L.Trainer | None) -> str | None:
    """The config this command saved (``RunConfigSaver``), None without the CLI."""
    for callback in trainer.callbacks if trainer is not None else ():
        if isinstance(callback, RunConfigSaver):
            return str(callback.config_filename)
    return None


def checkpoint_of(trainer: L.Trainer | None, pl_module: L.LightningModule) -> str | None:
    """The trained state this command uses: ``--ckpt_path``, else ``model.pretrained_context``, else None."""
    if trainer is not None and trainer.ckpt_path:
        return str(Path(trainer.ckpt_path).resolve())
    pretrained = getattr(pl_module, "hparams", {}).get("pretrained_context")
    return as_source(pretrained) if pretrained else None


def provenance(trainer: L.Trainer | None, pl_module: L.LightningModule) -> dict[str, str | None]:
    """``checkpoint``, ``config`` and ``code_version``: what every artifact records about its origin."""
    return {"checkpoint": checkpoint_of(trainer, pl_module), "config": config_file_of(trainer),
            "code_version": code_version()}


def state_config(run_dir: Path, meta: dict[str, str]) -> Path:
    """The config of the command that produced the exported state: the one its metadata names (after a
    resume ``config.resume-<n>.yaml``; looked up in ``run_dir`` when the run folder was moved), the
    run's ``config.yaml`` when the context file names none (written outside the CLI)."""
    named = meta.get("config")
    if named in (None, "None"):
        config = run_dir / CONFIG_FILE
    else:
        config = Path(named) if Path(named).is_file() else run_dir / Path(named).name
    if not config.is_file():
        raise MissingFileError(
            f"{config} does not exist: it is the config of the command that trained the state in "
            f"{run_dir / EMBEDDING_FILE}. Export a run folder as fit left it."
        )
    return config


#: Keys of a saved config that place one command (the checkpoint it resumed, the folder it wrote).
COMMAND_KEYS = ("ckpt_path", "output_dir")


def portable_config(config: Path) -> str:
    """The text of a saved config whose relative paths are made absolute, against the folder its command ran in
    (its ``# working_dir:`` header line): the detector's command then reads the same model and data, and
    writes its outputs where the run's went, from whatever folder it runs in (never into the detector's).

    Relative values that name an existing file or folder there, and ``trainer.default_root_dir``, change;
    the rest (all of a config without the header line) stay as they are. ``COMMAND_KEYS`` are cleared: a
    command run with the detector's config neither resumes the run's checkpoint nor writes into its folder.
    """
    text = config.read_text()
    working_dir = header_value(config, "working_dir")
    base = None if working_dir is None else Path(working_dir)

    def absolute(value, key: str):
        if isinstance(value, dict):
            return {k: absolute(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, list):
            return [absolute(v, key) for v in value]
        relative = isinstance(value, str) and value and not Path(value).is_absolute() and "\n" not in value
        if base is not None and relative and (key == "trainer.default_root_dir" or (base / value).exists()):
            return os.path.normpath(base / value)
        return value

    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DamagedFileError(f"{config} is not a readable YAML config ({error}).") from error
    if not isinstance(body, dict):
        raise DamagedFileError(f"{config} is not a config (a YAML mapping of settings).")
    body = absolute(body, "")
    for key in COMMAND_KEYS:  # where that command read and wrote, not what the detector is
        if key in body:
            body[key] = None
    note = ("# For the detector (`python -m lightning_modules.detector export`): relative paths made absolute "
            "against working_dir, ckpt_path and output_dir cleared.\n" if base is not None else "")
    return header + note + yaml.safe_dump(body, sort_keys=False)
