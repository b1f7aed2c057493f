"""Tiny random models of each family, in the real diffusers layout: the demo's and the tests' weights.

``save_pretrained`` folders load through exactly the code path a hub id takes, so the demo and the
tests exercise the real loading and module names with a few MB of random weights. The demo writes
its model on first use only at its own folder (``DEMO_MODELS``); nothing else is ever written for a
path that does not exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from lightning.pytorch.utilities import rank_zero_info
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from data.demo import DEMO_DIR, is_demo_path
from lightning_modules.app import files
from lightning_modules.app.errors import MissingFileError

#: The demo's own model folder per family (relative to the working directory, as in conf/demo.yaml).
DEMO_MODELS = {
    "StableDiffusion": DEMO_DIR / "models" / "sd15-tiny",
    "StableDiffusionXL": DEMO_DIR / "models" / "sdxl-tiny",
    "Zero123Plus": DEMO_DIR / "models" / "zero123plus-tiny",
    "StableDiffusion3": DEMO_DIR / "models" / "sd35-tiny",
}

#: The SD VAE shape (x8 downsampling, 4 latent channels) with few channels.
TINY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=128,
)


def tiny_sd_unet(cross_attention_dim: int = 32, **overrides) -> UNet2DConditionModel:
    """An SD 1.5-shaped UNet (same block layout and module names), 2.4 M parameters."""
    config = dict(
        sample_size=16,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def sd_scheduler() -> PNDMScheduler:
    """The scheduler config Stable Diffusion 1.5 ships (its noise schedule is what matters here)."""
    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True
    )


def byte_level_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (no merges): tokenizes any text offline."""
    # GPT-2's reversible byte -> printable character table, which CLIP's BPE vocabulary is built on.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    symbols = [chars[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def write_tiny_sd(folder: str | Path, seed: int = 0) -> None:
    """SD 1.5-shaped: ``unet/`` (context 32 wide), ``vae/``, ``scheduler/``."""
    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tiny_sd_unet().save_pretrained(folder / "unet")
        AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    sd_scheduler().save_pretrained(folder / "scheduler")


def write_tiny_sdxl(folder: str | Path, seed: int = 0) -> None:
    """SDXL-shaped: a 3-level text_time UNet (context 32 = two 16-wide text encoders, pooled 16 wide),
    the VAE with SDXL's scaling factor 0.13025, both text encoders and tokenizers, the scheduler."""
    folder = Path(folder)
    hidden, projection, time_dim = 16, 16, 8
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3),
            attention_head_dim=(2, 4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + projection,
            cross_attention_dim=2 * hidden,
            norm_num_groups=8,
        ).save_pretrained(folder / "unet")
        AutoencoderKL(**{**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}).save_pretrained(folder / "vae")
        text = dict(hidden_size=hidden, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                    vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
        CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(folder / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=projection)).save_pretrained(folder / "text_encoder_2")
    for name in ("tokenizer", "tokenizer_2"):
        byte_level_tokenizer().save_pretrained(folder / name)
    EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    ).save_pretrained(folder / "scheduler")


def condition_image_processor(**overrides) -> CLIPImageProcessorPil:
    """zero123plus-v1.2's ``feature_extractor_vae``, as its folder ships it: a CLIPImageProcessor that resizes
    the shortest edge to 512 (bilinear), centre-crops 512 x 512, rescales by 1/255 and normalizes with
    mean 0.5, std 0.8."""
    options = dict(size={"shortest_edge": 512}, crop_size={"height": 512, "width": 512}, resample=2,
                   image_mean=0.5, image_std=0.8)
    return CLIPImageProcessorPil(**{**options, **overrides})


def clip_image_processor() -> CLIPImageProcessorPil:
    """zero123plus-v1.2's ``feature_extractor_clip``: CLIP's 224 px bicubic resize and centre crop, mean and std."""
    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                 image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))


def tiny_ramping_coefficients(seed: int = 0) -> list[float]:
    """The tiny model's 77 ``ramping_coefficients``: made-up numbers in [0, 0.5), seeded (v1.2's are
    learned: 0.003 at the first position, 0.1 to 0.5 after it)."""
    return (torch.rand(77, generator=torch.Generator().manual_seed(seed)) * 0.5).tolist()


