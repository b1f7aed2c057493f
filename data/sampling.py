"""The training order and per-sample draws: a run resumed mid-epoch, on any number of ranks, sees what an uninterrupted run would."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from typing import NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lightning_modules.app.seeding import Draw, seeded_generator


def without_paths(dataset: Dataset, paths: Collection[str]) -> Dataset:
    """``dataset`` without the samples whose source file is in ``paths`` (by ``image_path(index)``).

    The samples keep their ``index`` in the underlying dataset; ``dataset`` may be a ``Subset`` of
    one (the readable images). A dataset that cannot name a sample's file without loading it (no
    ``image_path``) is returned whole, with a warning.
    """
    if not paths:
        return dataset
    base, indices = dataset, list(range(len(dataset)))
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    image_path = getattr(base, "image_path", None)
    if image_path is None:
        rank_zero_warn(f"{type(base).__name__} has no image_path(index): the {len(paths)} images predicted "
                       "earlier are predicted again (the merged file still lists each once).")
        return dataset
    return SampleSubset(base, [i for i in indices if str(image_path(i)) not in paths])


class SampleKey(NamedTuple):
    """What ``ResumableSampler`` yields: a sample and the epoch and seed of its augmentation draws."""

    index: int
    epoch: int
    seed: int


def sample_draws(key: int | SampleKey) -> tuple[int, torch.Generator]:
    """The dataset index of ``key`` and the generator of that sample's augmentation draws.

    The generator is ``seeded_generator(seed, AUGMENTATION, epoch, index)``; a plain int is epoch 0, seed 0.
    """
    key = key if isinstance(key, tuple) else SampleKey(int(key), 0, 0)
    return key.index, seeded_generator(key.seed, Draw.AUGMENTATION, key.epoch, key.index)


class SampleSubset(Subset):
    """A ``Subset`` that also maps the index inside a ``SampleKey`` (a training sampler's keys), so
    the sample keeps the augmentation draws of its index in the underlying dataset."""

    def __getitem__(self, key: int | SampleKey):
        if isinstance(key, tuple):
            return self.dataset[key._replace(index=self.indices[key.index])]
        return super().__getitem__(key)

    def __getitems__(self, keys: list) -> list:
        return [self[key] for key in keys]


class ResumableSampler(DistributedSampler):
    """The training order: a permutation drawn from ``(seed, DATA_ORDER, epoch)``, one shard per rank.

    It yields ``SampleKey``s, so a sample's augmentation travels with its index (DataLoader workers
    hold copies of the dataset that never learn the epoch otherwise). ``start`` skips the first
    samples of this rank's shard once (a resumed epoch); ``ResumableDataLoader`` sets it.
    A ``DistributedSampler``, so Lightning uses it as is under DDP instead of wrapping it; like
    torch's, it pads the shards to equal length with samples from the start of the permutation.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        order = torch.randperm(len(self.dataset), generator=seeded_generator(self.seed, Draw.DATA_ORDER, self.epoch))
        order = order.repeat(math.ceil(self.total_size / len(order)))[: self.total_size].tolist()
        shard = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0
        for index in shard[start:]:
            yield SampleKey(index, self.epoch, self.seed)


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a ``ResumableSampler`` whose position Lightning checkpoints.

    Lightning saves ``state_dict()`` of a training loader that has one in every checkpoint and
    calls ``load_state_dict`` on resume (``fit_loop.on_save_checkpoint``); the state is the epoch
    and the samples of this rank's shard already handed out. Counted here, in the main process,
    as batches leave the loader (worker prefetching does not count; Lightning does not prefetch
    from a loader with a length).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Lightning rebuilds the loader with its own sampler for ``overfit_batches`` (a debugging
        # mode): then it is a plain DataLoader with nothing to resume.
        self._resumable = isinstance(self.sampler, ResumableSampler)
        self._consumed = 0

    def __iter__(self) -> Iterator:
        self._consumed = self.sampler.start if self._resumable else 0
        for batch in super().__iter__():
            self._consumed += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "samples": self._consumed} if self._resumable else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._resumable and state:
            self.sampler.set_epoch(int(state["epoch"]))
            self.sampler.start = self._consumed = int(state["samples"])


def ranking_indices(num_images: int, dataset_size: int, seed: int) -> list[int]:
    """``num_images`` distinct indices of ``range(dataset_size)`` (all of them when fewer), drawn at
    random from ``seeded_generator(seed, RANKING)``: StableKeypoints ranks tokens on random training
    images, and a draw over the whole split spreads them over its classes or videos (the first
    images of a file list often share one)."""
    order = torch.randperm(dataset_size, generator=seeded_generator(seed, Draw.RANKING))
    return order[:num_images].tolist()
