"""Composite every CUB bird on uniform gray (127, 127, 127) into a mirrored image tree.

zero123plus was trained on object renders over gray, so Stable123Keypoints removed CUB's
backgrounds first. Unlike the reference (which overwrote the original JPEGs), this writes a new tree
with the same relative paths as ``images/``, read back through ``CUBDataModule(images_dir=...)``::

    python -m data.cub_preprocess --root data/CUB_200_2011 --output data/CUB_200_2011_gray [--backend cub-masks|rembg|grabcut] [--workers N]

- Sources are never modified (``--in-place`` exists but refuses without ``--yes-overwrite-originals``).
- Outputs must lie outside ``--root`` (the dataset's own tree is never written).
- Resumable: finished outputs (decoded to the end, the source's size) are skipped, anything else
  is redone; each file is written to a temporary file in its folder and renamed, so a killed run
  leaves only complete files (and stray temporaries, removed by the next run). Run one process per
  output tree at a time. Worker processes exit when the main process dies.
- Backends: ``cub-masks`` uses CUB's official segmentation PNGs (a separate archive; soft 0-255,
  used as alpha; no model). ``rembg`` is the reference's choice (model ``isnet-general-use``,
  downloaded by rembg on first use). ``grabcut`` is an offline fallback with no weights: OpenCV
  GrabCut seeded with the CUB bounding box (mediocre quality).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.cub_files import CUB_PAGE, read_bounding_boxes, read_images
from lightning_modules.app import files
from lightning_modules.app.errors import ConfigError, UserError, run_for_user

GRAY_RGB = (127, 127, 127)
BACKENDS = ("cub-masks", "rembg", "grabcut")
REMBG_MODEL = "isnet-general-use"
GRABCUT_ITERATIONS = 5
# High quality and no chroma subsampling keep the bird's edge against the gray crisp.
JPEG_QUALITY = 95
#: Lists the sources already overwritten by ``--in-place`` (the only way to resume that mode).
IN_PLACE_LEDGER = "images_composited_in_place.txt"
#: What a worker returns for an output that was already complete.
SKIPPED = "skipped"
_MAX_FAILURES_SHOWN = 20
_MASKS_HINT = (
    f"download the segmentations archive from the CUB-200-2011 page ({CUB_PAGE}), "
    "extract it inside or beside the CUB_200_2011/ folder, or pass --masks <dir>."
)


def composite_on_gray(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` (H, W, 3) uint8 over ``GRAY_RGB`` with ``alpha`` (H, W) in [0, 1].

    Where alpha is 1 the source pixel is kept exactly, where it is 0 the pixel is exactly gray.
    """
    weight = alpha.astype(np.float32)[..., None]
    blended = weight * image.astype(np.float32) + (1 - weight) * np.asarray(GRAY_RGB, dtype=np.float32)
    return np.rint(blended).astype(np.uint8)


class Matting(Protocol):
    def alpha(self, image: Image.Image, relative_path: str, box_xywh: tuple[float, float, float, float]) -> np.ndarray:
        """(H, W) float32 in [0, 1]: how much of each pixel of ``image`` (RGB) is bird."""


class CubMasks:
    """CUB's official segmentations: ``masks_dir/NNN.Class/<name>.png`` beside each image."""

    def __init__(self, masks_dir: Path) -> None:
        if not masks_dir.is_dir():
            raise FileNotFoundError(f"CUB segmentation folder {str(masks_dir)!r} does not exist: {_MASKS_HINT}")
        self.masks_dir = masks_dir

    def alpha(self, image: Image.Image, relative_path: str, box_xywh: tuple[float, float, float, float]) -> np.ndarray:
        path = self.masks_dir / Path(relative_path).with_suffix(".png")
        if not path.is_file():
            raise FileNotFoundError(f"no segmentation mask {str(path)!r} for image {relative_path!r}.")
        with Image.open(path) as mask:
            if mask.size != image.size:
                raise ValueError(f"mask {str(path)!r} is {mask.size[0]}x{mask.size[1]} but its image is {image.size[0]}x{image.size[1]}.")
            return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


