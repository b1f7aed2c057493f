"""Every model family trains through the same LightningModule on the demo data (tiny models, CPU)."""

from __future__ import annotations


import lightning as L
import pytest
import torch

from data.cub import CUBDataModule
from lightning_modules.backbones import Engine, StableDiffusionXL, Zero123Plus
from tests.conftest import tiny_module


@pytest.mark.parametrize(
    "family, options",
    [
        ("sdxl", {}),
        ("sdxl", {"pooled_embedding": "prompt", "replace_output": True}),
        ("zero123plus", {"mode": "reference_attention", "engine": Engine(gradient_checkpointing=True)}),
        ("zero123plus", {"mode": "reference_attention", "condition_latent": "mean", "image_embedding": "ramp"}),
        ("zero123plus", {"naive": True}),
    ],
)
def test_fit_on_demo_data(family, options, tiny_sdxl_path, tiny_zero123plus_64_path, cub_root, tmp_path):
    cls, path = {"sdxl": (StableDiffusionXL, tiny_sdxl_path), "zero123plus": (Zero123Plus, tiny_zero123plus_64_path)}[family]
    module = tiny_module(path, family=cls, backbone=options, load=False, num_tokens=30, top_k=3, furthest_point_num_samples=6,
                         sigma_px=2.0, num_indices=4, augmentation_iterations=2)
    datamodule = CUBDataModule(str(cub_root), image_size=64, batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        log_every_n_steps=1)
    module.configure_model()  # the trainer's call below finds it done
    initial = module.context.detach().clone()
    trainer.fit(module, datamodule)
    assert module.context.shape == (30, {"sdxl": 32, "zero123plus": 48}[family])
    assert not torch.equal(module.context.detach(), initial)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["train/concentration"] <= 1
    assert module.keypoint_tokens.shape == (3,)
    assert (tmp_path / "embedding.safetensors").is_file()
    keypoints = module.keypoints(torch.rand(1, 3, 64, 64), sample_keys=[0])
    assert keypoints.shape == (1, 3, 2) and keypoints.min() >= 0 and keypoints.max() <= 1


def test_a_stablekeypoints_embedding_is_loaded_for_evaluation(tiny_sd_path, tiny_zero123plus_path, tmp_path):
    context = torch.randn(1, 25, 32)
    torch.save(context, tmp_path / "embedding.pt")
    torch.save(torch.tensor([3, 9, 1]), tmp_path / "indices.pt")
    module = tiny_module(tiny_sd_path, num_tokens=25, top_k=3, furthest_point_num_samples=6,
                         pretrained_context=str(tmp_path / "embedding.pt"), pretrained_keypoint_tokens=str(tmp_path / "indices.pt"))
    torch.testing.assert_close(module.context.detach(), context[0])
    assert module.keypoint_tokens.tolist() == [3, 9, 1]
    wrong = tiny_module(tiny_zero123plus_path, family=Zero123Plus, load=False, num_tokens=25, top_k=3,
                        furthest_point_num_samples=6, pretrained_context=str(tmp_path / "embedding.pt"))
    with pytest.raises(ValueError, match="is 32 wide but the backbone expects 48"):
        wrong.configure_model()


def test_keypoint_tokens_are_ranked_and_exported_before_the_trainer_tears_down(tiny_sd_path, cub_root, tmp_path, monkeypatch):
    """Lightning's teardown moves the module to the CPU before on_fit_end: ranking there would run a real UNet on the CPU."""
    module = tiny_module(tiny_sd_path, load=False, num_tokens=30, top_k=3, furthest_point_num_samples=6, sigma_px=2.0,
                         num_indices=4, augmentation_iterations=2)
    datamodule = CUBDataModule(str(cub_root), image_size=64, batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    events = []
    rank = module.choose_keypoint_tokens
    monkeypatch.setattr(module, "choose_keypoint_tokens", lambda *a, **k: events.append("rank") or rank(*a, **k))
    teardown = trainer.strategy.teardown
    monkeypatch.setattr(trainer.strategy, "teardown",
                        lambda: events.append(("teardown", (tmp_path / "embedding.safetensors").is_file())) or teardown())
    trainer.fit(module, datamodule)
    assert events == ["rank", ("teardown", True)]
