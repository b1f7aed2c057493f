"""Random draws that depend only on what they are for, never on how many draws came before.

Every random number of a run (per-step noise and transforms, per-sample data augmentation, per-image
extraction noise) comes from a generator seeded from a tuple of integers that names the draw, e.g.
``(noise_seed, epoch, sample_index)``. So a resumed run, a reordered folder, another ``batch_size``
or another device count draws exactly the same numbers for the same sample.
"""

from __future__ import annotations

import zlib

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
