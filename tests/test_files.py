"""The one way the project writes files and folders: atomically, with the mode the user's umask gives."""

from __future__ import annotations

import os
import stat

import pytest
from safetensors.torch import save_file

import torch

from lightning_modules.app import files


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_the_umask_gives(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        files.write_text(tmp_path / "a.json", "{}")
        with files.atomic_file(tmp_path / "b.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))  # a writer that picks its own mode
        with files.atomic_folder(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~mask


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    files.write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_failed_folder_leaves_nothing_and_a_folder_made_meanwhile_is_kept(tmp_path):
    target = tmp_path / "models" / "tiny"
    with pytest.raises(ValueError):
        with files.atomic_folder(target) as tmp:
            (tmp / "unet").mkdir()
            raise ValueError("killed")
    assert list(target.parent.iterdir()) == []
    with files.atomic_folder(target) as tmp:
        (tmp / "mine").write_text("1")
        target.mkdir()  # another process finished first
        (target / "theirs").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]


def test_sweep_removes_only_temporaries(tmp_path):
    (tmp_path / "keep.json").write_text("1")
    (tmp_path / ".keep.json.0123abcd.tmp").write_text("stray")
    (tmp_path / ".model.0123abcd.tmp").mkdir()
    files.sweep_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
