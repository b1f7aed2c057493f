"""Weights & Biases logging that never prompts or hangs (offline when there is no login or network), whose
runs can be told apart: each run's config is the whole resolved configuration of its command."""

from __future__ import annotations

import json
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _WandbLogger
import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_modules.app import files


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)


def wandb_can_go_online(timeout_s: float = 3.0) -> tuple[bool, str]:
    """Whether W&B has credentials and its server answers, and why not."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    host, port = _wandb_host()
    if not os.environ.get("WANDB_API_KEY"):
        try:
            logged_in = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            logged_in = False
        if not logged_in:
            return False, "no W&B login (run `wandb login` or set WANDB_API_KEY)"
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False, f"{host}:{port} is unreachable"
    return True, ""


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger, offline by itself when W&B cannot be reached, that shows the whole run.

    The run's config holds the command's resolved configuration (``add_run_config``: the CLI gives it
    every setting, the backbone's family, model id and captured layers, the seed and the code version),
    beside the LightningModule's hyperparameters that Lightning logs; ``finalize`` finishes the W&B run,
    so that its service shuts down cleanly. An offline run also gets the files an online run has in its
    ``files/`` folder, ``config.yaml`` and ``wandb-summary.json`` (wandb 0.31 keeps them only in its
    ``.wandb`` log until ``wandb sync``), so that the run folder alone tells what ran and what it scored.

    Args:
        save_dir: folder of the W&B files; ``None`` (default) = the run's folder (``use_run``).
        offline: ``None`` (default) decides at start: online when there is a login and the server
            answers, else offline into ``save_dir``, to upload later with ``wandb sync``.
        Other arguments: as ``lightning.pytorch.loggers.WandbLogger``.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        project: str = "stable-keypoints",
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs,
    ) -> None:
        # The CLI fills every wandb.init argument it can see with None; None would override Lightning's
        # own defaults (resume="allow") and ours below, so only values someone set count.
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        reason = ""
        if offline is None:
            online, reason = wandb_can_go_online()
            offline = not online
        if offline:
            # Also stops wandb from asking for an API key on an interactive terminal.
            os.environ.setdefault("WANDB_MODE", "offline")
        if "settings" not in kwargs:
            # Offline, W&B's banner (version, "syncing is set to offline", a sync hint) repeats what
            # finalize() says once at the end; online, `quiet` still prints the run's URL.
            kwargs["settings"] = {"silent": True} if offline else {"quiet": True}
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, log_model=log_model, **kwargs)
        # Lightning passes anonymous=None, which wandb 0.31 warns about ("has no effect") on every run.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self._offline_reason = reason
        self._run_config: dict[str, Any] = {}

    def add_run_config(self, config: dict[str, Any]) -> None:
        """Adds ``config`` (nested, JSON-like) to the run's config; it is sent with the hyperparameters
        Lightning logs when the command starts, so a command that fails before leaves no W&B run."""
        self._run_config.update(config)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = params if isinstance(params, dict) else vars(params)
        super().log_hyperparams({**self._run_config, **params})

    def use_run(self, folder: str | Path, run_id: str, group: str | None = None) -> None:
        """Logs into ``folder`` as W&B run ``run_id`` (before the run starts; the CLI calls it with the
        run's folder). ``save_dir``, ``id``/``version`` and ``group`` given in the config win."""
        if self._experiment is not None:
            raise RuntimeError("WandbLogger.use_run must be called before the W&B run starts.")
        # Lightning's WandbLogger keeps these in private fields read when the run starts.
        if self._save_dir is None:
            self._save_dir = self._wandb_init["dir"] = str(folder)
        if self._wandb_init.get("id") is None:
            self._id = self._wandb_init["id"] = run_id
        if group is not None and self._wandb_init.get("group") is None:
            self._wandb_init["group"] = group

    @property
    def experiment(self):
        """The W&B run, started by its first use (a logged value, the hyperparameters), not by Lightning's
        set-up, which asks for it before the data, the weights and the checkpoint are checked: a command
        that fails before its first log leaves no W&B run, no folder and no "wandb sync" line."""
        if self._experiment is None and rank_zero_only.rank == 0:
            return _StartsOnUse(self._start)
        return super().experiment

    def _start(self):
        if self._experiment is None and rank_zero_only.rank == 0:
            # The folder is made when the W&B run starts (rank 0 only): a command that never logs leaves none.
            if self._save_dir is not None:
                Path(self._save_dir).mkdir(parents=True, exist_ok=True)
            # Each command runs its own wandb-core. An inherited WANDB_SERVICE (set by a Python parent that
            # used wandb: pytest, a notebook, a driver script) makes it share the parent's, which still holds
            # the previous command's run id as "in use", so a resumed fit could not continue its run.
            os.environ.pop("WANDB_SERVICE", None)
        return _WandbLogger.experiment.fget(self)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is None:
            return
        run_dir = Path(self._experiment.dir).parent
        succeeded = status in ("success", "finished")
        if self._offline and succeeded:
            self._write_run_files(Path(self._experiment.dir))
        # Finished here, not by wandb's exit hook: that one runs after its service has begun closing,
        # leaving a HandleAbandonedError in debug.log and the offline run without files/config.yaml. A failed
        # run is closed too, so that a failed start can take its folder back (StableKeypointsCLI) without
        # W&B writing into it again.
        self._experiment.finish(exit_code=0 if succeeded else 1)
        self._experiment = None  # a later command in this process continues the run (resume="allow")
        # Not after a failure: the command's error is its last line (and a failed start removes its run).
        if self._offline and succeeded:
            why = f" ({self._offline_reason})" if self._offline_reason else ""
            rank_zero_info(f"W&B ran offline{why}. Upload this run with: wandb sync {run_dir}")

    def _write_run_files(self, folder: Path) -> None:
        """``config.yaml`` and ``wandb-summary.json`` in W&B's formats (``key: {value: ...}``; a JSON object)."""
        run = self._experiment
        config = {key: {"value": value} for key, value in run.config.as_dict().items()}
        text = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True)
        files.write_text(folder / "config.yaml", "wandb_version: 1\n\n" + text)
        summary = {key: run.summary[key] for key in run.summary.keys()}
        files.write_text(folder / "wandb-summary.json", json.dumps(summary, default=str) + "\n")


class _StartsOnUse:
    """``WandbLogger.experiment`` before the W&B run exists: the first use of any attribute starts the run."""

    def __init__(self, start) -> None:
        self._start = start

    def __getattr__(self, name: str):
        return getattr(self._start(), name)
