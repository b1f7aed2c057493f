"""benchmarks/memory_model.py: each term of the formula follows its knob (tiny model, meta device: quick)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks import memory_model
from benchmarks.memory_model import Setting, count_unet, estimate, fits
from data.demo_models import TINY_VAE, sd_scheduler, tiny_sd_unet
from lightning_modules.backbones import StableDiffusion

TINY = Setting(model="tiny", image_size=64, batch_size=2, num_tokens=40, feature_upsample_res=16,
               augmentation_iterations=3)


def test_maps_weights_and_dtype_terms_are_the_formula():
    from diffusers import AutoencoderKL

    result = estimate(TINY)
    assert result["maps"] == 3 * (2 * 2) * 40 * 16**2 * 4  # three fp32 (2B, T, R^2) tensors
    # The UNet's weights less those a run's first call frees (everything after the last captured layer).
    backbone = StableDiffusion("random-tiny")
    backbone.attach(tiny_sd_unet(), AutoencoderKL(**TINY_VAE), sd_scheduler())
    zeros = {"latents": torch.zeros(1, 4, 8, 8)}
    maps = backbone.attention_maps(zeros, zeros, torch.zeros(40, backbone.context_dim), 16)
    assert maps.shape == (1, 40, 16, 16) and backbone.applied.released == 312_804  # tail parameters freed
    unet_params = sum(p.numel() for p in tiny_sd_unet().parameters()) - backbone.applied.released
    vae = AutoencoderKL(**TINY_VAE)
    vae_params = sum(p.numel() for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()])
    assert result["weights"] == 4 * (unet_params + vae_params)
    assert estimate(replace(TINY, dtype="bfloat16"))["weights"] == 2 * (unet_params + vae_params)
    terms = ("weights", "saved_activations", "maps", "backward_transient")
    assert result["training"] == sum(result[k] for k in terms)


def test_saved_activations_grow_with_batch_and_image_and_shrink_with_checkpointing_and_bf16():
    one = count_unet("tiny", 64, 2, 40, "float32")
    assert count_unet("tiny", 64, 4, 40, "float32").saved == pytest.approx(2 * one.saved, rel=0.05)
    # Twice the side: up to 4x (per-pixel tensors), less the context's keys and values, which do not grow.
    assert 3 * one.saved < count_unet("tiny", 128, 2, 40, "float32").saved < 4 * one.saved
    assert count_unet("tiny", 64, 2, 40, "bfloat16").saved == pytest.approx(one.saved / 2, rel=0.05)
    assert 0 < one.saved_checkpointed < one.saved
    checkpointed = estimate(replace(TINY, gradient_checkpointing=True))["saved_activations"]
    assert checkpointed == count_unet("tiny", 64, 4, 40, "float32").saved_checkpointed


def test_the_count_stops_at_the_last_captured_layer_and_allocates_nothing(monkeypatch):
    full = count_unet("tiny", 64, 2, 40, "float32")
    cls, unet, _ = memory_model._meta_components("tiny", "float32")
    # Capturing an earlier layer ends the forward earlier: less is kept for backward.
    monkeypatch.setattr(cls, "default_layers", ("down_blocks.1.attentions.0.transformer_blocks.0.attn2",))
    early = count_unet("tiny", 64, 2, 40, "float32")
    assert 0 < early.saved < full.saved
    # At the first cross-attention layer nothing before its keys depends on the context.
    monkeypatch.setattr(cls, "default_layers", ("down_blocks.0.attentions.0.transformer_blocks.0.attn2",))
    assert count_unet("tiny", 64, 2, 40, "float32").saved == 0
    assert all(p.device == torch.device("meta") for p in unet.parameters())


def test_a_budget_counts_the_cuda_context_and_slack():
    assert fits(21e9, 24) and not fits(21.5e9, 24)  # 21 x 1.1 + 0.5 = 23.6; 21.5 x 1.1 + 0.5 = 24.15


def test_sd35_medium_is_the_real_architecture_and_its_weights_are_what_the_backbone_keeps():
    """``--model sd35m`` on the meta device (no memory): the published config's blocks, widths and dual attention,
    the real capture path's shapes, and the formula's weights term equal to what a run keeps after its first call."""
    from benchmarks.bench import build_components
    from lightning_modules.backbones import StableDiffusion3

    cls, transformer, vae, scheduler = build_components("sd35m", torch.device("meta"))
    assert cls is StableDiffusion3 and len(transformer.transformer_blocks) == 24
    assert [i for i, block in enumerate(transformer.transformer_blocks) if block.attn2 is not None] == list(range(13))
    assert (transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim, transformer.inner_dim) == (
        4096, 2048, 24 * 64)
    total = sum(p.numel() for p in transformer.parameters())
    backbone = cls("random-sd35m")
    backbone.attach(transformer, vae, scheduler)
    assert backbone.layers == [f"transformer_blocks.{i}.attn" for i in (10, 11, 12, 13)]
    with torch.device("meta"):
        latents = backbone.encode(torch.empty(2, 3, 512, 512))
        maps = backbone.attention_maps(latents, {"latents": torch.empty(2, 16, 64, 64)}, torch.empty(500, 4096), 128)
    assert latents["latents"].shape == (2, 16, 64, 64) and maps.shape == (2, 500, 128, 128)
    kept = total - backbone.applied.released
    vae_params = sum(p.numel() for p in vae.encoder.parameters())  # SD 3's VAE has no quant_conv
    assert estimate(Setting(model="sd35m", image_size=512, batch_size=1))["weights"] == 4 * (kept + vae_params)