class Rembg:
    """rembg's salient-object model (``isnet-general-use``, as the reference used)."""

    def __init__(self, model: str = REMBG_MODEL) -> None:
        try:
            import rembg
        except ImportError as error:
            raise ModuleNotFoundError(
                f"--backend rembg needs `pip install rembg` (it downloads its {model!r} model on first use); "
                "--backend cub-masks or grabcut need no model."
            ) from error
        self._remove = rembg.remove
        try:
            self.session = rembg.new_session(model)
        except Exception as error:  # network and file errors of several libraries
            raise RuntimeError(
                f"rembg could not load its {model!r} model ({type(error).__name__}: {error}). It is downloaded once on "
                "first use (to ~/.u2net, or $U2NET_HOME): run once with internet access, or use --backend cub-masks or grabcut."
            ) from error

    def alpha(self, image: Image.Image, relative_path: str, box_xywh: tuple[float, float, float, float]) -> np.ndarray:
        mask = self._remove(image, session=self.session, only_mask=True)
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


class GrabCut:
    """OpenCV GrabCut initialised with the CUB bounding box; hard 0/1 alpha."""

    def __init__(self, iterations: int = GRABCUT_ITERATIONS) -> None:
        try:
            import cv2
        except ImportError as error:
            raise ModuleNotFoundError("--backend grabcut needs OpenCV: `pip install opencv-python-headless`.") from error
        self._cv2 = cv2
        self.iterations = iterations

    def alpha(self, image: Image.Image, relative_path: str, box_xywh: tuple[float, float, float, float]) -> np.ndarray:
        cv2 = self._cv2
        width, height = image.size
        x, y, w, h = box_xywh
        # GrabCut learns the background from outside the rectangle: keep a 1-pixel border outside it.
        x0, y0 = min(max(math.floor(x), 1), width - 2), min(max(math.floor(y), 1), height - 2)
        x1, y1 = max(min(math.ceil(x + w), width - 1), x0 + 1), max(min(math.ceil(y + h), height - 1), y0 + 1)
        labels = np.zeros((height, width), np.uint8)
        background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        # Its k-means initialisation draws from OpenCV's global RNG: reseed so that a file's result does
        # not depend on which files the worker processed before (resumed runs match clean ones).
        cv2.setRNGSeed(0)
        bgr = np.ascontiguousarray(np.asarray(image)[..., ::-1])
        cv2.grabCut(bgr, labels, (x0, y0, x1 - x0, y1 - y0), background, foreground, self.iterations, cv2.GC_INIT_WITH_RECT)
        return np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)


def find_masks_dir(root: Path) -> Path:
    """CUB's ``segmentations/`` folder: inside ``root`` or beside it (where its archive extracts)."""
    candidates = (root / "segmentations", root.parent / "segmentations")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"No CUB segmentation folder at {' or '.join(repr(str(c)) for c in candidates)}: {_MASKS_HINT}")


def make_matting(backend: str, masks_dir: Path | None) -> Matting:
    """The matting backend named ``backend`` (one of ``BACKENDS``)."""
    if backend == "cub-masks":
        return CubMasks(masks_dir)
    if backend == "rembg":
        return Rembg()
    if backend == "grabcut":
        return GrabCut()
    raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}.")


@dataclass(frozen=True)
class Job:
    """One image: read ``source``, write ``target``."""

    source: Path
    target: Path
    relative_path: str
    box_xywh: tuple[float, float, float, float]
    #: Skip the job when ``target`` already holds a complete image (a resumed run).
    check_existing: bool = True


