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


class ModelDraws:
    """The generators of the model's draws, each seeded by ``noise_seed`` and what it is for (``Draw``).

    Args:
        noise_seed: ``model.noise_seed``.
        device: where the generators draw (the model's device).
    """

    def __init__(self, noise_seed: int, device: torch.device | str = "cpu") -> None:
        self.noise_seed, self.device = noise_seed, device

    def step(self, rank: int, global_step: int, batch_idx: int) -> torch.Generator:
        """One training step's noise and transforms. Resume-safe: Lightning restores the step and batch index."""
        return seeded_generator(self.noise_seed, Draw.TRAINING_STEP, rank, global_step, batch_idx, device=self.device)

    def extraction(self, sample_keys, iterations: int) -> list[torch.Generator]:
        """B x ``iterations`` generators, image-major: augmentation i of the image with key k draws its
        transform and noise from ``(noise_seed, EXTRACTION, k, i)``, whatever its batch, position or device."""
        return [seeded_generator(self.noise_seed, Draw.EXTRACTION, int(key), i, device=self.device)
                for key in sample_keys for i in range(iterations)]

    def ranking(self, sample_keys) -> list[torch.Generator]:
        """One generator per token-ranking image: its noise, from ``(noise_seed, RANKING, sample_key)``."""
        return [seeded_generator(self.noise_seed, Draw.RANKING, int(key), device=self.device) for key in sample_keys]
