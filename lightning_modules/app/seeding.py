"""Random draws that depend only on what they are for, never on how many draws came before.

Every random number of a run (per-step noise and transforms, per-sample data augmentation, per-image
extraction noise) comes from a generator seeded from a tuple of integers that names the draw, e.g.
``(noise_seed, epoch, sample_index)``. So a resumed run, a reordered folder, another ``batch_size``
or another device count draws exactly the same numbers for the same sample.
"""

from __future__ import annotations

import zlib
from enum import IntEnum

import numpy as np
import torch


def seeded_generator(*entropy: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the integers ``entropy`` (mixed by numpy's SeedSequence)."""
    sequence = np.random.SeedSequence([int(value) for value in entropy])
    seed = int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def stable_hash(text: str) -> int:
    """A 32-bit hash of ``text`` that is the same in every process and run (unlike ``hash``)."""
    return zlib.crc32(text.encode("utf-8"))


class Draw(IntEnum):
    """The first integer after the seed in every draw's tuple: which kind of draw it is.

    Tuples of different kinds never coincide, so no two kinds of draw share random numbers.
    """

    TRAINING_STEP = 0  # (noise_seed, TRAINING_STEP, rank, global_step, batch_idx): a step's noise and transforms
    EXTRACTION = 1  # (noise_seed, EXTRACTION, sample_key, iteration): one augmentation of one image's keypoints
    RANKING = 2  # (noise_seed, RANKING): which training images rank the tokens; then (.., sample_key) their noise
    DATA_ORDER = 3  # (data seed, DATA_ORDER, epoch): the permutation of the training split
    AUGMENTATION = 4  # (data seed, AUGMENTATION, epoch, index): one training sample's crop and mirror
