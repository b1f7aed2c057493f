"""Pictures a person looks at: keypoints, heat maps and grids drawn with PIL and NumPy only.

Points are given in continuous pixel coordinates (``data/base.py``): pixel i spans [i, i + 1), so
its centre is at i + 0.5. Keypoint k is drawn in ``PALETTE[k % len(PALETTE)]`` in every image,
so the same keypoint has the same colour everywhere. Files are always written as PNG
(``save_png``), never JPEG bytes under a ``.png`` name (docs/method.md section 9, bug 11).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lightning_modules.app import files

#: 30 qualitative colours, the most distinct first (K = 10 uses the first ten). No grey, black or
#: white: those vanish on the grey padding or on dark and light backgrounds.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (100, 143, 255), (255, 97, 150),
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232),
)  # fmt: skip
#: Ground truth and prediction in comparisons: a blue/orange pair that colour-blind readers tell apart.
TRUTH_RGB = (0, 160, 255)
PREDICTION_RGB = (255, 140, 0)
OUTLINE_RGB = (0, 0, 0)
BACKGROUND_RGB = (32, 32, 32)
#: Pictures a person opens are shown with their longer side in this range (pixels): a 4000 x 3000
#: photo is drawn at 1024 x 768, a 20 x 15 one at 256 x 192 (enlarged without blur).
DISPLAY_MIN_PX = 256
DISPLAY_MAX_PX = 1024

# Viridis at 9 evenly spaced stops (matplotlib's values); linear interpolation between them stays
# perceptually uniform to the eye and needs no plotting library.
_VIRIDIS_STOPS = np.array(
    [
        (68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
        (31, 158, 137), (53, 183, 121), (110, 206, 88), (253, 231, 37),
    ],
    dtype=np.float32,
)  # fmt: skip
VIRIDIS_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS_STOPS)), _VIRIDIS_STOPS[:, c]) for c in range(3)],
    axis=-1,
).astype(np.uint8)  # (256, 3)


def to_pil(image: Tensor) -> Image.Image:
    """image: (3, H, W) RGB in [0, 1] (any device) -> an H x W RGB PIL image."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"to_pil expects one (3, H, W) RGB image in [0, 1], got shape {tuple(image.shape)}.")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled default font at ``size_px`` (scalable when Pillow has FreeType)."""
    return ImageFont.load_default(size=max(6, int(size_px)))


def default_radius(image: Image.Image) -> int:
    """Marker radius in pixels: 1 % of the longer side, at least 3 px."""
    return max(3, round(0.01 * max(image.size)))


def _pil_centre(point_px: Sequence[float]) -> tuple[float, float]:
    # PIL addresses pixel i by the integer i (its centre); continuous coordinates put it at i + 0.5.
    return float(point_px[0]) - 0.5, float(point_px[1]) - 0.5


def draw_keypoints(
    image: Image.Image,
    points_px: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[str] | None = None,
    radius: int | None = None,
    color_ids: Sequence[int] | None = None,
) -> Image.Image:
    """A copy of ``image`` with K numbered points drawn: points_px (K, 2) continuous (x, y) pixels.

    Point k is a disc in ``PALETTE[color_ids[k] % 30]`` (``color_ids`` defaults to 0..K-1) with a
    dark outline, labelled ``labels[k]`` (default: its index k) in the same colour with a dark
    stroke, so it reads on light and dark backgrounds. ``radius`` in pixels defaults to
    ``default_radius``. Non-finite points are not drawn.
    """
    points = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    labels = [str(k) for k in range(len(points))] if labels is None else list(labels)
    color_ids = range(len(points)) if color_ids is None else color_ids
    if len(labels) != len(points) or len(color_ids) != len(points):
        raise ValueError(
            f"{len(points)} points need as many labels and color_ids, got {len(labels)} and {len(color_ids)}."
        )
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    radius = default_radius(out) if radius is None else radius
    outline = max(1, radius // 3)
    text_font = font(max(10, round(2.6 * radius)))
    for point, label, color_id in zip(points, labels, color_ids):
        if not np.isfinite(point).all():
            continue
        x, y = _pil_centre(point)
        color = PALETTE[color_id % len(PALETTE)]
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline=OUTLINE_RGB, width=outline)
        # Above-right of the point; below and/or to the left where that would leave the picture.
        _, top, right, _ = draw.textbbox((x + radius + 1, y - radius - 1), label, font=text_font, anchor="ld",
                                         stroke_width=outline)
        left = right > out.width and x - radius - 1 - (right - x - radius - 1) >= 0
        below = top < 0
        anchor = ("r" if left else "l") + ("t" if below else "d")
        position = (x - radius - 1 if left else x + radius + 1, y + radius + 1 if below else y - radius - 1)
        draw.text(position, label, fill=color, font=text_font, anchor=anchor, stroke_width=outline,
                  stroke_fill=OUTLINE_RGB)
    return out


