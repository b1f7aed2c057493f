"""A tiny synthetic CUB-200-2011, written in the official on-disk layout.

It lets the whole pipeline (``data.cub``, ``data.cub_preprocess``, training and testing) run with no
download: demos, CI and tests. Each image is a drawn bird (body, head, beak, tail, wings, legs, eye)
on a textured background; the 15 part locations are where the drawing puts them, and the
segmentation mask is the drawn silhouette, soft at the edges like CUB's official masks.

Layout written under ``root`` (the ``CUB_200_2011/`` folder)::

    images/NNN.Class_Name/<name>.jpg    classes.txt  images.txt  image_class_labels.txt
    segmentations/NNN.Class_Name/<name>.png   train_test_split.txt  bounding_boxes.txt
    parts/parts.txt  parts/part_locs.txt

(CUB ships ``segmentations/`` as a separate archive; here it sits inside ``root``, one of the two
places ``data.cub_preprocess`` looks for it.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw, ImageFilter

from data.cub_files import PART_NAMES
from lightning_modules.app import files
from lightning_modules.app.errors import MissingFileError

_PART = {name: i for i, name in enumerate(PART_NAMES)}

# Every 4th image of a class has its body hidden by a foreground branch, leaving < 6 visible parts,
# so that the `cub_all` filter of data.cub has something to drop.
_OCCLUDED_EVERY = 4
# Every 3rd image of a class is in the test split (is_train 0).
_TEST_EVERY = 3


def write_synthetic_cub(
    root: str | Path,
    num_classes: int = 3,
    images_per_class: int = 12,
    image_size: tuple[int, int] = (160, 128),
    seed: int = 0,
) -> Path:
    """Write a synthetic CUB-200-2011 of ``num_classes x images_per_class`` images into ``root``.

    Args:
        root: the folder to fill (created; existing files with the same names are overwritten).
        num_classes: classes ``001`` to ``num_classes``.
        images_per_class: images per class; every 3rd is a test image, every 4th is occluded.
        image_size: nominal (width, height) in pixels; each image varies it by up to +-25 %.
        seed: the whole dataset is a deterministic function of the arguments.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    images, labels, split, boxes, part_locs = [], [], [], [], []
    classes = [f"{c:03d}.Synthetic_Bird_{c}" for c in range(1, num_classes + 1)]
    image_id = 0
    for class_id, class_dir in enumerate(classes, start=1):
        for k in range(images_per_class):
            image_id += 1
            relative = f"{class_dir}/{class_dir[4:]}_{k + 1:04d}_{image_id}.jpg"
            width = int(round(image_size[0] * rng.uniform(0.75, 1.25)))
            height = int(round(image_size[1] * rng.uniform(0.75, 1.25)))
            image, mask, box, parts, visible = _draw_bird(rng, width, height, occluded=k % _OCCLUDED_EVERY == _OCCLUDED_EVERY - 1)
            image_path, mask_path = root / "images" / relative, root / "segmentations" / Path(relative).with_suffix(".png")
            image_path.parent.mkdir(parents=True, exist_ok=True)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            image.save(image_path, quality=90)
            mask.save(mask_path)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(k % _TEST_EVERY != _TEST_EVERY - 1)}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
            for j, ((x, y), vis) in enumerate(zip(parts, visible), start=1):
                part_locs.append(f"{image_id} {j} {x:.1f} {y:.1f} 1" if vis else f"{image_id} {j} 0.0 0.0 0")
    (root / "parts").mkdir(parents=True, exist_ok=True)
    texts = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "classes.txt": [f"{c} {name}" for c, name in enumerate(classes, start=1)],
        "train_test_split.txt": split,
        "bounding_boxes.txt": boxes,
        "parts/parts.txt": [f"{j} {name}" for j, name in enumerate(PART_NAMES, start=1)],
        "parts/part_locs.txt": part_locs,
    }
    for name, lines in texts.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


#: The size of the demo's dataset (conf/demo.yaml): enough training images that the regressor, with
#: 2K inputs per image, is fitted on more rows than unknowns.
DEMO_SIZE = dict(num_classes=4, images_per_class=30)

#: Where the demo (conf/demo.yaml) writes what it makes up, relative to the folder it runs in.
#: Synthetic data is written there and nowhere else, so a mistyped path is an error, not a demo.
DEMO_DIR = Path(".demo")
DEMO_CUB_ROOT = DEMO_DIR / "CUB_200_2011"


