"""The project's error types for mistakes a user can fix, and the one boundary every command runs behind.

A mistake a user can fix (a value, a file, a checkpoint, the network, a full or read-only disk) is a
``UserError``; ``run_for_user`` (the boundary of ``run.py``, ``python -m lightning_modules.detector``,
``python -m data.cub_preprocess`` and ``python -m benchmarks.paper_table``) prints it as one line
``error: <message>`` and exits with status 2; ``STABLE_KEYPOINTS_TRACEBACK=1`` shows the traceback
instead. Any other exception is a bug and keeps its traceback. Each subclass is also the builtin it
refines, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import TypeVar

#: Set to 1 to see the full traceback of a user error.
TRACEBACK_VARIABLE = "STABLE_KEYPOINTS_TRACEBACK"

T = TypeVar("T")


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting has a value that cannot work (named in the message, with the accepted range)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed to does not exist or is incomplete."""


class DamagedFileError(UserError, ValueError):
    """A file the user gave cannot be read as what it should be (truncated, corrupt, another format)."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit the configured model (another family, width or token count)."""


class HubError(UserError, OSError):
    """Weights could not be loaded from the hub (offline, no such repository, or access denied)."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss, gradient or context (the message names the step)."""


class DownloadError(UserError, OSError):
    """A dataset could not be fetched or extracted (no network, a damaged archive, an incomplete folder)."""


class OutputError(UserError, OSError):
    """A file or folder could not be written (a full or read-only disk, no permission); the message names it.

    ``errno`` and ``filename`` are those of the OS error; the text is the message alone.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


#: OS errors that say something about the disk or the permissions a user gave, never about the code.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def output_error(error: OSError, path: str | os.PathLike) -> OutputError:
    """``error`` (raised writing ``path``) as an ``OutputError`` naming ``path`` and what to do."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space, or write to a folder on another disk"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        reason = "a file is in the way of a folder"
        fix = "give a path whose folders are folders, not files"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "write to a folder you can write to (a writable disk, your own folder)"
    else:
        fix = "check the path, or write to another folder"
    made = OutputError(f"cannot write {os.fspath(path)} ({reason}): {fix}.")
    made.errno, made.strerror, made.filename = error.errno, error.strerror, os.fspath(path)
    return made


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error``, its ``__cause__``, that one's cause, ... (each once)."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__
    return chain


def as_user_error(error: BaseException) -> BaseException | None:
    """The user's mistake ``error`` reports, or None when it is a bug.

    Libraries wrap the errors of the code they call: jsonargparse raises a ``ValueError`` whose
    ``__cause__`` is the ``ConfigError`` a class's ``__init__`` raised, so the chain of causes is
    searched. An OS error about the disk or permissions (``ENVIRONMENT_ERRNOS``) and Lightning's
    ``MisconfigurationException`` are the user's too.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    for cause in cause_chain(error):
        if isinstance(cause, UserError):
            return cause
        if isinstance(cause, OSError) and cause.errno in ENVIRONMENT_ERRNOS:
            return output_error(cause, cause.filename) if cause.filename else cause
        if isinstance(cause, MisconfigurationException):
            return cause
    return None


def unwrap_user_error(error: Exception) -> Exception:
    """What building the configured classes raised, as the user's mistake it reports.

    jsonargparse raises its own ``ValueError`` ("Does not validate against any of the Union subtypes",
    75 lines with the config) with the error of the class's ``__init__`` as its cause: that error,
    when it is a ``UserError``; a ``ValueError`` an ``__init__`` raised about its arguments (a
    library's class, a callback) becomes a ``ConfigError`` with its message; anything else is returned as it is.
    """
    causes = cause_chain(error)
    for cause in causes:
        if isinstance(cause, UserError):
            return cause
    innermost = causes[-1]
    if innermost is not error and type(innermost) is ValueError:
        return ConfigError(str(innermost))
    return error


def run_for_user(main: Callable[[], T]) -> T:
    """``main()`` for a person at a terminal: a user's mistake is one line ``error: ...`` and exit status 2.

    Any other exception is a bug and keeps its traceback (so does a user error with
    ``STABLE_KEYPOINTS_TRACEBACK=1``).
    """
    try:
        return main()
    except Exception as error:
        user = as_user_error(error)
        if user is None or os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        sys.stdout.flush()
        print(f"error: {user}", file=sys.stderr)
        sys.exit(2)
