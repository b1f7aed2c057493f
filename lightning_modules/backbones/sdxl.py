"""Stable Diffusion XL: the family of StableXLKeypoints (docs/method.md sections 2 and 6.2)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from lightning_modules.backbones.base import Backbone
from lightning_modules.app.errors import ConfigError

SDXL_LAYERS = tuple(f"up_blocks.0.attentions.0.transformer_blocks.{i}.attn2" for i in range(3))


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
        if pooled_embedding not in ("context_mean", "prompt"):
            raise ConfigError(f"pooled_embedding={pooled_embedding!r}: use 'context_mean' or 'prompt'.")
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

    def check_denoiser_config(self, config: dict) -> None:
        if config.get("addition_embed_type") != "text_time":
            raise ConfigError(
                f"{self.pretrained_model_name_or_path} is not an SDXL UNet (addition_embed_type="
                f"{config.get('addition_embed_type')!r}); use lightning_modules.backbones.StableDiffusion."
            )

    def _load_extra(self) -> None:
        if self.pooled_embedding == "prompt":
            self.pooled_prompt = self._encode_prompt()

    @torch.no_grad()
    def _encode_prompt(self) -> Tensor:
        """-> (1, pooled_dim) pooled output of text_encoder_2 for ``prompt``; the encoder is then freed."""
        tokenizer = self.source.from_pretrained(CLIPTokenizer, "tokenizer_2")
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