def is_demo_path(path: str | Path, demo_path: Path) -> bool:
    """``path`` names ``demo_path`` (both resolved against the current folder)."""
    return Path(path).resolve() == demo_path.resolve()


def ensure_synthetic_cub(root: str | Path, **kwargs) -> Path:
    """Write the synthetic dataset at ``root`` unless ``root`` exists; never leaves a half dataset
    (``app.files.atomic_folder``: another process finishing first keeps its copy). ``kwargs`` go to
    ``write_synthetic_cub``. (``CUBDataModule`` calls it only for ``DEMO_CUB_ROOT``; tests and
    benchmarks pass their own folders.)
    """
    root = Path(root)
    if root.exists():
        return root
    with files.atomic_folder(root) as tmp:
        write_synthetic_cub(tmp, **kwargs)
    count = len((root / "images.txt").read_text().splitlines())
    rank_zero_info(f"Wrote a synthetic demo dataset to {root}: {count} drawn birds in CUB's layout (not CUB's photos; "
                   "the demo's numbers mean nothing).")
    return root


def require_demo_root(root: str | Path) -> None:
    """Raises ``MissingFileError`` unless ``root`` is the demo's dataset folder ``DEMO_CUB_ROOT``."""
    if not is_demo_path(root, DEMO_CUB_ROOT):
        raise MissingFileError(
            f"data.root={str(root)!r} does not exist. generate_synthetic writes the demo's made-up dataset only at "
            f"{str(DEMO_CUB_ROOT)!r} (the demo's own folder), never in place of a mistyped path: fix data.root, or "
            "use data.download: true for the real CUB-200-2011."
        )


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A leafy texture: a colour gradient, soft stripes and pixel noise, so crops are not flat."""
    base = rng.uniform(40, 200, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2)
    stripes = 25 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    gradient = 40 * (yy / height - 0.5)
    noise = rng.normal(0, 12, size=(height, width, 3))
    pixels = base + (stripes + gradient)[..., None] * rng.uniform(0.5, 1.0, size=3) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_bird(
    rng: np.random.Generator, width: int, height: int, occluded: bool
) -> tuple[Image.Image, Image.Image, tuple[float, float, float, float], np.ndarray, np.ndarray]:
    """One image: (RGB image, L soft mask, bbox (x, y, w, h), parts (15, 2) pixel indices, visible (15,))."""
    facing = 1 if rng.random() < 0.5 else -1  # +1: beak to the right, the bird's right side shows
    # Body half-length; bounded by the height too so that the bird fits in landscape and portrait.
    a = rng.uniform(0.13, 0.2) * min(width, 1.3 * height)
    b = a * rng.uniform(0.55, 0.75)  # body half-height
    r = b * rng.uniform(0.5, 0.65)  # head radius
    leg = b * rng.uniform(0.6, 0.9)
    # Extent of the drawing around the body centre, to place the whole bird inside the image.
    left, right = -1.7 * a, 0.95 * a + 1.7 * r
    if facing < 0:
        left, right = -right, -left
    top, bottom = -b - 1.1 * r, b + leg + 2
    cx = rng.uniform(2 - left, width - 3 - right)
    cy = rng.uniform(2 - top, height - 3 - bottom)

    def at(dx: float, dy: float) -> tuple[float, float]:
        return cx + facing * dx, cy + dy

    hx, hy = at(0.95 * a, -b)
    near, far = ("right", "left") if facing > 0 else ("left", "right")
    far_wing_up = rng.random() < 0.4
    far_leg_shown = rng.random() < 0.6
    points = {
        "back": at(-0.2 * a, -0.95 * b),
        "belly": at(0.0, 0.8 * b),
        "breast": at(0.6 * a, 0.35 * b),
        "tail": at(-1.35 * a, -0.1 * b),
        "crown": (hx, hy - 0.9 * r),
        "forehead": (hx + facing * 0.65 * r, hy - 0.65 * r),
        "nape": (hx - facing * 0.8 * r, hy - 0.3 * r),
        "beak": (hx + facing * 1.45 * r, hy),
        "throat": (hx + facing * 0.4 * r, hy + 0.85 * r),
        f"{near} eye": (hx + facing * 0.35 * r, hy - 0.2 * r),
        f"{far} eye": (hx - facing * 0.35 * r, hy - 0.2 * r),  # behind the head: never visible
        f"{near} wing": at(-0.15 * a, -0.15 * b),
        f"{far} wing": at(-0.35 * a, -1.25 * b),
        f"{near} leg": at(0.15 * a, b + leg),
        f"{far} leg": at(-0.15 * a, b + leg),
    }
    shown = {name: True for name in points}
    shown[f"{far} eye"] = False
    shown[f"{far} wing"] = far_wing_up
    shown[f"{far} leg"] = far_leg_shown

    body_colour = tuple(int(v) for v in rng.integers(30, 230, size=3))
    wing_colour = tuple(int(v * 0.6) for v in body_colour)
    head_colour = tuple(int(v) for v in rng.integers(30, 230, size=3))
    leg_colour, beak_colour = (60, 40, 20), (230, 160, 30)
    # (kind, coordinates, colour), painted back to front.
    shapes: list[tuple[str, list, tuple[int, ...]]] = []
    if far_wing_up:
        wx, wy = points[f"{far} wing"]
        shapes.append(("polygon", [at(-0.1 * a, -0.8 * b), (wx - facing * 0.3 * a, wy - 0.2 * b), at(-0.6 * a, -0.7 * b)], wing_colour))
    for name in [f"{near} leg"] + ([f"{far} leg"] if far_leg_shown else []):
        lx, ly = points[name]
        shapes.append(("line", [(lx, cy + 0.7 * b), (lx, ly), (lx + facing * 0.25 * a, ly)], leg_colour))
    tx, ty = points["tail"]
    tail_end = tx - facing * 0.3 * a
    shapes.append(("polygon", [at(-0.8 * a, -0.3 * b), (tail_end, ty - 0.5 * b), (tail_end, ty + 0.4 * b), at(-0.8 * a, 0.3 * b)], wing_colour))
    shapes.append(("ellipse", [cx - a, cy - b, cx + a, cy + b], body_colour))
    shapes.append(("ellipse", [hx - r, hy - r, hx + r, hy + r], head_colour))
    shapes.append(("polygon", [(hx + facing * 0.8 * r, hy - 0.3 * r), points["beak"], (hx + facing * 0.8 * r, hy + 0.3 * r)], beak_colour))
    wx, wy = points[f"{near} wing"]
    shapes.append(("ellipse", [wx - 0.55 * a, wy - 0.45 * b, wx + 0.55 * a, wy + 0.45 * b], wing_colour))
    ex, ey = points[f"{near} eye"]
    shapes.append(("ellipse", [ex - 2.5, ey - 2.5, ex + 2.5, ey + 2.5], (250, 250, 250)))
    shapes.append(("ellipse", [ex - 1.2, ey - 1.2, ex + 1.2, ey + 1.2], (0, 0, 0)))

    image = _background(rng, width, height)
    mask = Image.new("L", (width, height), 0)
    for canvas, silhouette in ((ImageDraw.Draw(image), False), (ImageDraw.Draw(mask), True)):
        for kind, xy, colour in shapes:
            fill = 255 if silhouette else colour
            if kind == "line":
                canvas.line(xy, fill=fill, width=2, joint="curve")
            else:
                getattr(canvas, kind)(xy, fill=fill)

    if occluded:
        # A branch in front of everything below the eye: only crown, forehead, nape, eye (and maybe a
        # raised wing, which sits below the eye too) stay visible, i.e. fewer than 6 parts.
        branch = [0, hy - 0.1 * r, width, height]
        ImageDraw.Draw(image).rectangle(branch, fill=(70, 110, 40))
        ImageDraw.Draw(mask).rectangle(branch, fill=0)
        for name, (_, y) in points.items():
            shown[name] = shown[name] and y < branch[1]

    hard = np.asarray(mask) > 127
    ys, xs = np.nonzero(hard)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min()))
    parts = np.zeros((len(PART_NAMES), 2))
    visible = np.zeros(len(PART_NAMES), dtype=bool)
    for name, (x, y) in points.items():
        # CUB stores integer pixel indices; a part must be inside the image to be annotated.
        px, py = int(round(x)), int(round(y))
        if shown[name] and 0 <= px < width and 0 <= py < height:
            parts[_PART[name]] = (px, py)
            visible[_PART[name]] = True
    # Official masks are soft (several annotators averaged); blur the silhouette's edge alike.
    return image, mask.filter(ImageFilter.GaussianBlur(0.8)), box, parts, visible
