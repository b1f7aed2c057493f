"""Where the data's random draws come from: the training order, its resumable position, the ranking images."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from data.sampling import ResumableDataLoader, ResumableSampler, SampleKey, ranking_indices, sample_draws
from data.cub import CUBDataModule
from lightning_modules.app.seeding import Draw, seeded_generator


class KeyEcho(Dataset):
    """Returns what it was asked for and one number drawn from the sample's generator."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        index, generator = sample_draws(key)
        return {"index": index, "epoch": getattr(key, "epoch", 0), "draw": torch.rand((), generator=generator)}


def test_sampler_order_is_a_permutation_drawn_from_seed_and_epoch():
    sampler = ResumableSampler(KeyEcho(), seed=3)
    sampler.set_epoch(1)
    keys = list(sampler)
    expected = torch.randperm(10, generator=seeded_generator(3, Draw.DATA_ORDER, 1)).tolist()
    assert [key.index for key in keys] == expected
    assert keys[0] == SampleKey(expected[0], 1, 3)
    sampler.set_epoch(2)
    assert [key.index for key in sampler] != expected
    sampler.set_epoch(1)
    assert [key.index for key in sampler] == expected  # the same epoch, the same order, however often


def test_sampler_shards_cover_the_epoch_padded_to_equal_length():
    shards = [list(ResumableSampler(KeyEcho(), seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 4]
    indices = [key.index for shard in shards for key in shard]
    assert sorted(set(indices)) == list(range(10)) and len(indices) == 12  # two images repeated to pad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch_where_it_stopped(num_workers):
    def loader():
        return ResumableDataLoader(KeyEcho(), batch_size=3, sampler=ResumableSampler(KeyEcho(), seed=1),
                                   drop_last=True, num_workers=num_workers)

    uninterrupted = loader()
    uninterrupted.sampler.set_epoch(4)
    expected = list(uninterrupted)
    assert len(expected) == 3 and all((batch["epoch"] == 4).all() for batch in expected)

    interrupted = loader()
    interrupted.sampler.set_epoch(4)
    iterator = iter(interrupted)
    first = next(iterator)
    assert interrupted.state_dict() == {"epoch": 4, "samples": 3}
    state = interrupted.state_dict()
    del iterator

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(4)  # Lightning sets the epoch again after loading: the position stays
    rest = list(resumed)
    assert len(rest) == 2
    for got, want in zip([first, *rest], expected):
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["draw"], want["draw"])
    assert resumed.state_dict() == {"epoch": 4, "samples": 9}
    resumed.sampler.set_epoch(5)
    assert len(list(resumed)) == 3  # a new epoch starts at its beginning


def test_ranking_images_are_a_seeded_random_draw_spread_over_classes(cub_root):
    datamodule = CUBDataModule(str(cub_root), subset="cub_all", image_size=64, batch_size=4, num_workers=0)
    datamodule.setup("fit")
    dataset = datamodule.ranking_dataset()
    assert len(dataset) == 18  # 3 classes of 6 training images, in class order
    indices = ranking_indices(6, len(dataset), seed=0)
    assert indices == [11, 8, 3, 13, 17, 9]
    assert ranking_indices(6, len(dataset), seed=1) != indices
    assert ranking_indices(50, len(dataset), seed=0) == torch.randperm(18, generator=seeded_generator(0, Draw.RANKING)).tolist()
    classes = {dataset.annotations.class_ids[dataset.rows[i]] for i in indices}
    assert classes == {1, 2, 3}  # the first 6 in file order would all be class 1
    loader = datamodule.keypoint_index_dataloader(6, seed=0)
    batches = list(loader)
    assert torch.cat([b["index"] for b in batches]).tolist() == indices
    assert not any(b["flipped"].any() for b in batches)  # no augmentation


def test_overfit_batches_still_trains_with_the_resumable_loader(tmp_path):
    """Lightning swaps in its own sequential sampler for overfit_batches; the loader then resumes nothing."""
    import lightning as L
    from torch import nn

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return ((self.weight - batch["draw"].mean()) ** 2)

        def configure_optimizers(self):
            return torch.optim.SGD([self.weight], lr=0.1)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return ResumableDataLoader(KeyEcho(), batch_size=2, sampler=ResumableSampler(KeyEcho(), seed=0), drop_last=True)

    trainer = L.Trainer(accelerator="cpu", max_steps=2, overfit_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), datamodule=Data())
    assert trainer.global_step == 2
    assert trainer.train_dataloader.state_dict() == {}
