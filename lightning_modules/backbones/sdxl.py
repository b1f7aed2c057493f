"""Stable Diffusion XL: the family of StableXLKeypoints (SPEC sections 2 and 6.2)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightning_modules.backbones.base import Backbone
from lightning_modules.backbones.sd import TINY_VAE

SDXL_LAYERS = tuple(f"up_blocks.0.attentions.0.transformer_blocks.{i}.attn2" for i in range(3))
#: The public config of stable-diffusion-xl-base-1.0 (``unet/config.json``), reduced to the keys that
#: differ from diffusers' defaults: what the benchmarks build with random weights.
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
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


class StableDiffusionXL(Backbone):
    """SDXL base: a 2048-wide context, ``time_ids`` and a pooled embedding as added conditions.

    Args:
        pooled_embedding: where the UNet's pooled ``text_embeds`` come from:
            ``context_mean`` (StableXLKeypoints: the unit-normalized mean over tokens of the
            context's last ``pooled_dim`` channels, trained through), or ``prompt`` (the frozen
            pooled output of ``text_encoder_2`` for ``prompt``, computed once when loading; the
            text encoders are freed right after).
        prompt: the text of the ``prompt`` mode, e.g. "a photo of a bird".
        Other arguments: see ``Backbone``. The VAE always runs in fp32 (SDXL's VAE overflows in fp16).

    Default layers: the first three ``attn2`` of ``up_blocks.0.attentions.0`` (16x16 at 512 px),
    StableXLKeypoints' choice; add e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``
    (32x32) through ``layers``.
    """

    default_layers: ClassVar[tuple[str, ...]] = SDXL_LAYERS

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-xl-base-1.0",
        pooled_embedding: Literal["context_mean", "prompt"] = "context_mean",
        prompt: str = "a photo of a bird",
        **kwargs,
    ) -> None:
        super().__init__(pretrained_model_name_or_path, **kwargs)
        self.pooled_embedding = pooled_embedding
        self.prompt = prompt
        self.register_buffer("pooled_prompt", None, persistent=False)

    @property
    def vae_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def pooled_dim(self) -> int:
        """Width of ``text_embeds``: what the add-embedding takes beside the six time ids."""
        config = self.unet.config
        return int(config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim)

    def _load_extra(self) -> None:
        if self.unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"{self.pretrained_model_name_or_path} is not an SDXL UNet (addition_embed_type="
                f"{self.unet.config.addition_embed_type!r}); use lightning_modules.backbones.StableDiffusion."
            )
        if self.pooled_embedding == "prompt":
            self.pooled_prompt = self._encode_prompt()
        elif self.pooled_embedding != "context_mean":
            raise ValueError(f"pooled_embedding={self.pooled_embedding!r}: use 'context_mean' or 'prompt'.")

    @torch.no_grad()
    def _encode_prompt(self) -> Tensor:
        """-> (1, pooled_dim) pooled output of text_encoder_2 for ``prompt``; the encoder is then freed."""
        tokenizer = CLIPTokenizer.from_pretrained(
            self.pretrained_model_name_or_path, subfolder="tokenizer_2", revision=self.revision,
            local_files_only=self.local_files_only,
        )
        encoder = self._from_pretrained(CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=torch.float32)
        ids = tokenizer(self.prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        pooled = encoder(ids).text_embeds.float()
        del encoder
        return pooled

    def added_conditions(self, context: Tensor, batch_size: int, image_size: int) -> dict:
        if self.pooled_embedding == "prompt":
            pooled = self.pooled_prompt.expand(batch_size, -1)
        else:
            pooled = F.normalize(context.mean(dim=0)[-self.pooled_dim :], dim=-1).expand(batch_size, -1)
        # (original size, crop top-left, target size), all at the training resolution.
        size = float(image_size)
        time_ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=context.device).expand(batch_size, -1)
        return {"added_cond_kwargs": {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}}

    @classmethod
    def write_tiny(cls, folder: str | Path, seed: int = 0) -> None:
        folder = Path(folder)
        hidden, projection, time_dim = 16, 16, 8
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            UNet2DConditionModel(
                **{
                    **SDXL_UNET,
                    "sample_size": 16,
                    "block_out_channels": (32, 64, 64),
                    "transformer_layers_per_block": (1, 2, 3),
                    "attention_head_dim": (2, 4, 8),
                    "addition_time_embed_dim": time_dim,
                    "projection_class_embeddings_input_dim": 6 * time_dim + projection,
                    "cross_attention_dim": 2 * hidden,
                    "norm_num_groups": 8,
                }
            ).save_pretrained(folder / "unet")
            AutoencoderKL(**{**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}).save_pretrained(folder / "vae")
            text = dict(hidden_size=hidden, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                        vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
            CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(folder / "text_encoder")
            CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=projection)).save_pretrained(
                folder / "text_encoder_2"
            )
        for name in ("tokenizer", "tokenizer_2"):
            byte_level_tokenizer().save_pretrained(folder / name)
        EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
        ).save_pretrained(folder / "scheduler")
