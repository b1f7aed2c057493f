"""The one way every dataset reads an image file: upright, RGB, 8 bits per channel, correctly scaled.

``read_image`` handles what real photo collections hold:

- EXIF orientation (phone photos): the pixels are turned upright (``PIL.ImageOps.exif_transpose``),
  so crop boxes, keypoints and overlays all refer to the image as a viewer shows it.
- 16-bit integer images (``I;16``, ``I;16B``, ``I;16L``, ``I``: 16-bit PNG and TIFF): scaled from
  0..65535 to 0..255. PIL's own ``convert("RGB")`` clips them at 255 and turns them white.
- 32-bit float images (``F``): taken as [0, 1] when they lie there, else as 0..255 when they lie
  there (PIL's own convention for ``F``); anything else (negative, above 255, non-finite) is an error,
  since no scale can be guessed.
- grayscale and bilevel (``L``, ``1``) to RGB; palette images (``P``) through their palette.
- transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a transparent colour): composited
  on ``background_rgb`` (gray (127, 127, 127) by default: the background zero123plus was trained on,
  and neutral for SD).

The result is 8 bits per channel because the crop and resize (``data.base.crop_resize``) work on PIL
RGB images and the diffusion VAEs were trained on 8-bit images: a 16-bit image loses nothing the
model can see.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lightning_modules.app.errors import UserError

#: Gray of zero123plus' training renders; also the folder's padding colour.
GRAY_RGB = (127, 127, 127)
# JPEG draft decoding at 1/8 scale reads the whole stream (so truncation is caught) for little cost.
_CHECK_DRAFT_PX = 64
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImageError(UserError, OSError):
    """An image file that cannot be decoded (truncated, corrupt, empty, or of an unknown value range)."""


def _scaled_to_bytes(image: Image.Image, path: str) -> Image.Image:
    """A 16-bit or float single-channel image -> mode ``L`` with its value range mapped to 0..255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            raise UnreadableImageError(
                f"{path}: a {image.mode} image with values {low:g}..{high:g}, outside the 16-bit range 0..65535; "
                "save it as 8- or 16-bit PNG/TIFF."
            )
        scale = 255.0 / 65535.0
    else:  # "F"
        if not np.isfinite(values).all():
            raise UnreadableImageError(f"{path}: a float image with NaN or infinite values; fix or remove it.")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise UnreadableImageError(
                f"{path}: a float image with values {low:g}..{high:g}; float images must lie in [0, 1] or "
                "[0, 255]: rescale it."
            )
        scale = 255.0 if high <= 1.0 else 1.0
    return Image.fromarray(np.round(values * scale).clip(0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background_rgb: Sequence[int] = GRAY_RGB, path: str = "image") -> Image.Image:
    """Any PIL image -> mode ``RGB`` (8-bit), 16-bit/float scaled, transparency on ``background_rgb``."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return _scaled_to_bytes(image, path).convert("RGB")
    transparent = image.mode in _ALPHA_MODES or "transparency" in image.info
    if not transparent:
        return image.convert("RGB")
    rgba = image.convert("RGBA")  # applies a palette's or a colour key's transparency
    background = Image.new("RGBA", rgba.size, (*(int(c) for c in background_rgb), 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def read_image(path: str | Path, background_rgb: Sequence[int] = GRAY_RGB) -> Image.Image:
    """The upright 8-bit RGB image of the file ``path`` (see the module docstring for the modes).

    Raises ``UnreadableImageError`` naming the file when it cannot be decoded (PIL's own messages,
    e.g. for a truncated JPEG, do not name it).
    """
    try:
        with Image.open(path) as source:
            upright = ImageOps.exif_transpose(source)
            return to_rgb(upright, background_rgb, str(path))
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise UnreadableImageError(f"{path}: cannot be decoded ({type(error).__name__}: {error}).") from error


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of ``path`` as ``read_image`` returns it, from the header alone (no decoding)."""
    with Image.open(path) as image:
        width, height = image.size
        # EXIF orientations 5-8 turn the image by 90 degrees (ImageOps.exif_transpose's table).
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            return height, width
        return width, height


def decode_error(path: str | Path) -> str | None:
    """Why ``path`` cannot be read by ``read_image``, or None when it can (cheap: JPEGs decode at 1/8)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (_CHECK_DRAFT_PX, _CHECK_DRAFT_PX))
            image.load()
            to_rgb(image, GRAY_RGB, str(path))
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return f"{type(error).__name__}: {error}"
    return None
