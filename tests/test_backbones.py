"""The families: added conditions, latent transforms, the condition image, reference attention, engine options."""

from __future__ import annotations

import functools
import gc
import json
import shutil
import weakref
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from lightning_modules.capture import CaptureProcessor
from lightning_modules.backbones import Engine, StableDiffusion, StableDiffusion3, StableDiffusionXL, Zero123Plus
from lightning_modules.backbones.zero123plus import ReferenceAttentionProcessor
from lightning_modules.app.errors import ConfigError


def _maps(backbone, images, context, seed=0, resolution=16):
    latents = backbone.encode(images)
    noise = backbone.sample_noise(latents, torch.Generator().manual_seed(seed))
    return backbone.attention_maps(latents, noise, context, resolution)


def _copy_with(source: Path, target: Path, subfolder: str, file: str = "config.json", **changes) -> Path:
    """A copy of a tiny model folder whose ``subfolder/file`` JSON has ``changes``."""
    shutil.copytree(source, target)
    path = target / subfolder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return target


# ---------------------------------------------------------------------------------------------- SDXL
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


@pytest.mark.parametrize("condition", ["time_ids", "text_embeds"])
def test_each_sdxl_added_condition_changes_the_maps(condition, tiny_sdxl_path, images):
    """Neither condition is a no-op: altering it alone changes the captured maps."""
    backbone = StableDiffusionXL(str(tiny_sdxl_path))
    backbone.load()
    context = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    plain = _maps(backbone, images, context)
    original = backbone.added_conditions

    def altered(*args):
        kwargs = original(*args)
        added = dict(kwargs["added_cond_kwargs"])
        added[condition] = added[condition] * 0.5
        return {"added_cond_kwargs": added}

    with mock.patch.object(backbone, "added_conditions", altered):
        changed = _maps(backbone, images, context)
    assert (changed - plain).abs().max() > 1e-4


