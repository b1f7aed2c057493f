"""Stable Diffusion 3 / 3.5 (backbones/sd3.py): maps, gradients, noise, layers and options on tiny random transformers.

The maps are checked against the joint attention written out here with each captured block's own
weights, on two folders: the demo's SD 3.5 medium-shaped model (per-head RMSNorm, dual attention,
patch 2) and one built from the configs of diffusers' own SD 3 pipeline tests (no query/key norm,
patch 1, a one-level VAE), whose three subfolders are all it has.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from lightning_modules.app.errors import ConfigError
from lightning_modules.backbones import Engine, StableDiffusion3
from lightning_modules.backbones.sd3 import calculate_shift
from lightning_modules.engine import compiled_blocks
from tests.conftest import REPO

#: The demo model's VAE latent transform (data/demo_models.py writes SD 3's values into vae/config.json).
SHIFT, SCALE = 0.0609, 1.5305


@pytest.fixture(scope="module")
def plain_sd3_path(tmp_path_factory) -> Path:
    """transformer/, vae/ and scheduler/ from diffusers' SD 3 pipeline-test configs, with 16 latent channels."""
    folder = tmp_path_factory.mktemp("sd3") / "plain"
    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=16, num_layers=2, attention_head_dim=8,
                          num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                          pooled_projection_dim=64, out_channels=16).save_pretrained(folder / "transformer")
    AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                  latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                  shift_factor=SHIFT, scaling_factor=SCALE).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture
def folders(tiny_sd35_path, plain_sd3_path) -> dict:
    """folder -> (image side in pixels, context width): 64 px is a 4 x 4 patch grid for the demo model, 8 px an 8 x 8 one."""
    return {"demo": (tiny_sd35_path, 64, 48), "plain": (plain_sd3_path, 8, 32)}


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """diffusers' RMSNorm written out: x / sqrt(mean(x^2) + eps) * weight over the head dimension."""
    if norm is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _joint_attention_maps(attn, image: torch.Tensor, text: torch.Tensor, resolution: int) -> torch.Tensor:
    """image (B, N, C), text (B, T, C): what the block's joint attention receives -> (B, R*R, T).

    The image tokens' grid upsampled bicubically to R x R, the block's to_q and norm_q; the context stream's
    add_k_proj and norm_added_k; softmax(q k^T / sqrt(d)) over the T context tokens, averaged over heads."""
    batch, tokens, channels = image.shape
    side = math.isqrt(tokens)
    grid = image.transpose(1, 2).reshape(batch, channels, side, side)
    image = F.interpolate(grid, size=(resolution, resolution), mode="bicubic", align_corners=False)
    image = image.flatten(2).transpose(1, 2)
    heads = attn.heads
    q = image @ attn.to_q.weight.T + attn.to_q.bias
    k = text @ attn.add_k_proj.weight.T + attn.add_k_proj.bias
    q = _rms_norm(q.view(batch, resolution**2, heads, -1).transpose(1, 2), attn.norm_q)
    k = _rms_norm(k.view(batch, text.shape[1], heads, -1).transpose(1, 2), attn.norm_added_k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1).mean(dim=1)


def _explicit_maps(folder: Path, layers: list[str], images: torch.Tensor, eps: torch.Tensor, context: torch.Tensor,
                   resolution: int) -> torch.Tensor:
    """SD 3's pipeline written out with diffusers' modules: the latent transform, flow matching at the least noisy
    sigma of the 50-step grid, the plain transformer (pooled projections of zeros), the maps of the captured blocks."""
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer").requires_grad_(False)
    with torch.no_grad():
        z = (vae.encode(images * 2 - 1).latent_dist.mean - SHIFT) * SCALE
    # shift 3, 50 steps: the grid's last sigma is shift(shift(1 / 1000)) = 1 / 112 (sigmas shifted once at the
    # scheduler's construction, then again by set_timesteps, as SD 3's pipeline runs it).
    sigma = 1 / 112
    noisy = (1 - sigma) * z + sigma * eps
    batch = len(images)
    seen = {}

    def record(module, args, kwargs, name):
        seen[name] = kwargs["hidden_states"], kwargs["encoder_hidden_states"]

    hooks = [transformer.get_submodule(name).register_forward_pre_hook(lambda m, a, k, name=name: record(m, a, k, name),
                                                                       with_kwargs=True) for name in layers]
    transformer(noisy, encoder_hidden_states=context.expand(batch, -1, -1), timestep=torch.full((batch,), 1000 / 112),
                pooled_projections=torch.zeros(batch, transformer.config.pooled_projection_dim), return_dict=False)
    for hook in hooks:
        hook.remove()
    maps = sum(_joint_attention_maps(transformer.get_submodule(name), *seen[name], resolution) for name in layers)
    return (maps / len(layers)).transpose(1, 2).reshape(batch, len(context), resolution, resolution)