@dataclass
class Summary:
    """What a run did; ``failed`` holds ``(relative path, reason)``."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


# Each worker process builds its own backend once (an ONNX session does not survive pickling).
_matting: Matting | None = None


def _init_worker(backend: str, masks_dir: Path | None) -> None:
    global _matting
    _exit_with_parent()
    _matting = make_matting(backend, masks_dir)


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """Ends this worker process as soon as its parent is gone (killed, crashed).

    A ProcessPoolExecutor's workers otherwise wait on their task queue forever after a SIGKILL of
    the main process. The parent is the main process (fork, spawn) or the forkserver, which exits
    with the main process; either way the worker is reparented, which ``getppid`` shows at once,
    zombie or not. (Linux's PR_SET_PDEATHSIG does the same but exists nowhere else.)
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def is_complete(target: Path, source: Path) -> bool:
    """``target`` exists, decodes to the end and has the size of ``source``: a finished output.

    A file with a target's name can be empty or garbage (another tool, a full disk before this
    script wrote atomically): it must be redone, not skipped, or training dies on it later.
    """
    if not target.is_file():
        return False
    try:
        with Image.open(target) as image:
            image.load()
            size = image.size
        with Image.open(source) as original:
            return size == original.size
    except (OSError, SyntaxError, ValueError):  # what PIL raises for unreadable or truncated files
        return False


def _process(job: Job) -> str | None:
    """Composite one image; the failure reason, ``SKIPPED`` for a finished output, or None on success."""
    try:
        if job.check_existing and is_complete(job.target, job.source):
            return SKIPPED
        with Image.open(job.source) as source:
            image = source.convert("RGB")
        alpha = _matting.alpha(image, job.relative_path, job.box_xywh)
        _save_atomic(Image.fromarray(composite_on_gray(np.asarray(image), alpha)), job.target)
    except Exception as error:  # one bad file must not stop a run over 11,788
        return f"{type(error).__name__}: {error}"
    return None


def _save_atomic(image: Image.Image, target: Path) -> None:
    """Write ``image`` to a temporary file beside ``target``, then rename it over ``target``."""
    image_format = Image.registered_extensions()[target.suffix.lower()]
    options = {"quality": JPEG_QUALITY, "subsampling": 0} if image_format == "JPEG" else {}
    with files.atomic_file(target) as temporary:
        image.save(temporary, format=image_format, **options)


def _refuse_output_inside_sources(root: Path, output: Path) -> None:
    """Raises ``ConfigError`` when ``output`` is ``root`` or lies inside it (the dataset's own tree)."""
    root_resolved, output_resolved = root.resolve(), output.resolve()
    images = (root / "images").resolve()
    if output_resolved == images or images in output_resolved.parents:
        raise ConfigError(
            f"--output {output} is the source images folder or inside it: choose a new folder, e.g. "
            f"{root.parent / (root.name + '_gray')} (sources are never overwritten without --in-place)."
        )
    if output_resolved == root_resolved or root_resolved in output_resolved.parents:
        raise ConfigError(
            f"--output {output} lies inside the dataset folder {root}: the mirrored tree would mix with the "
            f"sources. Choose a folder outside it, e.g. {root.parent / (root.name + '_gray')}."
        )


def preprocess(
    root: str | Path,
    output: str | Path | None,
    backend: str = "cub-masks",
    masks_dir: str | Path | None = None,
    workers: int = 1,
    in_place: bool = False,
) -> Summary:
    """Composite the images of ``root/images.txt`` on gray into ``output`` (same relative paths).

    Args:
        root: the ``CUB_200_2011/`` folder.
        output: folder of the mirrored tree; must be None with ``in_place``.
        backend: one of ``BACKENDS``.
        masks_dir: CUB's ``segmentations/`` folder for ``cub-masks``; default: found by ``find_masks_dir``.
        workers: processes; 1 runs in this process.
        in_place: overwrite ``root/images`` (the caller must have asked the user for confirmation).
    """
    root = Path(root)
    images, boxes = read_images(root), read_bounding_boxes(root)
    if in_place == (output is not None):
        raise ValueError("Give exactly one of an output folder or in_place.")
    output = root / "images" if in_place else Path(output)
    if not in_place:
        _refuse_output_inside_sources(root, output)
    if backend == "cub-masks":
        masks_dir = find_masks_dir(root) if masks_dir is None else Path(masks_dir)
    matting = make_matting(backend, masks_dir)  # fails here, before any work, on a missing dependency

    files.make_folder(output)
    for stray in output.rglob(f"{files.TEMPORARY_PREFIX}*{files.TEMPORARY_SUFFIX}"):  # left by a killed run
        stray.unlink()
    ledger = root / IN_PLACE_LEDGER
    finished = set(ledger.read_text().splitlines()) if in_place and ledger.is_file() else set()
    summary = Summary()
    pending = []
    for image_id, relative in images.items():
        job = Job(root / "images" / relative, output / relative, relative, boxes[image_id], check_existing=not in_place)
        if in_place and relative in finished:
            summary.skipped += 1
        else:
            pending.append(job)

    def record(job: Job, reason: str | None) -> None:
        if reason == SKIPPED:
            summary.skipped += 1
            return
        if reason is not None:
            summary.failed.append((job.relative_path, reason))
            return
        summary.done += 1
        if in_place:
            with ledger.open("a") as file:
                file.write(job.relative_path + "\n")

    with tqdm(total=len(pending), desc=f"Compositing on gray ({backend})", unit="image") as bar:
        if workers <= 1:
            global _matting
            _matting = matting
            for job in pending:
                record(job, _process(job))
                bar.update()
        else:
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(backend, masks_dir)) as pool:
                futures = {pool.submit(_process, job): job for job in pending}
                for future in as_completed(futures):
                    record(futures[future], future.result())
                    bar.update()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 when some images failed; a mistake is one ``error:`` line
    and exit status 2, ``lightning_modules.app.errors.run_for_user``)."""
    return run_for_user(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.cub_preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="the CUB_200_2011/ folder (holding images.txt and images/)")
    parser.add_argument("--output", type=Path, help="new folder for the mirrored gray-background tree")
    parser.add_argument("--backend", choices=BACKENDS, default="cub-masks", help="matting method (default: cub-masks)")
    parser.add_argument("--masks", type=Path, help="CUB segmentations/ folder (cub-masks; default: inside or beside --root)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes (default: min(4, CPUs))")
    parser.add_argument("--in-place", action="store_true", help="overwrite the original images (needs --yes-overwrite-originals)")
    parser.add_argument("--yes-overwrite-originals", action="store_true", help="confirm --in-place")
    args = parser.parse_args(argv)
    if args.in_place and not args.yes_overwrite_originals:
        parser.error("--in-place overwrites the original CUB images and cannot be undone; add --yes-overwrite-originals to confirm, or use --output <dir>.")
    if args.in_place == (args.output is not None):
        parser.error("give --output <dir> (recommended) or --in-place, not both and not neither.")
    try:
        summary = preprocess(args.root, args.output, args.backend, args.masks, args.workers, args.in_place)
    except (FileNotFoundError, ModuleNotFoundError, RuntimeError, ValueError) as error:
        # The preprocessing's own refusals (a missing mask folder or package, a mask of another size): the
        # user's to fix, printed by run_for_user as one line (the traceback with STABLE_KEYPOINTS_TRACEBACK=1).
        if isinstance(error, UserError):
            raise
        raise ConfigError(str(error)) from error
    for relative, reason in summary.failed[:_MAX_FAILURES_SHOWN]:
        print(f"failed: {relative}: {reason}", file=sys.stderr)
    if len(summary.failed) > _MAX_FAILURES_SHOWN:
        print(f"... and {len(summary.failed) - _MAX_FAILURES_SHOWN} more failures", file=sys.stderr)
    destination = args.root / "images" if args.in_place else args.output
    print(f"done {summary.done}, skipped {summary.skipped} (already finished), failed {len(summary.failed)} -> {destination}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
