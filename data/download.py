"""A dataset archive, fetched once per machine and extracted so that a half dataset never appears.

pooch downloads the archive (to a temporary file renamed when complete) and checks its hash; this
module adds what pooch leaves to its caller: one process at a time (Lightning prepares data once per
node, and nodes may share a filesystem), extraction that refuses members leaving the folder, and a
dataset folder that appears whole or not at all.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pooch
import requests
from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.app import files
from lightning_modules.app.errors import DownloadError


def download_extracted(
    root: str | Path,
    url: str,
    md5: str,
    member: str,
    missing: Callable[[Path], list[Path]],
    page: str,
) -> Path:
    """Makes ``root`` the folder ``member`` of the tar archive at ``url``; nothing happens when ``root`` is complete.

    Args:
        root: the dataset's folder.
        url: the archive's address (http, https or ftp).
        md5: the archive's expected md5 (hex).
        member: the archive's top folder that becomes ``root``.
        missing: the files a complete dataset folder has and ``folder`` lacks.
        page: where a person can download it by hand (named in errors).
    """
    root = Path(root)
    made = [folder for folder in root.parents if not folder.exists()]  # innermost first
    files.make_folder(root.parent)
    # A lock beside root (flock: local disks, NFS, and Lustre mounted with -o flock) makes a second
    # process or node wait, then find the dataset complete, instead of fetching the same 1 GB again.
    lock_file = root.parent / f".{root.name}.lock"
    lock = FileLock(lock_file)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            rank_zero_info(f"Waiting for another process to finish downloading {root} (lock {lock_file}).")
            lock.acquire()
        try:
            return _download_unlocked(root, url, md5, member, missing, page)
        finally:
            lock.release()
    finally:
        lock_file.unlink(missing_ok=True)  # the dataset's folder holds the dataset, not our bookkeeping
        if not root.exists():  # a failed download leaves no folder it made (only when empty: never another's files)
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break


def _download_unlocked(root: Path, url: str, md5: str, member: str, missing: Callable[[Path], list[Path]], page: str) -> Path:
    if root.exists():
        absent = missing(root)
        if not absent:
            return root
        raise DownloadError(f"{root} exists but is incomplete (no {absent[0]}): delete it, then download again.")
    try:
        archive = Path(pooch.retrieve(url, known_hash=f"md5:{md5}", fname=f"{root.name}.tgz", path=root.parent,
                                      progressbar=True))
    except ValueError as error:  # pooch's hash check
        raise DownloadError(f"{url} downloaded with another md5 than {md5}: the file is damaged or not the expected "
                            f"archive; retry ({error}).") from error
    except (requests.RequestException, OSError) as error:
        raise DownloadError(f"Could not download {url} ({type(error).__name__}): check the connection, or download it "
                            f"by hand from {page} and extract it to {root}.") from error
    rank_zero_info(f"Extracting {archive} to {root}.")
    scratch = files.temporary_sibling(root)
    scratch.mkdir()
    try:
        _safe_extract(archive, scratch)
        extracted = scratch / member
        absent = missing(extracted)
        if absent:
            raise DownloadError(f"{url} is not the expected archive: it has no {member}/{absent[0].relative_to(extracted)}.")
        extracted.rename(root)  # the dataset appears whole, in one step
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    archive.unlink()  # kept until extraction succeeded, so a failed extraction costs no new download
    return root


def _safe_extract(archive: Path, destination: Path) -> None:
    """Extracts a tar archive into ``destination``, refusing members that would land outside it."""
    with tarfile.open(archive) as tar:
        try:
            # The "data" filter rejects absolute paths, "..", links leaving the folder and device files.
            tar.extractall(destination, filter="data")
        except tarfile.FilterError as error:
            raise DownloadError(f"{archive} holds an unsafe member ({error}); extraction stopped. Delete the archive and "
                                "download it again.") from error
