"""docs/method.md section 5 and 7 as a protocol: per-image draws, the token-ranking images, every test image counted once."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data.folder import ImageFolderDataModule
from lightning_modules.evaluation import KeypointSet, RegressorEvaluation
from lightning_modules.metrics import NormalizedKeypointError
from lightning_modules.regressor import LinearKeypointRegressor
from lightning_modules.app.seeding import Draw, seeded_generator

S = 32


@pytest.fixture
def module(tiny_sd_module):
    """The shared tiny module with 4 keypoint tokens and 3 augmentations; restored afterwards."""
    saved_tokens, saved_iterations = tiny_sd_module.keypoint_tokens, tiny_sd_module.hparams.augmentation_iterations
    tiny_sd_module.keypoint_tokens = torch.tensor([0, 5, 9, 13])
    tiny_sd_module.hparams.augmentation_iterations = 3
    yield tiny_sd_module
    tiny_sd_module.keypoint_tokens, tiny_sd_module.hparams.augmentation_iterations = saved_tokens, saved_iterations


def _photos(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (S, S + 8, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _predict(module, folder: Path, batch_size: int) -> dict[bytes, torch.Tensor]:
    """Keypoints of every image of ``folder`` keyed by the file's bytes."""
    datamodule = ImageFolderDataModule(str(folder), image_size=S, batch_size=batch_size, num_workers=0)
    out = {}
    for batch in datamodule.predict_dataloader():
        keypoints = module.keypoints(batch["image"], batch["sample_key"])
        for path, points in zip(batch["path"], keypoints):
            out[Path(path).read_bytes()] = points
    return out


def test_an_images_keypoints_do_not_depend_on_batch_size_position_or_name(module, tmp_path):
    folder = _photos(tmp_path / "a", ["1.png", "2.png", "3.png"])
    one_by_one = _predict(module, folder, batch_size=1)
    batched = _predict(module, folder, batch_size=3)
    # The same files in the opposite order under other names.
    other = tmp_path / "b"
    other.mkdir()
    for new, old in zip(["x.png", "y.png", "z.png"], ["3.png", "2.png", "1.png"]):
        shutil.copy(folder / old, other / new)
    reordered = _predict(module, other, batch_size=2)
    assert len(one_by_one) == 3
    for content, points in one_by_one.items():
        assert torch.equal(batched[content], points) and torch.equal(reordered[content], points)


def test_extraction_generators_are_named_by_sample_key_and_iteration(module):
    generators = module.draws.extraction(torch.tensor([7, 2]), module.hparams.augmentation_iterations)
    assert len(generators) == 2 * 3
    expected = seeded_generator(module.hparams.noise_seed, Draw.EXTRACTION, 2, 1)
    assert torch.equal(torch.rand(4, generator=generators[4]), torch.rand(4, generator=expected))


class _RankingData:
    def __init__(self, loader):
        self.loader, self.calls = loader, []

    def keypoint_index_dataloader(self, num_images=None, seed=0):
        self.calls.append((num_images, seed))
        if self.loader is None:
            raise AssertionError("only rank 0 reads the ranking images")
        return self.loader


def _fake_trainer(rank: int, world_size: int, datamodule, broadcast):
    strategy = SimpleNamespace(broadcast=broadcast)
    return SimpleNamespace(is_global_zero=rank == 0, world_size=world_size, datamodule=datamodule, strategy=strategy)


def test_rank_zero_ranks_the_tokens_on_the_seeded_draw_and_broadcasts_them(module, cub_root):
    from data.cub import CUBDataModule

    cub = CUBDataModule(str(cub_root), image_size=S, batch_size=4, num_workers=0)
    cub.setup("fit")
    data = _RankingData(cub.keypoint_index_dataloader(5, seed=module.hparams.noise_seed))
    sent = []

    def broadcast(tokens, src):
        sent.append((tokens.clone(), src))
        return tokens

    module._trainer = _fake_trainer(0, 2, data, broadcast)
    try:
        rank0 = module.choose_keypoint_tokens().clone()
        assert data.calls == [(module.hparams.num_indices, module.hparams.noise_seed)]
        assert len(sent) == 1 and torch.equal(sent[0][0], rank0) and sent[0][1] == 0
        # Another rank computes nothing and takes what rank 0 sent.
        decided = torch.tensor([8, 1, 3, 2])
        module._trainer = _fake_trainer(1, 2, _RankingData(None), lambda tokens, src: decided)
        assert module.choose_keypoint_tokens().tolist() == [8, 1, 3, 2]
    finally:
        module._trainer = None


def test_keypoint_set_keeps_each_image_once_sorted_by_index():
    rows = KeypointSet()
    keypoints = torch.arange(5 * 2 * 2, dtype=torch.float32).view(5, 2, 2)
    targets, visible = keypoints + 100, torch.tensor([[True, False]] * 5)
    rows.update(torch.tensor([3, 0, 4]), keypoints[[3, 0, 4]], targets[[3, 0, 4]], visible[[3, 0, 4]])
    rows.update(torch.tensor([1, 2, 3]), keypoints[[1, 2, 3]], targets[[1, 2, 3]], visible[[1, 2, 3]])  # 3 again: padding
    out = rows.compute()
    assert out["index"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(out["keypoints"], keypoints) and torch.equal(out["targets"], targets)
    assert out["visible"].dtype == torch.bool and torch.equal(out["visible"], visible)


def test_evaluation_fits_and_scores_the_union_with_repeated_images_counted_once():
    generator = torch.Generator().manual_seed(0)
    keypoints, targets = torch.rand(9, 3, 2, generator=generator), torch.rand(9, 2, 2, generator=generator)
    visible = torch.ones(9, 2, dtype=torch.bool)
    evaluation = RegressorEvaluation(NormalizedKeypointError())
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]  # a padded second shard repeats image 0
    for loader in (0, 1):
        evaluation.update(loader, torch.tensor(order), keypoints[order], targets[order], visible[order])
    evaluation.fit()
    value = evaluation.score()
    reference = LinearKeypointRegressor.fit(keypoints, targets, visible)
    torch.testing.assert_close(evaluation.regressor.weight, reference.weight, rtol=0, atol=0)
    expected = NormalizedKeypointError()
    expected.update(reference(keypoints), targets, visible)
    assert value == pytest.approx(float(expected.compute()), rel=1e-6)
    assert (evaluation.num_regression_images, evaluation.num_test_images) == (9, 9)


def test_evaluation_without_test_images_says_so():
    with pytest.raises(RuntimeError, match="test split was empty"):
        RegressorEvaluation(NormalizedKeypointError()).score()
