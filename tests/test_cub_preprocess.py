"""The gray-background preprocess: compositing, source safety, resuming, the CLI and its backends."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data.cub_files import read_bounding_boxes, read_images
from data.cub_preprocess import IN_PLACE_LEDGER, GrabCut, Rembg, composite_on_gray, main, preprocess
from data.demo import write_synthetic_cub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_cub(tmp_path_factory.mktemp("cub") / "CUB_200_2011")


@pytest.fixture(scope="module")
def clean_output(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run with the official-style masks."""
    output = tmp_path_factory.mktemp("clean") / "gray"
    summary = preprocess(root, output, "cub-masks")
    assert (summary.done, summary.skipped, summary.failed) == (36, 0, [])
    return output


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256(payload).hexdigest() for name, payload in _tree(folder).items()}


def test_composite_on_gray_is_exact_at_alpha_0_and_1() -> None:
    image = np.array([[[10, 200, 30], [250, 0, 5], [100, 100, 100]]], np.uint8)
    alpha = np.array([[1.0, 0.0, 0.5]], np.float32)
    assert composite_on_gray(image, alpha).tolist() == [[[10, 200, 30], [127, 127, 127], [114, 114, 114]]]


def test_outputs_are_gray_outside_the_mask_and_the_source_inside(root: Path, clean_output: Path) -> None:
    reference = clean_output.parent / "reference.txt"
    reference.touch()
    reference_mode = reference.stat().st_mode
    checked = 0
    for relative in read_images(root).values():
        source = np.asarray(Image.open(root / "images" / relative).convert("RGB"), np.float32)
        output = np.asarray(Image.open(clean_output / relative), np.float32)
        mask = Image.open(root / "segmentations" / Path(relative).with_suffix(".png"))
        # JPEG blocks (8 x 8) that straddle the silhouette ring: judge pixels a block away from it
        # (composite_on_gray itself is exact, see above).
        outside = np.asarray(mask.filter(ImageFilter.MaxFilter(17))) == 0
        inside = np.asarray(mask.filter(ImageFilter.MinFilter(5))) == 255
        assert output.shape == source.shape and outside.any()
        assert (clean_output / relative).stat().st_mode == reference_mode  # the umask's mode, not a temp file's 0600
        assert (output[outside] == 127).all()
        if inside.any():  # occluded birds may be too small to erode
            assert np.abs(output[inside] - source[inside]).mean() < 3
            checked += 1
    assert checked >= 24


def test_sources_untouched_and_second_run_skips_everything(root: Path, clean_output: Path) -> None:
    before = _digests(root)
    summary = preprocess(root, clean_output, "cub-masks")
    assert (summary.done, summary.skipped, summary.failed) == (0, 36, [])
    assert _digests(root) == before


def test_interrupted_run_resumes_to_the_same_tree(root: Path, clean_output: Path, tmp_path: Path) -> None:
    output = tmp_path / "gray"
    shutil.copytree(clean_output, output)
    # What a killed run leaves: some finished files (atomic renames) and a half-written temporary.
    finished = sorted(p for p in output.rglob("*.jpg"))
    for path in finished[::2]:
        path.unlink()
    (finished[1].parent / ".cub_preprocess-k1ll3d.tmp").write_bytes(b"\xff\xd8 half a jpeg")
    summary = preprocess(root, output, "cub-masks")
    assert (summary.done, summary.skipped) == (18, 18)
    assert _tree(output) == _tree(clean_output)


def test_cli_with_worker_processes_matches_in_process_run(root: Path, clean_output: Path, tmp_path: Path) -> None:
    before = _digests(root)
    output = tmp_path / "gray"
    command = [sys.executable, "-m", "data.cub_preprocess", "--root", str(root), "--output", str(output), "--workers", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "done 36, skipped 0" in result.stdout and "failed 0" in result.stdout
    assert _tree(output) == _tree(clean_output)
    assert _digests(root) == before


def test_in_place_refuses_without_confirmation(root: Path, capsys: pytest.CaptureFixture) -> None:
    before = _digests(root)
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(root), "--in-place"])
    assert exit_info.value.code == 2
    assert "--yes-overwrite-originals" in capsys.readouterr().err
    assert _digests(root) == before


def test_in_place_with_confirmation_resumes_from_its_ledger(root: Path, clean_output: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(root, tmp_path / "CUB_200_2011"))
    assert main(["--root", str(copy), "--in-place", "--yes-overwrite-originals", "--workers", "1"]) == 0
    assert _tree(copy / "images") == _tree(clean_output)
    assert len((copy / IN_PLACE_LEDGER).read_text().splitlines()) == 36
    # A second run must not composite the composited images again.
    assert preprocess(copy, None, "cub-masks", in_place=True).skipped == 36


