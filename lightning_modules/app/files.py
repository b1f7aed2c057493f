"""Writing files and folders so that a kill, a full disk or a concurrent reader never sees half of one.

Everything the project writes goes through here: a temporary sibling (same folder, so the rename
stays on one filesystem) is written completely, flushed to disk, then renamed onto the target
(``os.replace``: atomic on POSIX and Windows). On any failure the temporary is removed and a
previous file at the target is left untouched. Files and folders get the mode the user's umask
gives a new file (``tempfile``'s 0600/0700 would outlive the rename and hide results from
lab-mates on a shared machine).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_modules.app.errors import ENVIRONMENT_ERRNOS, UserError, output_error

#: Prefix and suffix of every temporary this module makes (a killed run's leftovers can be swept).
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".", ".tmp"


def umask() -> int:
    """The process's file-creation mask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_sibling(target: Path) -> Path:
    """A fresh name beside ``target`` for its temporary: ``.<name>.<random>.tmp``."""
    return target.with_name(f"{TEMPORARY_PREFIX}{target.name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}")


def sweep_temporaries(folder: Path, name: str = "*") -> None:
    """Removes the temporaries a killed writer left in ``folder`` (for targets matching ``name``)."""
    for stray in folder.glob(f"{TEMPORARY_PREFIX}{name}.*{TEMPORARY_SUFFIX}"):
        if stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)


def make_folder(folder: str | os.PathLike) -> Path:
    """Creates ``folder`` and its parents (the umask applies) -> ``folder``; an ``OutputError`` names it when
    it cannot be made (a file in the way, a read-only disk, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, folder) from error
    return folder


def _about_writing(error: BaseException, tmp: Path) -> bool:
    """An error of a writer that says the temporary could not be written (not, say, that a source is missing)."""
    return (isinstance(error, OSError) and not isinstance(error, UserError)
            and (error.errno in ENVIRONMENT_ERRNOS or error.filename in (None, str(tmp))))


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write ``target``'s content to; renamed onto ``target`` when the block ends.

    For writers that take a path (``safetensors.torch.save_file``, ``PIL.Image.save``, ``torch.save``).
    An OS error while writing (a full or read-only disk) is an ``OutputError`` naming ``target``.
    """
    target = Path(target)
    make_folder(target.parent)
    tmp = temporary_sibling(target)
    try:
        yield tmp
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _about_writing(error, tmp):
            raise output_error(error, target) from error
        raise
    _fsync_folder(target.parent)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``target`` atomically -> ``target``."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``target`` atomically -> ``target``."""
    return write_bytes(target, text.encode("utf-8"))


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder to fill; renamed to ``target`` when the block ends.

    If another process created ``target`` meanwhile (a second rank or node writing the same demo
    files), its copy is kept and this one dropped: both were written from the same recipe.
    """
    target = Path(target)
    make_folder(target.parent)
    tmp = temporary_sibling(target)
    try:
        tmp.mkdir(mode=0o777)  # the umask applies, as to any folder the user makes
    except OSError as error:
        raise output_error(error, target) from error
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Makes a rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
