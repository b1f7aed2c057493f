"""zero123plus conditions as its pipeline does: a seeded posterior sample, the ramped CLIP image embedding.

The pipeline (SUDO-AI-3D/zero123plus, ``diffusers-support/pipeline.py``) is described here, not run:
``encode_condition_image`` samples the VAE posterior, ``RefOnlyNoisedUNet`` noises that sample and runs
a write pass whose self-attention inputs its read pass attends to, and the attn2 context is the text
embedding plus ``ramping_coefficients`` x the condition image's CLIP image embedding. The last test
builds all of that from diffusers and transformers modules and compares the captured maps.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from lightning_modules.capture import CaptureProcessor
from lightning_modules.backbones import Zero123Plus
from lightning_modules.app.errors import ConfigError, MissingFileError

# Computed once with this module's code on the tiny model (data.demo_models, seed 0): the first image of
# ``_images()``, its generator ``torch.Generator().manual_seed(0)``; ``condition[0, 0, 0, :4]``.
CONDITION_SAMPLE = [-1.000648021697998, -0.9822231531143188, -0.2731022238731384, -0.32989752292633057]
CONDITION_MEAN = [0.04335334897041321, 0.11263588070869446, -0.049337804317474365, 0.10197629034519196]


def _images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@functools.cache
def _backbone(path: Path, **options) -> Zero123Plus:
    backbone = Zero123Plus(str(path), mode="reference_attention", **options)
    backbone.load()
    return backbone


def _pil(images: torch.Tensor) -> list[Image.Image]:
    """What the pipeline is given: 8-bit RGB PIL images."""
    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in u8]


# ---------------------------------------------------------------------------------------------- the draw
def test_the_condition_latent_is_a_posterior_sample_from_the_images_generator(tiny_zero123plus_path):
    backbone = _backbone(tiny_zero123plus_path)
    image = _images()[:1]
    latents = backbone.encode(image)
    assert set(latents) == {"latents", "condition_mean", "condition_std"}
    noise = backbone.sample_noise(latents, _generators(0))
    condition = backbone.condition_latents(latents, noise)
    torch.testing.assert_close(condition[0, 0, 0, :4], torch.tensor(CONDITION_SAMPLE), atol=1e-5, rtol=0)
    torch.testing.assert_close(latents["condition_mean"][0, 0, 0, :4], torch.tensor(CONDITION_MEAN), atol=1e-6, rtol=0)
    # The pipeline's ``latent_dist.sample(generator)`` with a fresh generator in the same state.
    pixels = CLIPImageProcessorPil.from_pretrained(tiny_zero123plus_path, subfolder="feature_extractor_vae")(
        images=_pil(image), return_tensors="pt").pixel_values
    vae = AutoencoderKL.from_pretrained(tiny_zero123plus_path, subfolder="vae")
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    # (To the VAE's float error: the backbone runs it channels_last, a different summation order.)
    sample = posterior.sample(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(condition, sample, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(latents["condition_std"], posterior.std, atol=1e-4, rtol=1e-4)
    # Another seed, another sample of the same posterior.
    other = backbone.condition_latents(latents, backbone.sample_noise(latents, _generators(1)))
    assert (other - condition).abs().max() > 0.1
    mean_mode = _backbone(tiny_zero123plus_path, condition_latent="mean")
    mean_latents = mean_mode.encode(image)
    assert set(mean_latents) == {"latents", "condition_mean"}
    mean_noise = mean_mode.sample_noise(mean_latents, _generators(0))
    torch.testing.assert_close(mean_mode.condition_latents(mean_latents, mean_noise), latents["condition_mean"])


def test_the_draws_come_in_the_pipelines_order_and_leave_the_targets_noise_of_the_other_modes(tiny_zero123plus_64_path):
    """Per image: the posterior's eps, the target's noise, the write pass's noise. Without the posterior
    draw (condition_latent: mean, weights_only) the target's noise is the generator's first draw, as for SD."""
    images = _images(2)
    backbone = _backbone(tiny_zero123plus_64_path)
    latents = backbone.encode(images)
    noise = backbone.sample_noise(latents, _generators(3, 4))
    assert list(noise) == ["condition_posterior", "latents", "condition"]
    for row, generator in enumerate(_generators(3, 4)):
        for name in noise:
            assert torch.equal(noise[name][row], torch.randn(noise[name].shape[1:], generator=generator)), name
    # One generator for the batch: whole-batch draws in the same order (what ``torch.manual_seed(seed)``
    # before the pipeline's ``encode_condition_image`` reproduces on the CPU).
    batch_noise = backbone.sample_noise(latents, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    for name in batch_noise:
        assert torch.equal(batch_noise[name], torch.randn(batch_noise[name].shape, generator=generator)), name

    weights_only = Zero123Plus(str(tiny_zero123plus_64_path))
    weights_only.load()
    plain = weights_only.sample_noise(weights_only.encode(images), _generators(3, 4))
    assert list(plain) == ["latents"]
    mean_mode = _backbone(tiny_zero123plus_64_path, condition_latent="mean")
    mean_noise = mean_mode.sample_noise(mean_mode.encode(images), _generators(3, 4))
    assert list(mean_noise) == ["latents", "condition"]
    assert torch.equal(mean_noise["latents"], plain["latents"])
    assert torch.equal(plain["latents"][0], torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_an_image_gets_the_same_draw_and_maps_in_a_batch_of_1_and_of_3(tiny_zero123plus_64_path):
    backbone = _backbone(tiny_zero123plus_64_path)
    images = _images(3)
    context = torch.randn(20, 48, generator=torch.Generator().manual_seed(0))
    alone = backbone.encode(images[1:2])
    alone_noise = backbone.sample_noise(alone, _generators(7))
    batch = backbone.encode(images)
    batch_noise = backbone.sample_noise(batch, _generators(5, 7, 9))
    for name in alone_noise:
        assert torch.equal(batch_noise[name][1], alone_noise[name][0]), name
    torch.testing.assert_close(backbone.condition_latents(batch, batch_noise)[1],
                               backbone.condition_latents(alone, alone_noise)[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(backbone.attention_maps(batch, batch_noise, context, 16)[1],
                               backbone.attention_maps(alone, alone_noise, context, 16)[0], atol=1e-6, rtol=1e-5)


def test_sampling_the_condition_changes_the_maps(tiny_zero123plus_64_path):
    images = _images(2)
    context = torch.randn(20, 48, generator=torch.Generator().manual_seed(0))
    maps = {}
    for option in ("sample", "mean"):
        backbone = _backbone(tiny_zero123plus_64_path, condition_latent=option)
        latents = backbone.encode(images)
        maps[option] = backbone.attention_maps(latents, backbone.sample_noise(latents, _generators(0, 1)), context, 16)
    assert (maps["sample"] - maps["mean"]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- the image embedding
def test_the_ramped_image_embedding_is_added_to_the_first_77_tokens(tiny_zero123plus_64_path):
    backbone = _backbone(tiny_zero123plus_64_path, image_embedding="ramp")
    ramp = torch.tensor(json.loads((tiny_zero123plus_64_path / "model_index.json").read_text())["ramping_coefficients"])
    assert ramp.shape == (77,)
    torch.testing.assert_close(backbone.ramp, ramp, atol=0, rtol=0)
    images = _images(2)
    latents = backbone.encode(images)
    # The vision encoder on what feature_extractor_clip makes of the 8-bit image, as the pipeline feeds it.
    processor = CLIPImageProcessorPil.from_pretrained(tiny_zero123plus_64_path, subfolder="feature_extractor_clip")
    pixels = processor(images=_pil(images), return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 224, 224)
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_zero123plus_64_path, subfolder="vision_encoder")
    with torch.no_grad():
        embeds = encoder(pixels).image_embeds
    torch.testing.assert_close(latents["image_embeds"], embeds, atol=1e-6, rtol=1e-5)

    long = torch.randn(100, 48)
    ramped = backbone.ramped_context(long, embeds)
    assert ramped.shape == (2, 100, 48)
    torch.testing.assert_close(ramped[:, :77], long[:77] + embeds[:, None] * ramp[:, None], atol=0, rtol=0)
    assert torch.equal(ramped[:, 77:], long[77:].expand(2, -1, -1))  # nothing beyond the pipeline's 77 positions
    short = torch.randn(20, 48)  # fewer tokens than coefficients: the first 20 coefficients
    torch.testing.assert_close(backbone.ramped_context(short, embeds), short + embeds[:, None] * ramp[:20, None],
                               atol=0, rtol=0)

    context = torch.randn(30, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    noise = backbone.sample_noise(latents, _generators(0, 1))
    with_ramp = backbone.attention_maps(latents, noise, context, 16)
    without = _backbone(tiny_zero123plus_64_path).attention_maps(
        {name: latents[name] for name in ("latents", "condition_mean", "condition_std")}, noise, context, 16)
    assert (with_ramp - without).abs().max() > 1e-4
    with_ramp[:, :3].sum().backward()
    assert context.grad[:3].abs().sum() > 0  # the context still trains through the ramped tokens


def test_image_embedding_options_are_checked(tiny_zero123plus_path, tmp_path):
    with pytest.raises(ConfigError, match="needs mode='reference_attention'"):
        Zero123Plus(str(tiny_zero123plus_path), image_embedding="ramp")
    with pytest.raises(ConfigError, match="naive=True"):
        Zero123Plus(str(tiny_zero123plus_path), mode="reference_attention", naive=True, image_embedding="ramp")
    with pytest.raises(ConfigError, match="use 'none' or 'ramp'"):
        Zero123Plus(str(tiny_zero123plus_path), image_embedding="clip")
    with pytest.raises(ConfigError, match="use 'sample' or 'mean'"):
        Zero123Plus(str(tiny_zero123plus_path), condition_latent="mode")
    no_encoder = tmp_path / "no_encoder"
    shutil.copytree(tiny_zero123plus_path, no_encoder)
    shutil.rmtree(no_encoder / "vision_encoder")
    with pytest.raises(MissingFileError, match="no vision_encoder/ folder"):
        Zero123Plus(str(no_encoder), mode="reference_attention", image_embedding="ramp").load()
    Zero123Plus(str(no_encoder), mode="reference_attention").load()  # the default needs no encoder
    no_index = tmp_path / "no_index"
    shutil.copytree(tiny_zero123plus_path, no_index)
    (no_index / "model_index.json").unlink()
    with pytest.raises(MissingFileError, match="cannot read model_index.json"):
        Zero123Plus(str(no_index), mode="reference_attention", image_embedding="ramp").load()


def test_the_tiny_models_condition_processor_is_the_one_v1_2_ships(tiny_zero123plus_path):
    """sudo-ai/zero123plus-v1.2's feature_extractor_vae/preprocessor_config.json, as published."""
    config = json.loads((tiny_zero123plus_path / "feature_extractor_vae" / "preprocessor_config.json").read_text())
    v1_2 = {"crop_size": {"height": 512, "width": 512}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": 0.5,
            "image_processor_type": "CLIPImageProcessor", "image_std": 0.8, "resample": 2,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 512}}
    assert {key: config[key] for key in v1_2} == v1_2


