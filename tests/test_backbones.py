"""SDXL and zero123plus families: added conditions, latent transforms, reference attention."""

from __future__ import annotations

from unittest import mock

import torch
from transformers import CLIPTextModelWithProjection

from lightning_modules.attention import CaptureProcessor
from lightning_modules.backbones import StableDiffusion, StableDiffusionXL, Zero123Plus
from lightning_modules.backbones.zero123plus import IMAGE_SCALE, LATENT_SCALE, LATENT_SHIFT, ReferenceAttentionProcessor


def _maps(backbone, images, context, seed=0, resolution=16):
    latents = backbone.encode(images)
    noise = backbone.sample_noise(latents, torch.Generator().manual_seed(seed))
    return backbone.attention_maps(latents, noise, context, resolution)


def test_sdxl_added_conditions_follow_the_image_size(tiny_sdxl_path):
    backbone = StableDiffusionXL(str(tiny_sdxl_path))
    backbone.load()
    assert backbone.context_dim == 32 and backbone.pooled_dim == 16
    context = torch.randn(10, 32, requires_grad=True)
    for size in (512, 1024):
        added = backbone.added_conditions(context, 3, size)["added_cond_kwargs"]
        assert added["text_embeds"].shape == (3, 16)
        assert added["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * 3
    pooled = added["text_embeds"]
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))  # context_mean is unit-norm
    torch.testing.assert_close(pooled[0], torch.nn.functional.normalize(context.mean(0)[-16:], dim=0))
    pooled.sum().backward()
    assert context.grad is not None and context.grad[:, :16].abs().sum() == 0  # only the last dims feed it


def test_sdxl_prompt_mode_calls_text_encoder_once_and_frees_it(tiny_sdxl_path, images):
    calls = []
    original = CLIPTextModelWithProjection.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    with mock.patch.object(CLIPTextModelWithProjection, "forward", counting):
        backbone = StableDiffusionXL(str(tiny_sdxl_path), pooled_embedding="prompt", prompt="a photo of a bird")
        backbone.load()
        context = torch.randn(12, 32)
        _maps(backbone, images, context)
        _maps(backbone, images, context, seed=1)
    assert len(calls) == 1
    assert backbone.pooled_prompt.shape == (1, 16)
    assert not any(isinstance(m, CLIPTextModelWithProjection) for m in backbone.modules())
    added = backbone.added_conditions(context, 2, 512)["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], backbone.pooled_prompt.expand(2, -1))


def test_sdxl_vae_scaling_comes_from_its_config_and_stays_fp32(tiny_sdxl_path, images):
    backbone = StableDiffusionXL(str(tiny_sdxl_path), dtype="bfloat16")
    backbone.load()
    assert backbone.vae.config.scaling_factor == 0.13025
    assert backbone.vae.dtype == torch.float32 and backbone.unet.dtype == torch.bfloat16
    raw = backbone.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(backbone.encode(images)["latents"], raw * 0.13025)
    maps = _maps(backbone, images, torch.randn(12, 32))
    assert maps.dtype == torch.float32  # maps stay fp32 with a bf16 UNet


def test_sdxl_rejects_a_non_sdxl_unet(tiny_sd_path):
    import pytest

    with pytest.raises(ValueError, match="not an SDXL UNet"):
        StableDiffusionXL(str(tiny_sd_path), layers=list(StableDiffusion.default_layers)).load()


def test_zero123plus_latent_transform_and_naive_mode(tiny_zero123plus_path, images):
    proper = Zero123Plus(str(tiny_zero123plus_path))
    proper.load()
    assert proper.context_dim == 48
    sf = proper.vae.config.scaling_factor
    raw = proper.vae.encode((images * 2 - 1) * IMAGE_SCALE).latent_dist.mean
    torch.testing.assert_close(proper.encode(images)["latents"], (raw * sf - LATENT_SHIFT) * LATENT_SCALE)
    naive = Zero123Plus(str(tiny_zero123plus_path), naive=True)
    naive.load()
    torch.testing.assert_close(naive.encode(images)["latents"], proper.vae.encode(images * 2 - 1).latent_dist.mean * sf)


def test_reference_attention_changes_maps_and_only_the_read_pass_is_captured(tiny_zero123plus_path, images):
    context = torch.randn(20, 48, generator=torch.Generator().manual_seed(0))
    plain = Zero123Plus(str(tiny_zero123plus_path))
    plain.load()
    reference = Zero123Plus(str(tiny_zero123plus_path), mode="reference_attention")
    reference.load()
    latents = reference.encode(images)
    assert set(latents) == {"latents", "condition"}
    assert latents["condition"].shape[-1] == 320 // 8  # the condition image is encoded at 320 px
    noise = reference.sample_noise(latents, torch.Generator().manual_seed(0))

    recorded, visits, reference_modes = [], [], []
    original_maps, original_call = CaptureProcessor._maps, CaptureProcessor.__call__
    original_reference = ReferenceAttentionProcessor.__call__

    def counting_reference(self, *args, **kwargs):
        reference_modes.append(self.mode[0])
        return original_reference(self, *args, **kwargs)

    def counting_maps(self, *args):
        recorded.append(self.name)
        return original_maps(self, *args)

    def counting_call(self, *args, **kwargs):
        visits.append(self.name)
        return original_call(self, *args, **kwargs)

    with mock.patch.object(CaptureProcessor, "_maps", counting_maps), mock.patch.object(
        CaptureProcessor, "__call__", counting_call
    ), mock.patch.object(ReferenceAttentionProcessor, "__call__", counting_reference):
        with_reference = reference.attention_maps(latents, noise, context, 16)
    layers = list(reference.layers)
    assert visits == layers + layers  # write pass, then read pass
    assert recorded == layers  # maps from the read pass only
    writes, reads = reference_modes.count("write"), reference_modes.count("read")
    assert writes > 0 and reads == writes  # every self-attention read what the write pass stored
    assert not reference._reference_store  # freed after the call

    without = plain.attention_maps({"latents": latents["latents"]}, {"latents": noise["latents"]}, context, 16)
    assert with_reference.shape == without.shape
    assert not torch.allclose(with_reference, without, atol=1e-4)
    # The reference store is cleared per call: the same inputs give the same maps again.
    torch.testing.assert_close(reference.attention_maps(latents, noise, context, 16), with_reference)


def test_float16_is_refused_with_the_reason():
    import pytest

    with pytest.raises(ValueError, match="does not converge"):
        StableDiffusion("unused", dtype="float16")