def draw_comparison(
    image: Image.Image,
    target_px: np.ndarray,
    preds_px: np.ndarray,
    visible: np.ndarray | None = None,
    radius: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with ground truth and prediction: target_px, preds_px (J, 2) (x, y) pixels.

    Ground truth is a ``TRUTH_RGB`` disc, the prediction a ``PREDICTION_RGB`` square, joined by a
    white line (the error). Only joints with ``visible`` (J,) True are drawn (default: all).
    """
    target, preds = (np.asarray(a, dtype=np.float64).reshape(-1, 2) for a in (target_px, preds_px))
    if target.shape != preds.shape:
        raise ValueError(f"target_px {target.shape} and preds_px {preds.shape} must both be (J, 2).")
    visible = np.ones(len(target), dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    radius = default_radius(out) if radius is None else radius
    outline = max(1, radius // 3)
    for (tx, ty), (px, py) in zip(map(_pil_centre, target[visible]), map(_pil_centre, preds[visible])):
        draw.line((tx, ty, px, py), fill=(255, 255, 255), width=outline)
        draw.ellipse((tx - radius, ty - radius, tx + radius, ty + radius), fill=TRUTH_RGB, outline=OUTLINE_RGB,
                     width=outline)
        draw.rectangle((px - radius, py - radius, px + radius, py + radius), fill=PREDICTION_RGB,
                       outline=OUTLINE_RGB, width=outline)
    return out


def display_scale(width: int, height: int, min_px: int = DISPLAY_MIN_PX, max_px: int = DISPLAY_MAX_PX) -> float:
    """The factor that brings the longer side of a ``width`` x ``height`` picture into [min_px, max_px]."""
    if not 0 < min_px <= max_px:
        raise ValueError(f"display sizes min_px={min_px}, max_px={max_px}: need 0 < min_px <= max_px.")
    longer = max(width, height)
    return min(max_px, max(min_px, longer)) / longer


def fit_for_display(image: Image.Image, min_px: int = DISPLAY_MIN_PX, max_px: int = DISPLAY_MAX_PX) -> tuple[Image.Image, float]:
    """(``image`` resized so its longer side lies in [min_px, max_px], the scale applied).

    Shrinking is antialiased (Lanczos); enlarging repeats pixels (nearest), so a tiny image shows
    its real pixels instead of a blur. Points in continuous pixels scale by the same factor.
    """
    scale = display_scale(*image.size, min_px, max_px)
    if scale == 1:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return image.resize(size, method), scale


def legend(entries: Sequence[tuple], width: int) -> Image.Image:
    """A dark strip ``width`` wide listing ``entries`` as swatch + text, wrapped in rows.

    Each entry is ``(colour, text)`` or ``(colour, text, marker)`` with ``marker`` the swatch's
    shape, ``disc`` (default) or ``square``, as the points on the picture are drawn.
    """
    size = min(18, max(10, width // 40))
    text_font = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_h, gap = math.ceil(size * 1.5), size
    placed, x, y = [], 4, 2
    for color, text, *marker in entries:
        item_w = size + 4 + math.ceil(probe.textlength(text, font=text_font))
        if x > 4 and x + item_w > width - 4:
            x, y = 4, y + row_h
        placed.append((x, y, color, text, marker[0] if marker else "disc"))
        x += item_w + gap
    out = Image.new("RGB", (width, y + row_h + 2), BACKGROUND_RGB)
    draw = ImageDraw.Draw(out)
    for x, y, color, text, marker in placed:
        box = (x, y + (row_h - size) // 2, x + size, y + (row_h + size) // 2)
        (draw.ellipse if marker == "disc" else draw.rectangle)(box, fill=color, outline=OUTLINE_RGB)
        draw.text((x + size + 4, y + row_h // 2), text, fill=(255, 255, 255), font=text_font, anchor="lm")
    return out


def with_legend(image: Image.Image, strip: Image.Image) -> Image.Image:
    """``image`` with ``strip`` (e.g. a ``legend`` or ``colorbar``) below it, on the dark background."""
    out = Image.new("RGB", (max(image.width, strip.width), image.height + strip.height), BACKGROUND_RGB)
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(strip, (0, image.height))
    return out


def colorbar(width: int, low: float, high: float, label: str) -> Image.Image:
    """A horizontal viridis bar from ``low`` (left) to ``high`` (right), numbered, titled ``label``."""
    size = min(16, max(10, width // 45))
    text_font = font(size)
    bar_w, bar_h = max(16, width - 8 - 2 * round(4 * size)), max(8, size)
    strip_h = math.ceil(size * 1.6) * 2 + bar_h
    out = Image.new("RGB", (width, strip_h), BACKGROUND_RGB)
    x0, y0 = (width - bar_w) // 2, math.ceil(size * 1.6)
    ramp = VIRIDIS_LUT[np.linspace(0, 255, bar_w).round().astype(np.int64)]
    out.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0)), (x0, y0))
    draw = ImageDraw.Draw(out)
    draw.text((width // 2, y0 // 2), label, fill=(255, 255, 255), font=text_font, anchor="mm")
    below = y0 + bar_h + math.ceil(size * 0.8)
    for fraction in (0.0, 0.5, 1.0):
        x = x0 + fraction * (bar_w - 1)
        draw.line((x, y0 + bar_h, x, y0 + bar_h + 3), fill=(255, 255, 255))
        value = low + fraction * (high - low)
        draw.text((x, below), f"{value:.3g}", fill=(255, 255, 255), font=text_font, anchor="mm")
    return out


def colorize(heat: np.ndarray | Tensor, low: float | None = None, high: float | None = None) -> np.ndarray:
    """heat: (h, w) any range -> (h, w, 3) uint8 viridis from ``low`` to ``high`` (default: the map's min..max).

    A shared ``low``/``high`` puts several maps on one scale (one ``colorbar`` reads them all).
    A constant map (no contrast) is drawn at the bottom of the scale.
    """
    values = np.asarray(heat, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"A heat map is one (h, w) array, got shape {values.shape}.")
    low = float(np.nanmin(values)) if low is None else low
    high = float(np.nanmax(values)) if high is None else high
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return VIRIDIS_LUT[np.nan_to_num(scaled * 255).round().astype(np.int64).clip(0, 255)]


def heatmap_overlay(
    image: Image.Image,
    heat: np.ndarray | Tensor,
    alpha: float = 0.5,
    low: float | None = None,
    high: float | None = None,
) -> Image.Image:
    """A grey ``image`` blended with heat (h, w) in viridis, resized to the image.

    The image is turned grey first so that every hue on it comes from the colormap. ``alpha`` is
    the heat map's weight: 0 shows the (grey) image only, 1 the heat map only. ``low``/``high``:
    the colour scale (``colorize``; default the map's own min..max).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: use a blend weight in [0, 1].")
    values = np.asarray(heat, dtype=np.float32)
    # Resize the values, not the colours: bilinear between colours would leave the colormap.
    resized = np.asarray(Image.fromarray(values).resize(image.size, Image.Resampling.BILINEAR))
    return Image.blend(image.convert("L").convert("RGB"), Image.fromarray(colorize(resized, low, high)), alpha)


def captioned(image: Image.Image, text: str) -> Image.Image:
    """``image`` with ``text`` in a dark strip above it: 10-20 px type, shrunk until it fits the width."""
    size = min(20, max(10, image.width // 14))
    probe = ImageDraw.Draw(image)
    while size > 6 and probe.textlength(text, font=font(size)) > image.width - 4:
        size -= 1
    strip = math.ceil(size * 1.4)
    out = Image.new("RGB", (image.width, image.height + strip), BACKGROUND_RGB)
    out.paste(image.convert("RGB"), (0, strip))
    ImageDraw.Draw(out).text((2, strip // 2), text, fill=(255, 255, 255), font=font(size), anchor="lm")
    return out


def grid(images: Sequence[Image.Image], columns: int, padding_px: int = 4) -> Image.Image:
    """The images in rows of ``columns``, each in a cell of the largest width and height, on dark grey."""
    if not images:
        raise ValueError("grid needs at least one image.")
    if columns < 1:
        raise ValueError(f"columns={columns}: use at least 1.")
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    out = Image.new(
        "RGB",
        (columns * cell_w + (columns + 1) * padding_px, rows * cell_h + (rows + 1) * padding_px),
        BACKGROUND_RGB,
    )
    for n, image in enumerate(images):
        row, col = divmod(n, columns)
        corner = (padding_px + col * (cell_w + padding_px), padding_px + row * (cell_h + padding_px))
        out.paste(image.convert("RGB"), corner)
    return out


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Writes ``image`` as PNG at ``path`` (its parent folders created; atomically, ``app/files.py``) -> the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: save_png writes PNG files; give the name a .png suffix.")
    with files.atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