ENGINES = {
    "default": Engine(),  # memory-efficient head mean, queries upsampled after to_q, early stop, channels-last
    "plain math": Engine(memory_efficient_maps=False, upsample_queries=False, stop_early=False, channels_last=False),
    "memory-efficient, features upsampled": Engine(memory_efficient_maps=True, upsample_queries=False),
}


@pytest.mark.parametrize("folder", ["demo", "plain"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_maps_and_gradient_equal_the_joint_attention_written_out(folder, engine, folders):
    path, side, width = folders[folder]
    backbone = StableDiffusion3(str(path), engine=ENGINES[engine])
    backbone.load()
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    context = torch.randn(10, width, generator=torch.Generator().manual_seed(1), requires_grad=True)
    latents = backbone.encode(images)
    noise = backbone.sample_noise(latents, torch.Generator().manual_seed(2))
    maps = backbone.attention_maps(latents, noise, context, 16)
    # The loss reads a few tokens, as the method's does (the head mean's sparse backward).
    weight = torch.zeros(2, 10, 16, 16)
    weight[:, [3, 7]] = torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    (maps * weight).sum().backward()
    grad, context.grad = context.grad, None

    expected = _explicit_maps(path, backbone.layers, images, noise["latents"], context, 16)
    (expected * weight).sum().backward()
    assert backbone.layers == {"demo": [f"transformer_blocks.{i}.attn" for i in (1, 2, 3, 4)],
                               "plain": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]}[folder]
    torch.testing.assert_close(maps, expected.detach(), atol=1e-6, rtol=0)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, context.grad, atol=1e-6, rtol=1e-5)


def test_latents_are_the_shifted_and_scaled_posterior_mean(tiny_sd35_path, images):
    backbone = StableDiffusion3(str(tiny_sd35_path))
    backbone.load()
    vae = AutoencoderKL.from_pretrained(tiny_sd35_path / "vae")
    with torch.no_grad():
        expected = (vae.encode(images * 2 - 1).latent_dist.mean - 0.0609) * 1.5305
    latents = backbone.encode(images)["latents"]
    assert latents.shape == (2, 16, 8, 8) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, expected)


def test_noise_is_flow_matching_at_the_scheduler_sigma(tiny_sd35_path, tmp_path):
    backbone = StableDiffusion3(str(tiny_sd35_path))
    backbone.load()
    sigma, timestep = backbone.noise_at(16)
    assert sigma.item() == pytest.approx(1 / 112, rel=1e-6) and timestep.item() == pytest.approx(1000 / 112, rel=1e-6)
    z, eps = torch.ones(1, 16, 8, 8), torch.full((1, 16, 8, 8), 2.0)
    torch.testing.assert_close(backbone.add_noise(z, eps), torch.full_like(z, 1 + 1 / 112))  # (1 - s) * 1 + s * 2

    # noise_level -2: the grid's points are t = 1 - i (1 - s0) / 49 of s0 = shift(1/1000), each shifted again.
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    s0 = shift(1 / 1000)
    second = StableDiffusion3(str(tiny_sd35_path), noise_level=-2)
    second.load()
    assert second.noise_at(16)[0].item() == pytest.approx(shift(s0 + (1 - s0) / 49), rel=1e-5)
    with pytest.raises(ValueError, match=r"noise_level=50 with num_inference_steps=50: .*use -50\.\.49"):
        StableDiffusion3(str(tiny_sd35_path), noise_level=50).load()

    # A scheduler with dynamic shifting: its grid depends on the image's patch count, as the pipeline's does.
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as pipeline_shift

    dynamic = StableDiffusion3(str(tiny_sd35_path))
    dynamic.load()
    dynamic.set_noise_schedule(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)  # base_shift + slope * (tokens - base_image_seq_len)
    assert calculate_shift(16, 256, 4096, 0.5, 1.15) == pytest.approx(mu) == pytest.approx(pipeline_shift(16))
    # The exponential time shift of the last point t = 1/1000: e^mu / (e^mu + (1/t - 1)).
    assert dynamic.noise_at(16)[0].item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 999), rel=1e-5)
    assert dynamic.noise_at(1024)[0].item() > dynamic.noise_at(16)[0].item()


