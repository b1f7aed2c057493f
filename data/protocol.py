"""The evaluation protocol a labelled DataModule follows: this project's (``default``) or StableKeypoints' exactly.

``data.<dataset>.init_args.protocol`` selects it (docs/faithfulness.md lists every difference and its effect):

- ``default``: the project's fixes. Ground-truth pixel indices map to the pixel's centre (``(x + 0.5) / size``),
  DeepFashion keypoints at or below 0 are invisible, Human3.6M's left/right swap is a permutation,
  CUB's regression crops are not augmented, the regressor is fitted on every regression image.
- ``stablekeypoints``: StableKeypoints' evaluation code (``unsupervised_keypoints/eval.py``,
  ``keypoint_regressor.py``, ``main.py``, ``datasets/*.py``) reproduced: ``x / size``, every DeepFashion
  keypoint scored, SK's swap pairs with its duplicated (21, 28) and its swap's semantics, CUB's crops
  and regression crops as its ``cub_parts.CUBDataset`` makes them (seeded here), and at most
  ``SK_MAX_REGRESSION_IMAGES`` regression images drawn by its shuffle.

Both protocols report the same units: errors x100 where SK logs fractions (CUB, CelebA) and PCK in
percent where SK logs a fraction (DeepFashion); Tai-Chi (pixels of 256) and Human3.6M (pixels of 128)
are in SK's units. Only the evaluation changes: training and the keypoint-token ranking do not read it.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from lightning_modules.app.errors import ConfigError

Protocol = Literal["default", "stablekeypoints"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)

#: SK fits the regressor on at most this many regression images (``main.py --max_num_points`` 50_000).
SK_MAX_REGRESSION_IMAGES = 50_000
#: The side SK divides Tai-Chi's and DeepFashion's pixel coordinates by (``datasets/taichi.py``,
#: ``datasets/deepfashion.py``: ``/ 256``), whatever the image's size.
SK_EVAL_SIDE = 256


def check_protocol(protocol: str) -> str:
    """``protocol`` when it is one of ``PROTOCOLS``; else a ConfigError naming the choices."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"data.protocol={protocol!r}: choose one of {list(PROTOCOLS)} (docs/faithfulness.md).")
    return protocol


def pixel_centre(protocol: str) -> float:
    """Where a ground-truth pixel index lies in continuous coordinates: its centre (+0.5, ``default``) or,
    as SK divided the index by the size, its corner (0, ``stablekeypoints``)."""
    return 0.0 if protocol == "stablekeypoints" else 0.5


def sk_regression_indices(num_images: int, seed: int, cap: int = SK_MAX_REGRESSION_IMAGES) -> list[int]:
    """The regression images SK fits on, sorted: the first ``cap`` of its shuffled loader.

    SK iterates ``DataLoader(dataset, shuffle=True)`` for ``min(len(dataset), max_num_points)`` images
    (``keypoint_regressor.py``, ``precompute_all_keypoints``). Starting to iterate, torch's loader
    draws its workers' base seed from the global generator, then its ``RandomSampler`` draws a seed
    and permutes with it; here the global generator is replaced by one seeded with ``seed``, so the
    images are those SK takes right after ``torch.manual_seed(seed)``.
    """
    if num_images <= cap:
        return list(range(num_images))
    outer = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=outer)  # the loader's base seed
    sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=outer).item())
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(sampler_seed))
    return sorted(order[:cap].tolist())


def python_round(value: float) -> int:
    """Python's ``round`` (half to even), as SK's box code rounds (``int(round(x))``)."""
    return int(round(float(value)))


def cmr_square_box(bbox_cmr: np.ndarray, outward_frac: np.ndarray) -> tuple[int, int, int]:
    """SK's CUB crop (``datasets/cub_parts.py``: ``peturb_bbox`` then ``square_bbox``) -> (x0, y0, side) in pixels.

    Args:
        bbox_cmr: (4,) ``x1, y1, x2, y2`` of CMR's ``.mat`` files (1-based, inclusive); SK subtracts 1.
        outward_frac: (4,) how far the left, top, right and bottom sides move out, as fractions of
            the box's width or height (SK: 5 % padding plus a jitter of up to 5 % in training).

    The crop covers pixels ``x0 .. x0 + side - 1`` (and likewise in y), whole pixels of the source.
    """
    x1, y1, x2, y2 = (float(v) - 1 for v in bbox_cmr)
    width, height = x2 - x1 + 1, y2 - y1 + 1
    left, top, right, bottom = (float(v) for v in outward_frac)
    box = [python_round(x1 - left * width), python_round(y1 - top * height),
           python_round(x2 + right * width), python_round(y2 + bottom * height)]
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    side = max(width, height)
    return box[0] - python_round((side - width) / 2.0), box[1] - python_round((side - height) / 2.0), side


def autolink_aligned_box(bbox_cmr: np.ndarray, width: int, height: int) -> tuple[float, float, float, float, int, int]:
    """The crop of AutoLink's ``cub.h5`` (SK's ``cub_aligned``; AutoLink ``datasets/preprocess/cub_preprocess.py``).

    The image is first trimmed to a multiple of 16 px (``ox = (width % 16) // 2`` off the left, likewise
    ``oy``); the box's tight square (centre, half the larger side), clamped to the image, is then
    shifted by the trim on its low side only (AutoLink's code) and clamped to the trimmed image.

    Returns:
        ``(x_min, y_min, x_max, y_max)`` in the trimmed image's pixels, and ``(ox, oy)``.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox_cmr)
    ox, oy = (width % 16) // 2, (height % 16) // 2
    new_width, new_height = width - width % 16, height - height % 16
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) / 2
    x_min, x_max = max(0.0, cx - half), min(float(width), cx + half)
    y_min, y_max = max(0.0, cy - half), min(float(height), cy + half)
    x_min, x_max = max(0.0, x_min - ox), min(float(new_width), x_max)
    y_min, y_max = max(0.0, y_min - oy), min(float(new_height), y_max)
    return x_min, y_min, x_max, y_max, ox, oy