def write_tiny_zero123plus(folder: str | Path, seed: int = 0) -> None:
    """zero123plus-shaped: an SD 2-style UNet (linear projections, context 48), the VAE, a v-prediction
    EulerAncestral scheduler, the condition-image processors ``feature_extractor_vae`` and
    ``feature_extractor_clip`` as v1.2 ships them, a CLIP ``vision_encoder`` with 48-wide image embeddings,
    and a ``model_index.json`` holding the pipeline's 77 ``ramping_coefficients``."""
    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tiny_sd_unet(cross_attention_dim=48, use_linear_projection=True, attention_head_dim=(2, 4, 8, 8)).save_pretrained(
            folder / "unet"
        )
        AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
        # Drawn after the UNet and VAE, whose weights therefore do not depend on it.
        CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                             image_size=224, patch_size=32, projection_dim=48)
        ).save_pretrained(folder / "vision_encoder")
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", prediction_type="v_prediction",
        timestep_spacing="linspace", steps_offset=1,
    )
    scheduler.save_pretrained(folder / "scheduler")
    condition_image_processor().save_pretrained(folder / "feature_extractor_vae")
    clip_image_processor().save_pretrained(folder / "feature_extractor_clip")
    # What the pipeline registers in its config (the real file also names its text encoder and tokenizer).
    index = {
        "_class_name": "Zero123PlusPipeline",
        "feature_extractor_clip": ["transformers", "CLIPImageProcessor"],
        "feature_extractor_vae": ["transformers", "CLIPImageProcessor"],
        "ramping_coefficients": tiny_ramping_coefficients(seed),
        "scheduler": ["diffusers", type(scheduler).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "vision_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def tiny_sd3_transformer(**overrides) -> SD3Transformer2DModel:
    """An SD 3.5 medium-shaped transformer (MMDiT-X: dual attention in the first blocks, per-head RMSNorm on
    queries and keys, patch size 2, 16 latent channels) with 6 blocks of width 32 and a 48-wide context."""
    config = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=6, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=32,
                  pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    return SD3Transformer2DModel(**{**config, **overrides})


#: SD 3's VAE shape (x8 downsampling, 16 latent channels, no quant convolutions, its latent shift and
#: scale) with few channels.
TINY_SD3_VAE = {**TINY_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                "shift_factor": 0.0609, "scaling_factor": 1.5305}


def write_tiny_sd35(folder: str | Path, seed: int = 0) -> None:
    """SD 3.5-shaped: ``transformer/`` (``tiny_sd3_transformer``), the 16-channel ``vae/`` and SD 3.5's
    flow-matching ``scheduler/`` (shift 3); no text encoder, tokenizer or ``model_index.json``."""
    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tiny_sd3_transformer().save_pretrained(folder / "transformer")
        AutoencoderKL(**TINY_SD3_VAE).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")


#: Writer of each family's tiny model, by the family's class name.
TINY_WRITERS: dict[str, Callable[[Path], None]] = {
    "StableDiffusion": write_tiny_sd,
    "StableDiffusionXL": write_tiny_sdxl,
    "Zero123Plus": write_tiny_zero123plus,
    "StableDiffusion3": write_tiny_sd35,
}


def write_tiny(family: str, folder: str | Path) -> Path:
    """Writes the tiny model of ``family`` (a class name of ``lightning_modules.backbones``) into ``folder``.

    Atomically (``app.files.atomic_folder``): a killed run leaves nothing or the whole model.
    """
    with files.atomic_folder(folder) as tmp:
        TINY_WRITERS[family](tmp)
    return Path(folder)


def ensure_demo_model(family: str, path: str | Path) -> None:
    """Writes the family's tiny model at ``path`` if ``path`` is missing and is the demo's own folder.

    Any other missing local path is an error: a mistyped path never gets a random model.
    """
    path = Path(path)
    if path.exists():
        return
    demo = DEMO_MODELS.get(family)
    if demo is not None and is_demo_path(path, demo):
        write_tiny(family, path)
        rank_zero_info(f"Wrote a tiny random {family} model to {path} (the demo's own folder; random weights, "
                       "so its keypoints mean nothing).")
        return
    raise MissingFileError(
        f"pretrained_model_name_or_path={str(path)!r} does not exist. The demo writes a random model only at its "
        f"own folder {str(demo)!r}; fix the path (a diffusers folder or a hub id) or remove "
        "model.backbone.init_args.create_if_missing."
    )


# What the demo config names as ``model.backbone.init_args.create_if_missing``, one per family.
def tiny_sd15(path: str) -> None:
    """The demo's tiny SD 1.5-shaped model at ``path`` (only at ``.demo/models/sd15-tiny``)."""
    ensure_demo_model("StableDiffusion", path)


def tiny_sdxl(path: str) -> None:
    """The demo's tiny SDXL-shaped model at ``path`` (only at ``.demo/models/sdxl-tiny``)."""
    ensure_demo_model("StableDiffusionXL", path)


def tiny_zero123plus(path: str) -> None:
    """The demo's tiny zero123plus-shaped model at ``path`` (only at ``.demo/models/zero123plus-tiny``)."""
    ensure_demo_model("Zero123Plus", path)


def tiny_sd35(path: str) -> None:
    """The demo's tiny SD 3.5-shaped model at ``path`` (only at ``.demo/models/sd35-tiny``)."""
    ensure_demo_model("StableDiffusion3", path)