@pytest.mark.parametrize("blocks, expected", [(24, range(10, 14)), (38, range(17, 21)), (6, range(1, 5)),
                                              (2, range(0, 2)), (1, range(0, 1))])
def test_default_layers_are_the_four_joint_attentions_around_the_middle(blocks, expected):
    layers = StableDiffusion3("unused").default_layers_of({"num_layers": blocks})
    assert layers == tuple(f"transformer_blocks.{i}.attn" for i in expected)


@pytest.mark.parametrize("layer", ["transformer_blocks.0.attn2", "up_blocks.1.attentions.0.transformer_blocks.0.attn2"])
def test_a_layer_that_is_not_a_joint_attention_is_refused_before_the_weights_load(layer, tiny_sd35_path):
    backbone = StableDiffusion3(str(tiny_sd35_path), layers=[layer])
    with mock.patch.object(SD3Transformer2DModel, "from_pretrained", side_effect=AssertionError("weights loaded")):
        with pytest.raises(ConfigError) as error:
            backbone.load()
    message = str(error.value)
    assert layer in message and "transformer_blocks.5.attn" in message  # the valid names are listed
    assert "transformer_blocks.0.attn2'," not in message.split("Valid names:")[1]  # attn2 is never valid
    image_only = "image-only self-attention layers (attn2 of MMDiT-X's dual attention"
    assert (image_only in message) == (layer == "transformer_blocks.0.attn2")
    if layer == "transformer_blocks.0.attn2":
        assert "capture ['transformer_blocks.0.attn']" in message


def test_the_signature_names_the_family_width_and_layers_before_the_weights_load(tiny_sd35_path):
    backbone = StableDiffusion3(str(tiny_sd35_path))
    with mock.patch.object(SD3Transformer2DModel, "from_pretrained", side_effect=AssertionError("weights loaded")):
        signature = backbone.signature(num_tokens=7, feature_upsample_res=16)
    assert (signature.family, signature.width, signature.num_tokens) == ("StableDiffusion3", 48, 7)
    assert signature.layers == tuple(f"transformer_blocks.{i}.attn" for i in (1, 2, 3, 4))
    assert backbone.configured_context_dim() == 48  # transformer/config.json's joint_attention_dim
    hub = StableDiffusion3("stabilityai/stable-diffusion-3.5-medium").signature()
    assert (hub.family, hub.layers, hub.width) == ("StableDiffusion3", None, None)  # known once loaded


@pytest.mark.parametrize("folder", ["demo", "plain"])
def test_pooled_projections_are_zeros_or_the_context_mean(folder, folders):
    path, _, width = folders[folder]
    context = torch.randn(5, width, generator=torch.Generator().manual_seed(0))
    zeros = StableDiffusion3(str(path))
    zeros.load()
    pooled_dim = {"demo": 32, "plain": 64}[folder]
    torch.testing.assert_close(zeros.pooled_projections(context, 3), torch.zeros(3, pooled_dim))
    mean = StableDiffusion3(str(path), pooled_embedding="context_mean")
    mean.load()
    pooled = mean.pooled_projections(context, 3)
    assert pooled.shape == (3, pooled_dim)
    if width >= pooled_dim:  # the first pooled_dim channels of the mean
        torch.testing.assert_close(pooled[1], context.mean(dim=0)[:pooled_dim])
    else:  # the mean, zero-padded
        torch.testing.assert_close(pooled[1], torch.cat([context.mean(dim=0), torch.zeros(pooled_dim - width)]))


