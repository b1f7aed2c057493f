"""The project's error types for mistakes a user can fix (a value, a file, a checkpoint, the network).

``run.py`` prints only the message of a ``UserError`` and exits with status 2 (the full traceback
with ``STABLE_KEYPOINTS_TRACEBACK=1``); any other exception is a bug and keeps its traceback. Each
subclass is also the builtin it refines, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting has a value that cannot work (named in the message, with the accepted range)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed to does not exist or is incomplete."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit the configured model (another family, width or token count)."""


class HubError(UserError, OSError):
    """Weights could not be loaded from the hub (offline, no such repository, or access denied)."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss, gradient or context (the message names the step)."""


class DownloadError(UserError, OSError):
    """A dataset could not be fetched or extracted (no network, a damaged archive, an incomplete folder)."""
