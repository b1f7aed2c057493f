"""Where a family's weights come from: a local diffusers folder or a hub id, with errors a user can act on.

diffusers' own message for a hub id with no network comes after about 25 s of retries and names a
file ("does not appear to have a file named scheduler_config.json"). Here the first contact is one
small file (the denoiser's ``unet/config.json``, or SD 3's ``transformer/config.json``) located with
huggingface_hub, so that "offline", "no network" and "no such repository / revision / file" are told
apart, named with what the user typed, before any weight loads.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from lightning_modules.app.errors import HubError, MissingFileError

#: Seconds one reachability request may take (huggingface_hub retries a failed request for ~25 s).
PROBE_TIMEOUT_S = 5.0


def hub_reachable() -> bool:
    """One request to the hub endpoint, without retries: is there a network path to it?"""
    try:
        huggingface_hub.get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception:  # any transport failure: the HTTP client's error types differ between hub versions
        return False
    return True


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id, ``owner/name`` (as opposed to a filesystem path).

    huggingface_hub's own validation, plus the owner: a bare ``name`` is a legacy form no diffusion
    model or detector uses, and is far more often a mistyped local file.
    """
    if "/" not in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


class ModelSource:
    """A model given as ``pretrained_model_name_or_path``: checks it once, then loads its components.

    Args:
        name: what the user typed: a local diffusers folder or a hub id.
        revision: hub revision; local_files_only: never touch the network.
        denoiser: the subfolder of the family's denoiser (``unet``, or ``transformer`` for SD 3), whose
            ``config.json`` is the first file looked up on the hub.
    """

    def __init__(self, name: str, revision: str | None = None, local_files_only: bool = False,
                 denoiser: str = "unet") -> None:
        self.name, self.revision, self.local_files_only = name, revision, local_files_only
        self.denoiser = denoiser
        self.probe_file = f"{denoiser}/config.json"  # the file every model folder of the family has
        self._checked = False

    @property
    def where(self) -> str:
        return f"pretrained_model_name_or_path={self.name!r}"

    @property
    def is_local(self) -> bool:
        return Path(self.name).expanduser().is_dir()

    def check(self) -> None:
        """Raises MissingFileError or HubError unless the model can be read; contacts the hub at most once."""
        if self._checked:
            return
        if self.is_local:
            pass
        elif not is_hub_id(self.name):
            raise MissingFileError(f"{self.where}: no such folder (and it is not a hub id of the form owner/name). "
                                   "Check the path, or give a hub id.")
        else:
            self._locate_on_hub()
        self._checked = True

    def _offline_reason(self) -> str | None:
        if self.local_files_only:
            return "local_files_only: true"
        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE=1"
        return None

    def _locate_on_hub(self) -> None:
        no_folder = f"(There is no local folder {self.name!r} either.)"
        offline = self._offline_reason()
        if offline is not None:
            try:
                hf_hub_download(self.name, self.probe_file, revision=self.revision, local_files_only=True)
            except LocalEntryNotFoundError as error:
                raise HubError(
                    f"{self.where} is not in the local hub cache and the hub is off ({offline}): run once with a "
                    f"network to cache it, or point pretrained_model_name_or_path to a local diffusers folder. {no_folder}"
                ) from error
            return
        if not hub_reachable():
            cached = isinstance(try_to_load_from_cache(self.name, self.probe_file, revision=self.revision), str)
            fix = ("It is in your local hub cache: set HF_HUB_OFFLINE=1 to use the cached copy." if cached else
                   "It is not cached: connect, or download it where there is a network and point "
                   "pretrained_model_name_or_path to that local folder.")
            raise HubError(f"{self.where}: cannot reach {constants.ENDPOINT} (no network, or a proxy problem). {fix} {no_folder}")
        try:
            hf_hub_download(self.name, self.probe_file, revision=self.revision)
        except GatedRepoError as error:
            raise HubError(f"{self.where} is gated: accept its license at {constants.ENDPOINT}/{self.name} and log in "
                           "with `hf auth login`.") from error
        except RepositoryNotFoundError as error:
            raise HubError(f"{self.where}: no such repository on {constants.ENDPOINT} (or it is private: log in with "
                           f"`hf auth login`). Check the spelling, or give a local folder. {no_folder}") from error
        except RevisionNotFoundError as error:
            raise HubError(f"{self.where}: revision={self.revision!r} does not exist in that repository.") from error
        except LocalEntryNotFoundError as error:
            raise HubError(f"{self.where}: the connection to {constants.ENDPOINT} failed while reading {self.probe_file}; "
                           "retry, or set HF_HUB_OFFLINE=1 to use a cached copy.") from error
        except EntryNotFoundError as error:
            raise HubError(f"{self.where} has no {self.probe_file}: it is not a model in diffusers layout "
                           f"({self.denoiser}/, vae/, scheduler/ subfolders).") from error

    def _check_subfolder(self, subfolder: str) -> None:
        if self.is_local and not (Path(self.name).expanduser() / subfolder).is_dir():
            raise MissingFileError(f"{self.where} has no {subfolder}/ folder: a model folder in diffusers layout "
                                   f"has {self.denoiser}/, vae/ and scheduler/ (and what its family adds, here {subfolder}/).")

    def from_pretrained(self, cls: type, subfolder: str, **kwargs):
        """``cls.from_pretrained`` of one component (``subfolder``), with this source's revision and errors."""
        self.check()
        self._check_subfolder(subfolder)
        try:
            return cls.from_pretrained(self.name, subfolder=subfolder, revision=self.revision,
                                       local_files_only=self.local_files_only, **kwargs)
        except OSError as error:
            raise self._error(f"Cannot load {subfolder}/ of {self.where} ({type(error).__name__}: {error})") from error

    def load_config(self, cls: type, subfolder: str) -> dict:
        """The ``config.json`` of one component, read without its weights."""
        self.check()
        self._check_subfolder(subfolder)
        try:
            return cls.load_config(self.name, subfolder=subfolder, revision=self.revision,
                                   local_files_only=self.local_files_only)
        except OSError as error:
            raise self._error(f"Cannot read {subfolder}/config.json of {self.where} ({type(error).__name__}: {error})") from error

    def _error(self, message: str) -> Exception:
        return MissingFileError(message) if self.is_local else HubError(message)
