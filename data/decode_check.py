"""Decode-check a split's image files before anything expensive runs, remembering what was checked.

A truncated or corrupt image would otherwise stop a run mid-training, after the weights loaded, with
a PIL message that names no file. ``find_unreadable`` decodes every file once (threads: PIL's
decoders release the GIL), shows a progress bar, and stores each result under the file's
(path, size, mtime) in a small JSON cache, so the next run over the same files checks nothing.

The cache lives in ``$XDG_CACHE_HOME/stable_keypoints`` (default ``~/.cache/stable_keypoints``),
never inside the dataset (which may be read-only or shared); one file per dataset folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from tqdm import tqdm

from data import images
from lightning_modules.app import files
from lightning_modules.app.seeding import stable_hash

#: Bumped when what counts as readable changes, so older verdicts are not reused.
CACHE_VERSION = 1
_MAX_THREADS = 8


def cache_dir() -> Path:
    """Folder of the check caches: ``$XDG_CACHE_HOME/stable_keypoints`` or ``~/.cache/stable_keypoints``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stable_keypoints"


def _cache_file(files: Sequence[Path]) -> Path:
    root = os.path.commonpath([str(f.resolve().parent) for f in files])
    return cache_dir() / f"decode_check_{stable_hash(root):08x}.json"


def _stamp(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _load_cache(path: Path) -> dict[str, list]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content.get("files", {}) if content.get("version") == CACHE_VERSION else {}


def _save_cache(path: Path, entries: dict[str, list]) -> None:
    """Atomic write (another rank or run may read it meanwhile); a read-only cache only warns."""
    try:
        files.write_text(path, json.dumps({"version": CACHE_VERSION, "files": entries}))
    except OSError as error:
        rank_zero_warn(f"Could not write the image-check cache {path} ({error}); the next run checks again.")


def find_unreadable(files: Sequence[str | Path], description: str = "Checking images") -> list[tuple[Path, str]]:
    """files -> [(path, reason)] of those ``data.images.read_image`` cannot decode, in input order.

    Results are cached by (path, size, mtime); only new or changed files are decoded.
    """
    files = [Path(f) for f in files]
    if not files:
        return []
    cache_path = _cache_file(files)
    entries = _load_cache(cache_path)
    keys = [str(f.resolve()) for f in files]
    stamps = [_stamp(f) for f in files]
    verdicts: dict[str, str | None] = {}
    todo = []
    for file, key, stamp in zip(files, keys, stamps):
        cached = entries.get(key)
        if stamp is None:
            verdicts[key] = "the file does not exist"
        elif cached is not None and cached[:2] == stamp:
            verdicts[key] = cached[2]
        else:
            todo.append((file, key, stamp))
    if todo:
        threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(todo)))
        with ThreadPoolExecutor(threads) as pool:
            results = pool.map(lambda job: images.decode_error(job[0]), todo)
            bar = tqdm(results, total=len(todo), desc=description, unit="img", disable=rank_zero_only.rank != 0)
            # The bar first: tqdm counts an item when the next one is asked for, so it reaches its
            # total only when zip asks it once more (with todo first, zip stops one short: 59/60).
            for reason, (_, key, stamp) in zip(bar, todo):
                verdicts[key] = reason
                entries[key] = [*stamp, reason]
        _save_cache(cache_path, entries)
    return [(file, verdicts[key]) for file, key in zip(files, keys) if verdicts[key] is not None]