# ---------------------------------------------------------------------------------------------- against the pipeline
class _PipelineProcessor:
    """The pipeline's ``ReferenceOnlyAttnProc`` (attn1: store the write pass's input, read it back concatenated
    in the read pass) on diffusers' default processor, recording what enters the captured attn2 layers."""

    def __init__(self, name: str, state: dict) -> None:
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        state = self.state
        if self.name.endswith("attn1"):
            own = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if state["mode"] == "w":
                state["reference"][self.name] = own
            else:
                encoder_hidden_states = torch.cat([own, state["reference"].pop(self.name)], dim=1)
        elif state["mode"] == "r" and self.name in state["captured"]:
            state["captured"][self.name] = (attn, hidden_states, encoder_hidden_states)
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _plain_maps(attn, hidden_states: torch.Tensor, context: torch.Tensor, resolution: int) -> torch.Tensor:
    """SPEC section 2 step 5 in plain torch: (B, N, C) features, (B, T, D) context -> (B, T, R, R)."""
    batch, length, channels = hidden_states.shape
    side = round(length**0.5)
    grid = hidden_states.transpose(1, 2).reshape(batch, channels, side, side)
    upsampled = F.interpolate(grid, size=(resolution, resolution), mode="bicubic", align_corners=False)
    q = attn.to_q(upsampled.flatten(2).transpose(1, 2))
    k = attn.to_k(context)
    heads = attn.heads
    q = q.view(batch, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(batch, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)  # (B, R*R, T)
    return probs.transpose(1, 2).reshape(batch, -1, resolution, resolution)


@pytest.mark.parametrize("draw", ["global_seed", "per_image"])
def test_the_maps_equal_the_pipelines_conditioning_at_every_captured_layer(draw, tiny_zero123plus_path):
    """The pipeline's conditioning built here from diffusers/transformers modules: its condition pixels,
    ``latent_dist.sample`` with the same draw, the noised write pass and the read pass of
    ``RefOnlyNoisedUNet``, ``text + ramp x image_embeds`` as the attn2 context (the learned context as the
    text, 77 tokens as in the pipeline), the target latents of ``scale_image``/``scale_latents``, DDIM's
    noising at the project's timestep. Every captured layer's maps equal the backbone's to 1e-5."""
    folder, resolution = tiny_zero123plus_path, 16
    images = _images(2)
    context = torch.randn(77, 48, generator=torch.Generator().manual_seed(2))
    seeds = (11, 12)

    backbone = _backbone(folder, image_embedding="ramp")
    recorded = {}
    original_maps = CaptureProcessor._maps

    @functools.wraps(original_maps)
    def recording(self, *args):
        maps, output = original_maps(self, *args)
        recorded[self.name] = maps.detach().clone()  # the capture sums the layers into the first one's tensor
        return maps, output

    latents = backbone.encode(images)
    generator = torch.Generator().manual_seed(seeds[0]) if draw == "global_seed" else _generators(*seeds)
    noise = backbone.sample_noise(latents, generator)
    with mock.patch.object(CaptureProcessor, "_maps", recording):
        ours = backbone.attention_maps(latents, noise, context, resolution)

    # ---- the pipeline's side, from the folder's own components
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder, subfolder="vision_encoder").eval()
    ramping = json.loads((folder / "model_index.json").read_text())["ramping_coefficients"]
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(50)
    timestep = scheduler.timesteps[-1]
    pil = _pil(images)
    image_1, image_2 = (
        CLIPImageProcessorPil.from_pretrained(folder, subfolder=subfolder)(images=pil, return_tensors="pt").pixel_values
        for subfolder in ("feature_extractor_vae", "feature_extractor_clip")
    )
    with torch.no_grad(), torch.random.fork_rng():
        # scale_image, then scale_latents of the posterior mean: the project's target latents.
        target = (vae.encode((images * 2 - 1) * 0.5 / 0.8).latent_dist.mean * vae.config.scaling_factor - 0.22) * 0.75
        # encode_condition_image's sample, then the target's noise, then RefOnlyNoisedUNet's noise of cond_lat.
        # (Its ``randn_like(cond_lat)`` lays the same numbers out in cond_lat's memory order, which is
        # channels_last out of diffusers' VAE on the CPU; the project draws in index order, as randn(shape).)
        if draw == "global_seed":
            torch.manual_seed(seeds[0])
            cond_lat = vae.encode(image_1).latent_dist.sample()
            target_noise = torch.randn(target.shape)
            cond_noise = torch.randn(cond_lat.shape)
        else:
            generators = _generators(*seeds)
            cond_lat = vae.encode(image_1).latent_dist.sample(generator=generators)
            target_noise = torch.stack([torch.randn(target.shape[1:], generator=g) for g in generators])
            cond_noise = torch.stack([torch.randn(cond_lat.shape[1:], generator=g) for g in generators])
        global_embeds = encoder(image_2).image_embeds.unsqueeze(-2)
        ramp = global_embeds.new_tensor(ramping).unsqueeze(-1)
        encoder_hidden_states = context.unsqueeze(0) + global_embeds * ramp

        state = {"mode": "w", "reference": {}, "captured": dict.fromkeys(backbone.layers)}
        unet.set_attn_processor({key: _PipelineProcessor(key.removesuffix(".processor"), state)
                                 for key in unet.attn_processors})
        unet(scheduler.add_noise(cond_lat, cond_noise, timestep), timestep, encoder_hidden_states=encoder_hidden_states)
        state["mode"] = "r"
        unet(scheduler.add_noise(target, target_noise, timestep), timestep, encoder_hidden_states=encoder_hidden_states)
        expected = {name: _plain_maps(*state["captured"][name], resolution) for name in backbone.layers}

    assert sorted(recorded) == sorted(backbone.layers)
    for name in backbone.layers:
        got = recorded[name].transpose(1, 2).reshape(expected[name].shape)
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(ours, sum(expected.values()) / len(expected), atol=1e-5, rtol=0)