def test_options_that_do_not_apply_are_refused_and_bf16_runs_the_transformer_only(tiny_sd35_path, images):
    with pytest.raises(ConfigError, match="replace_output=true .* Set replace_output: false"):
        StableDiffusion3(str(tiny_sd35_path), replace_output=True)
    with pytest.raises(ConfigError, match="pooled_embedding='prompt': use 'zeros' or 'context_mean'"):
        StableDiffusion3(str(tiny_sd35_path), pooled_embedding="prompt")
    backbone = StableDiffusion3(str(tiny_sd35_path))
    backbone.load()
    assert compiled_blocks(backbone.denoiser) == list(backbone.denoiser.transformer_blocks)  # compile_unet's blocks
    with pytest.raises(ConfigError, match="pos_embed_max_size=32: use at most 512 px"):
        backbone.patch_grid(torch.zeros(1, 16, 66, 66))
    with pytest.raises(ConfigError, match="whose side is a multiple of 16 px"):
        backbone.patch_grid(torch.zeros(1, 16, 9, 9))

    half = StableDiffusion3(str(tiny_sd35_path), engine=Engine(dtype="bfloat16"))
    half.load()
    context = torch.randn(10, 48, generator=torch.Generator().manual_seed(1))
    maps = {}
    for name, model in (("fp32", backbone), ("bf16", half)):
        latents = model.encode(images)
        maps[name] = model.attention_maps(latents, model.sample_noise(latents, torch.Generator().manual_seed(0)), context, 16)
    assert half.denoiser.dtype == torch.bfloat16 and maps["bf16"].dtype == torch.float32
    torch.testing.assert_close(maps["bf16"], maps["fp32"], atol=2e-2, rtol=0)