def test_output_must_not_be_the_sources(root: Path) -> None:
    with pytest.raises(ValueError, match="source images folder"):
        preprocess(root, root / "images", "cub-masks")


def test_missing_masks_are_named(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        preprocess(root, tmp_path / "gray", "cub-masks", masks_dir=tmp_path / "elsewhere")
    copy = Path(shutil.copytree(root, tmp_path / "CUB_200_2011"))
    first = read_images(copy)[1]
    (copy / "segmentations" / Path(first).with_suffix(".png")).unlink()
    assert main(["--root", str(copy), "--output", str(tmp_path / "gray"), "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert "failed 1" in captured.out and Path(first).with_suffix(".png").name in captured.err
    shutil.rmtree(copy / "segmentations")
    with pytest.raises(SystemExit):
        main(["--root", str(copy), "--output", str(tmp_path / "gray2")])
    assert "segmentations" in capsys.readouterr().err


def test_grabcut_finds_the_bird(root: Path) -> None:
    pytest.importorskip("cv2")
    matting, boxes = GrabCut(), read_bounding_boxes(root)
    for image_id, relative in list(read_images(root).items())[:3]:
        image = Image.open(root / "images" / relative).convert("RGB")
        alpha = matting.alpha(image, relative, boxes[image_id]) > 0.5
        truth = np.asarray(Image.open(root / "segmentations" / Path(relative).with_suffix(".png"))) > 127
        assert (alpha & truth).sum() / (alpha | truth).sum() > 0.7


def test_missing_optional_dependencies_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ModuleNotFoundError, match="pip install opencv-python-headless"):
        GrabCut()
    monkeypatch.setitem(sys.modules, "rembg", None)
    with pytest.raises(ModuleNotFoundError, match="pip install rembg"):
        Rembg()


def test_rembg_model_that_cannot_be_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(model: str) -> None:
        raise ConnectionError(f"cannot reach the {model} weights")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(remove=None, new_session=offline))
    with pytest.raises(RuntimeError, match="isnet-general-use.*internet access"):
        Rembg()


@pytest.mark.parametrize("inside", [".", "images/001.Synthetic_Bird_1", "gray"])
def test_output_inside_the_dataset_folder_is_refused(root: Path, inside: str) -> None:
    from lightning_modules.app.errors import ConfigError

    before = _digests(root)
    with pytest.raises(ConfigError, match="--output .* (inside|source images folder).* e.g. .*CUB_200_2011_gray"):
        preprocess(root, root / inside, "cub-masks")
    assert _digests(root) == before


def test_empty_or_garbage_outputs_are_redone_not_skipped(root: Path, clean_output: Path, tmp_path: Path) -> None:
    output = tmp_path / "gray"
    shutil.copytree(clean_output, output)
    finished = sorted(output.rglob("*.jpg"))
    finished[0].write_bytes(b"")  # 0 bytes
    finished[1].write_bytes(b"not an image at all")
    finished[2].write_bytes(finished[2].read_bytes()[:500])  # a truncated JPEG
    Image.new("RGB", (7, 5), (1, 2, 3)).save(finished[3])  # decodes, but is not this source's composite
    summary = preprocess(root, output, "cub-masks")
    assert (summary.done, summary.skipped, summary.failed) == (4, 32, [])
    assert _tree(output) == _tree(clean_output)


_PARENT = """
import sys, os, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from data.cub_preprocess import Job, _init_worker, _process

fifo = Path(sys.argv[1])
pool = ProcessPoolExecutor(2, initializer=_init_worker, initargs=("cub-masks", fifo.parent))
# One worker blocks reading a FIFO nobody writes (a job in progress); the other sits idle.
pool.submit(_process, Job(fifo, fifo.parent / "out.jpg", "out.jpg", (0, 0, 1, 1), check_existing=False))
pool.submit(time.sleep, 0.1).result()
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(600)
"""


def test_worker_processes_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    import os
    import signal
    import time

    fifo = tmp_path / "never_written.jpg"
    os.mkfifo(fifo)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(fifo)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = set(workers)
        while alive and time.monotonic() < deadline:
            for pid in list(alive):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    alive.discard(pid)
            time.sleep(0.1)
        assert not alive, f"workers {sorted(alive)} outlived their killed parent"
    finally:
        parent.kill()
