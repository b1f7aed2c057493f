"""Weights & Biases logging that never prompts or hangs: offline when there is no login or network."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


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
    """Lightning's WandbLogger, offline by itself when W&B cannot be reached.

    Args:
        offline: ``None`` (default) decides at start: online when there is a login and the server
            answers, else offline into ``save_dir``, to upload later with ``wandb sync``.
        Other arguments: as ``lightning.pytorch.loggers.WandbLogger``.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "outputs",
        project: str = "stable-keypoints",
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs,
    ) -> None:
        reason = ""
        if offline is None:
            online, reason = wandb_can_go_online()
            offline = not online
        if offline:
            # Also stops wandb from asking for an API key on an interactive terminal.
            os.environ.setdefault("WANDB_MODE", "offline")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, log_model=log_model, **kwargs)
        self._offline_reason = reason

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._offline and self._experiment is not None:
            run_dir = Path(self._experiment.dir).parent
            why = f" ({self._offline_reason})" if self._offline_reason else ""
            rank_zero_info(f"W&B ran offline{why}. Upload this run with: wandb sync {run_dir}")