def test_the_demo_writer_writes_only_transformer_vae_and_scheduler(tiny_sd35_path):
    import json

    assert sorted(p.name for p in tiny_sd35_path.iterdir()) == ["scheduler", "transformer", "vae"]
    config = json.loads((tiny_sd35_path / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["qk_norm"], config["dual_attention_layers"]) == (16, "rms_norm", [0, 1])
    vae = json.loads((tiny_sd35_path / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["shift_factor"], vae["scaling_factor"]) == (16, SHIFT, SCALE)
    scheduler = json.loads((tiny_sd35_path / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["shift"]) == ("FlowMatchEulerDiscreteScheduler", 3.0)


# ------------------------------------------------------------------------------------------ the CLI
DEMO = ("--config", str(REPO / "conf" / "demo.yaml"), "--config", str(REPO / "conf" / "demo" / "sd35.yaml"))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _demo(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [*DEMO, "--model.backbone.init_args.pretrained_model_name_or_path", str(model), "--data.init_args.root",
            str(data), "--trainer.default_root_dir", str(out), "--model.num_indices", "4",
            "--model.augmentation_iterations", "2", "--trainer.logger", "false", "--data.init_args.image_size", "64",
            "--model.feature_upsample_res", "16", *extra]


@pytest.mark.slow
def test_fit_test_and_predict_through_the_cli_and_every_artifact_names_the_family(tiny_sd35_path, cub_root, tmp_path):
    import json

    from safetensors import safe_open

    from lightning_modules.app.checkpoints import RECORD_KEY

    fit = _run("fit", *_demo(tiny_sd35_path, cub_root, tmp_path, "--trainer.max_steps", "2"))
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    layers = [f"transformer_blocks.{i}.attn" for i in (1, 2, 3, 4)]
    with safe_open(str(run / "embedding.safetensors"), "pt") as file:
        assert file.get_tensor("context").shape == (100, 48)
        assert (file.metadata()["family"], file.metadata()["layers"]) == ("StableDiffusion3", ",".join(layers))
    last = run / "checkpoints" / "last.ckpt"
    record = torch.load(last, map_location="cpu", weights_only=False)[RECORD_KEY]
    assert (record["family"], record["layers"], record["context_shape"]) == ("StableDiffusion3", layers, [100, 48])

    test = _run("test", *_demo(tiny_sd35_path, cub_root, tmp_path, "--ckpt_path", str(last)))
    assert test.returncode == 0, test.stderr[-3000:]
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert (metrics["num_regression_images"], metrics["num_test_images"]) == (18, 9) and 0 <= metrics["value"] < 100

    image = sorted((cub_root / "images" / "001.Synthetic_Bird_1").glob("*.jpg"))[0]
    predict = _run("predict", *_demo(tiny_sd35_path, cub_root, tmp_path, "--ckpt_path", str(last),
                                     "--data.init_args.path", str(image)))
    assert predict.returncode == 0, predict.stderr[-3000:]
    index = json.loads((run / "predict" / image.stem / "keypoints.json").read_text())
    assert (index["family"], index["model"]) == ("StableDiffusion3", str(tiny_sd35_path))
    assert len(index["images"]) == 1 and len(index["images"][0]["keypoints"]) == 10


def test_an_sd15_checkpoint_or_detector_is_refused_by_the_sd3_config_with_one_line(tiny_sd35_path, cub_root, tmp_path,
                                                                                   monkeypatch):
    from lightning_modules.app.checkpoints import RECORD_KEY
    from lightning_modules.app.errors import CheckpointMismatchError
    from lightning_modules.backbones.base import Backbone
    from lightning_modules.backbones.sd import SD_UP_LAYERS
    from lightning_modules.backbones.signature import ContextSignature
    from lightning_modules.detector import save_context
    from run import main
    from tests.conftest import tiny_module

    sd15 = ContextSignature("StableDiffusion", "/models/sd15", SD_UP_LAYERS, 16, 100, 768)
    refusal = ("{} was trained with StableDiffusion '/models/sd15', but model.backbone is StableDiffusion3: a context only "
               "works with the model family it was trained on. Use the config it was trained with (--config "
               "<run>/config.yaml, or a detector folder's config.yaml).")
    checkpoint = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": {"context": torch.randn(100, 768), "keypoint_tokens": torch.arange(10)},
                RECORD_KEY: sd15.record(), "hyper_parameters": {"num_tokens": 100}}, checkpoint)
    with monkeypatch.context() as patch:
        patch.setattr(Backbone, "load", lambda self: pytest.fail("the weights were loaded before the check"))
        with pytest.raises(CheckpointMismatchError) as error:
            main(["fit", *_demo(tiny_sd35_path, cub_root, tmp_path / "out", "--ckpt_path", str(checkpoint))])
    assert str(error.value) == refusal.format(f"ckpt_path={str(checkpoint)!r}")  # one line: run.py prints it alone
    assert not (tmp_path / "out").exists()

    detector = tmp_path / "sd15-detector"
    save_context(detector / "embedding.safetensors", torch.randn(100, 768), torch.arange(10), sd15, {})
    module = tiny_module(tiny_sd35_path, family=StableDiffusion3, load=False, num_tokens=100, pretrained_context=str(detector))
    with pytest.raises(CheckpointMismatchError) as error:
        module.configure_model()
    assert str(error.value) == refusal.format(f"model.pretrained_context={str(detector)!r}")


def test_an_sd3_context_is_refused_by_an_sd15_model(tiny_sd_path, tiny_sd35_path):
    from lightning_modules.app.errors import CheckpointMismatchError
    from lightning_modules.backbones import StableDiffusion
    from lightning_modules.backbones.signature import check_fits

    sd3 = StableDiffusion3(str(tiny_sd35_path)).signature(100, 32)
    with pytest.raises(CheckpointMismatchError, match="was trained with StableDiffusion3 .*, but model.backbone is "
                                                      "StableDiffusion: a context only works"):
        check_fits(sd3, StableDiffusion(str(tiny_sd_path)).signature(100, 32), "the checkpoint")