def test_sdxl_prompt_mode_uses_text_encoder_2_once_and_frees_it(tiny_sdxl_path, images):
    encoders = []
    original = CLIPTextModelWithProjection.forward

    def counting(self, *args, **kwargs):
        encoders.append(weakref.ref(self))
        return original(self, *args, **kwargs)

    with mock.patch.object(CLIPTextModelWithProjection, "forward", counting):
        backbone = StableDiffusionXL(str(tiny_sdxl_path), pooled_embedding="prompt", prompt="a photo of a bird")
        backbone.load()
        context = torch.randn(12, 32)
        prompt_maps = _maps(backbone, images, context)
        _maps(backbone, images, context, seed=1)
    assert len(encoders) == 1
    gc.collect()
    assert encoders[0]() is None  # nothing keeps the text encoder after loading
    # The pooled embedding is text_encoder_2's for the prompt, computed here independently.
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_path, subfolder="tokenizer_2")
    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_path, subfolder="text_encoder_2")
    ids = tokenizer("a photo of a bird", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).text_embeds
    torch.testing.assert_close(backbone.pooled_prompt, expected)
    added = backbone.added_conditions(context, 2, 512)["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], expected.expand(2, -1))
    mean_mode = StableDiffusionXL(str(tiny_sdxl_path))
    mean_mode.load()
    assert (_maps(mean_mode, images, context) - prompt_maps).abs().max() > 1e-4


def test_latent_scaling_is_read_from_the_vae_config_unless_set(tiny_sdxl_path, tmp_path, images):
    folder = _copy_with(tiny_sdxl_path, tmp_path / "sdxl", "vae", scaling_factor=0.3)
    from_config = StableDiffusionXL(str(folder), engine=Engine(dtype="bfloat16"))
    from_config.load()
    assert from_config.vae.dtype == torch.float32 and from_config.unet.dtype == torch.bfloat16
    raw = from_config.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(from_config.encode(images)["latents"], raw * 0.3)
    assert _maps(from_config, images, torch.randn(12, 32)).dtype == torch.float32  # maps stay fp32 with a bf16 UNet
    overridden = StableDiffusionXL(str(folder), latent_scaling_factor=0.18215)
    overridden.load()
    torch.testing.assert_close(overridden.encode(images)["latents"], raw * 0.18215)
    with pytest.raises(ConfigError, match="latent_scaling_factor=0"):
        StableDiffusionXL(str(folder), latent_scaling_factor=0.0)


def test_sdxl_rejects_a_non_sdxl_unet_before_its_weights_load(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    with mock.patch.object(UNet2DConditionModel, "from_pretrained", side_effect=AssertionError("weights loaded")):
        with pytest.raises(ConfigError, match="not an SDXL UNet"):
            StableDiffusionXL(str(tiny_sd_path), layers=list(StableDiffusion.default_layers)).load()


# ---------------------------------------------------------------------------------------------- zero123plus
def test_zero123plus_latent_transform_and_naive_mode(tiny_zero123plus_path, tmp_path, images):
    folder = _copy_with(tiny_zero123plus_path, tmp_path / "z123", "vae", scaling_factor=0.3)
    proper = Zero123Plus(str(folder))
    proper.load()
    assert proper.context_dim == 48
    vae = proper.vae
    # zero123plus' pipeline: images scaled by 0.5 / 0.8 in [-1, 1]; latents (z * 0.3 - 0.22) * 0.75.
    raw = vae.encode((images * 2 - 1) * 0.625).latent_dist.mean
    torch.testing.assert_close(proper.encode(images)["latents"], (raw * 0.3 - 0.22) * 0.75)
    naive = Zero123Plus(str(folder), naive=True)
    naive.load()
    torch.testing.assert_close(naive.encode(images)["latents"], vae.encode(images * 2 - 1).latent_dist.mean * 0.3)


def test_the_condition_image_is_prepared_by_the_folders_feature_extractor_vae(tiny_zero123plus_path, tmp_path):
    folder = _copy_with(tiny_zero123plus_path, tmp_path / "z123", "feature_extractor_vae", "preprocessor_config.json",
                        image_mean=[0.1, 0.4, 0.6], image_std=[0.5, 0.25, 0.125],
                        size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96})
    backbone = Zero123Plus(str(folder), mode="reference_attention")
    backbone.load()
    # A uniform image of 8-bit value 153 (0.6): (0.6 - mean) / std per channel, at the processor's 96 px.
    flat = torch.full((1, 3, 64, 64), 153 / 255)
    pixels = backbone.condition_pixels(flat)
    assert pixels.shape == (1, 3, 96, 96)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([1.0, 0.8, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels, torch.tensor([1.0, 0.8, 0.0]).view(1, 3, 1, 1).expand(1, 3, 96, 96), atol=1e-5, rtol=0)
    latents = backbone.encode(flat)
    assert latents["condition_mean"].shape == (1, 4, 12, 12)
    # Encoded as the pipeline does: the processor's pixel values straight into the VAE, no scaling factor.
    posterior = backbone.vae.encode(pixels).latent_dist
    torch.testing.assert_close(latents["condition_mean"], posterior.mean)
    torch.testing.assert_close(latents["condition_std"], posterior.std)


def test_the_condition_image_is_resized_bilinearly_and_centre_cropped(tiny_zero123plus_path):
    """Against PIL directly, with v1.2's processor: a 48 x 64 image -> 512 x 682 (bilinear) -> centre crop 512
    -> (x - 0.5) / 0.8."""
    import numpy as np
    from PIL import Image

    backbone = Zero123Plus(str(tiny_zero123plus_path), mode="reference_attention")
    backbone.load()
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    u8 = (image[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    resized = np.asarray(Image.fromarray(u8).resize((682, 512), Image.BILINEAR), dtype=np.float32) / 255
    left = (682 - 512) // 2
    expected = torch.from_numpy((resized[:, left : left + 512] - 0.5) / 0.8).permute(2, 0, 1)
    torch.testing.assert_close(backbone.condition_pixels(image)[0], expected, atol=1e-5, rtol=0)


def test_reference_attention_reads_the_condition_and_only_the_read_pass_is_captured(tiny_zero123plus_path, images):
    context = torch.randn(20, 48, generator=torch.Generator().manual_seed(0))
    plain = Zero123Plus(str(tiny_zero123plus_path))
    plain.load()
    reference = Zero123Plus(str(tiny_zero123plus_path), mode="reference_attention")
    reference.load()
    latents = reference.encode(images)
    assert set(latents) == {"latents", "condition_mean", "condition_std"}
    assert latents["condition_mean"].shape[-1] == 512 // 8  # the tiny folder's processor crops 512 px, as v1.2's
    noise = reference.sample_noise(latents, torch.Generator().manual_seed(0))

    recorded, visits, modes = [], [], []
    original_maps, original_call = CaptureProcessor._maps, CaptureProcessor.__call__
    original_reference = ReferenceAttentionProcessor.__call__

    # functools.wraps keeps the signature diffusers inspects to pass the per-call ``call`` on.
    @functools.wraps(original_reference)
    def counting_reference(self, *args, call=None, **kwargs):
        modes.append(call.family["reference"].mode)
        return original_reference(self, *args, call=call, **kwargs)

    @functools.wraps(original_maps)
    def counting_maps(self, *args):
        recorded.append(self.name)
        return original_maps(self, *args)

    @functools.wraps(original_call)
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
    assert modes.count("write") > 0 and modes.count("read") == modes.count("write")

    without = plain.attention_maps({"latents": latents["latents"]}, {"latents": noise["latents"]}, context, 16)
    assert (with_reference - without).abs().max() > 1e-4
    # Nothing is left over between calls: the same inputs give the same maps again ...
    torch.testing.assert_close(reference.attention_maps(latents, noise, context, 16), with_reference)
    # ... and the condition latents alone change them.
    other = {**latents, "condition_mean": latents["condition_mean"].flip(-1)}
    assert (reference.attention_maps(other, noise, context, 16) - with_reference).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- engine
def test_float16_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="does not converge"):
        Engine(dtype="float16")
    with pytest.raises(ConfigError, match="use one of"):
        Engine(dtype="float64")


def test_engine_options_reach_the_capture_and_the_unet(tiny_sd_path):
    from lightning_modules.engine.attention import FastLayerMaps

    engine = Engine(stop_early=False, memory_efficient_maps=False, upsample_queries=True, gradient_checkpointing=True,
                    channels_last=False)
    backbone = StableDiffusion(str(tiny_sd_path), engine=engine, replace_output=True)
    backbone.load()
    capture, applied = backbone.capture, backbone.applied
    maps = capture.layer_maps
    assert (capture.stop_early, maps.memory_efficient, maps.upsample_queries, capture.replace_output) == (
        False, False, True, True)
    assert (applied.stop_early, applied.channels_last, applied.unreached) == (False, False, None)
    assert backbone.unet.is_gradient_checkpointing
    assert backbone.unet.conv_in.weight.is_contiguous()  # NCHW
    default = StableDiffusion(str(tiny_sd_path))
    default.load()
    maps = default.capture.layer_maps
    assert isinstance(maps, FastLayerMaps)
    assert (default.capture.stop_early, maps.memory_efficient, maps.upsample_queries, default.capture.replace_output,
            default.unet.is_gradient_checkpointing) == (True, True, True, False, False)
    assert default.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert default.applied.prepare(torch.zeros(1, 4, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    assert default.applied.unreached is not None  # released after the first call


FAMILIES = {
    "sd": (StableDiffusion, {}, 32),
    "sdxl": (StableDiffusionXL, {}, 32),
    "zero123plus": (Zero123Plus, {}, 48),
    "zero123plus_reference": (Zero123Plus, {"mode": "reference_attention"}, 48),
    "zero123plus_ramp": (Zero123Plus, {"mode": "reference_attention", "image_embedding": "ramp"}, 48),
    "sd3": (StableDiffusion3, {}, 48),
    "sd3_context_mean": (StableDiffusion3, {"pooled_embedding": "context_mean"}, 48),
}


@pytest.fixture(scope="module")
def family_paths(tiny_sd_path, tiny_sdxl_path, tiny_zero123plus_path, tiny_sd35_path, tmp_path_factory):
    # zero123plus with a 64 px condition image: the same code path, a fifth of the VAE work.
    small = _copy_with(tiny_zero123plus_path, tmp_path_factory.mktemp("z123") / "z123", "feature_extractor_vae",
                       "preprocessor_config.json", size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return {StableDiffusion: tiny_sd_path, StableDiffusionXL: tiny_sdxl_path, Zero123Plus: small,
            StableDiffusion3: tiny_sd35_path}


@functools.cache
def _maps_and_gradient(family: str, path: Path, stop_early: bool, checkpointing: bool, channels_last: bool = True):
    """Maps and context gradient of the second call (the first one, without gradient, frees what it never ran)."""
    cls, options, width = FAMILIES[family]
    engine = Engine(stop_early=stop_early, gradient_checkpointing=checkpointing, channels_last=channels_last)
    backbone = cls(str(path), engine=engine, **options)
    backbone.load()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    context = torch.randn(10, width, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.no_grad():
        first = _maps(backbone, images, context)
    assert (backbone.applied.released > 0) == stop_early  # every family's default layers leave a tail
    maps = _maps(backbone, images, context)
    torch.testing.assert_close(maps, first, atol=0, rtol=0)
    (maps[:, [2, 7]] * torch.linspace(0, 1, 16 * 16).view(16, 16)).sum().backward()
    return maps.detach(), context.grad


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("stop_early", [False, True])
def test_checkpointing_and_early_stop_give_the_same_maps_and_gradients(family, checkpointing, stop_early, family_paths):
    """Every family (zero123plus with and without reference attention) against the plain full forward:
    the per-call state makes a checkpointing recompute pure, and the early stop survives it, also
    after the first call has freed the weights it never ran."""
    path = family_paths[FAMILIES[family][0]]
    maps, grad = _maps_and_gradient(family, path, stop_early=False, checkpointing=False)
    assert grad.abs().sum() > 0
    other_maps, other_grad = _maps_and_gradient(family, path, stop_early=stop_early, checkpointing=checkpointing)
    torch.testing.assert_close(other_maps, maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(other_grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_channels_last_gives_the_same_maps_and_gradients(family, family_paths):
    path = family_paths[FAMILIES[family][0]]
    maps, grad = _maps_and_gradient(family, path, stop_early=True, checkpointing=False)
    nchw_maps, nchw_grad = _maps_and_gradient(family, path, stop_early=True, checkpointing=False, channels_last=False)
    torch.testing.assert_close(nchw_maps, maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(nchw_grad, grad, atol=1e-6, rtol=1e-5)


def test_channels_last_holds_each_weight_once(tiny_sd_path):
    """The loaded weights are memory-mapped from the model's files: each converted weight's original pages are
    dropped as its channels-last copy is made, and the values are those of the file."""
    from diffusers import UNet2DConditionModel

    from lightning_modules.engine.host_memory import to_channels_last

    mapped = UNet2DConditionModel.from_pretrained(str(tiny_sd_path), subfolder="unet")
    plain = {name: tensor.clone() for name, tensor in mapped.state_dict().items()}
    conv_bytes = sum(m.weight.numel() * 4 for m in mapped.modules() if isinstance(m, torch.nn.Conv2d))
    dropped = to_channels_last(mapped)
    assert 0.8 * conv_bytes < dropped <= conv_bytes  # whole pages inside each weight (the tiny weights are a few pages)
    assert all(torch.equal(mapped.state_dict()[name], tensor) for name, tensor in plain.items())
    assert mapped.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    in_memory = UNet2DConditionModel(**UNet2DConditionModel.load_config(str(tiny_sd_path), subfolder="unet"))
    assert to_channels_last(in_memory) == 0  # heap memory is freed with its tensor, never dropped by hand
    assert in_memory.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_first_call_frees_exactly_the_modules_after_the_last_captured_layer(tiny_sd_path, images):
    backbone = StableDiffusion(str(tiny_sd_path))
    backbone.load()
    unet = backbone.unet
    assert backbone.layers[-1] == "up_blocks.2.attentions.0.transformer_blocks.0.attn2"
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the default layout
    assert backbone.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    last_block = unet.up_blocks[2].attentions[0].transformer_blocks[0]
    # The last captured layer's own output is never computed: its to_v and to_out go too.
    tail = [last_block.attn2.to_v, last_block.attn2.to_out, last_block.norm3, last_block.ff, unet.up_blocks[2].attentions[0].proj_out, *unet.up_blocks[2].resnets[1:],
            *unet.up_blocks[2].attentions[1:], *(unet.up_blocks[2].upsamplers or []), *unet.up_blocks[3:],
            unet.conv_norm_out, unet.conv_out]
    expected = sum(p.numel() for module in tail for p in module.parameters())
    kept = last_block.attn2.to_q.weight.clone()
    context = torch.randn(10, backbone.context_dim, generator=torch.Generator().manual_seed(1))
    before = _maps(backbone, images, context)
    assert backbone.applied.released == expected > 0
    assert all(p.numel() == 0 for module in tail for p in module.parameters())
    assert torch.equal(last_block.attn2.to_q.weight, kept) and unet.down_blocks[0].resnets[0].conv1.weight.numel() > 0
    backbone.to(torch.float64).to(torch.float32)  # a freed module still moves (Lightning moves modules around)
    torch.testing.assert_close(_maps(backbone, images, context), before, atol=0, rtol=0)


def test_without_the_early_stop_nothing_is_freed(tiny_sd_path, images):
    backbone = StableDiffusion(str(tiny_sd_path), engine=Engine(stop_early=False))
    backbone.load()
    _maps(backbone, images, torch.randn(10, backbone.context_dim))
    assert backbone.applied.released == 0 and backbone.unet.conv_out.weight.numel() > 0
