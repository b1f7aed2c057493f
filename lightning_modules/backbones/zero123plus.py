"""zero123plus-v1.2: the family of Stable123Keypoints (docs/method.md section 6.3).

An SD 2-style UNet (1024-wide context, v-prediction) fine-tuned to generate views of an object
from a condition image. Its official pipeline is hub remote code that wraps the UNet for
"reference-only" attention; this module never runs it. It loads the UNet, VAE and scheduler as
plain diffusers components and offers two modes:

- ``weights_only``: the UNet alone, exactly as SD 1.5 is used (docs/method.md section 2).
- ``reference_attention``: a reimplementation of the reference-only conditioning. A write pass runs
  the UNet on the noised condition latent and stores what enters each self-attention (``attn1``);
  the read pass (the captured one) lets each self-attention attend over its own tokens plus the
  stored ones. Maps are captured in the read pass only.

zero123plus was trained on its own latent and image normalization: target latents are
``(z * scaling_factor - 0.22) * 0.75`` of images scaled by 0.5 / 0.8 in [-1, 1], and condition
latents are the unscaled VAE latents of the condition image as the folder's ``feature_extractor_vae``
(a CLIPImageProcessor: resize, centre crop, rescale, normalize) prepares it. Stable123Keypoints used
SD's normalization for both (one likely cause of its negative result); ``naive: true`` reproduces that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor
from transformers import CLIPImageProcessorPil

from lightning_modules.capture import AttentionCall
from lightning_modules.backbones.base import Backbone, Latents
from lightning_modules.app.errors import ConfigError

ZERO123PLUS_LAYERS = tuple(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2" for i in range(3))

# What zero123plus' pipeline does that its model folder does not carry (SUDO-AI-3D/zero123plus,
# diffusers-support/pipeline.py: ``scale_latents`` and v1.2's ``scale_image``).
LATENT_SHIFT, LATENT_SCALE = 0.22, 0.75
IMAGE_SCALE = 0.5 / 0.8


@dataclass(frozen=True)
class ReferencePass:
    """The reference-attention part of one UNet call, kept in ``AttentionCall.family["reference"]``.

    ``write`` stores what enters each self-attention, ``read`` attends over its own tokens plus the
    stored ones. The store belongs to one ``attention_maps`` call and is never emptied while that
    call's graph lives, so a checkpointing recompute of the read pass finds what the first forward read.
    """

    mode: Literal["write", "read"]
    store: dict[str, Tensor]


class ReferenceAttentionProcessor:
    """``attn1`` processor: stores its input in a write pass, attends over it in a read pass."""

    def __init__(self, name: str, original) -> None:
        self.name = name
        self.original = original

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, call: AttentionCall | None = None) -> Tensor:
        reference = call.family.get("reference") if call is not None else None
        if reference is not None:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if reference.mode == "write":
                reference.store.setdefault(self.name, context)  # a recompute stores nothing new
            else:
                encoder_hidden_states = torch.cat([context, reference.store[self.name]], dim=1)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class Zero123Plus(Backbone):
    """sudo-ai/zero123plus-v1.2 loaded as plain diffusers components (no remote code).

    Args:
        mode: ``weights_only`` or ``reference_attention`` (see the module docstring).
        naive: use SD's latent normalization for targets and conditions, as Stable123Keypoints did.
        Other arguments: see ``Backbone``.
    """

    default_layers: ClassVar[tuple[str, ...]] = ZERO123PLUS_LAYERS

    def __init__(
        self,
        pretrained_model_name_or_path: str = "sudo-ai/zero123plus-v1.2",
        mode: Literal["weights_only", "reference_attention"] = "weights_only",
        naive: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(pretrained_model_name_or_path, **kwargs)
        if mode not in ("weights_only", "reference_attention"):
            raise ConfigError(f"zero123plus mode={mode!r}: use 'weights_only' or 'reference_attention'.")
        self.mode = mode
        self.naive = naive
        self.condition_processor: CLIPImageProcessorPil | None = None

    def _load_extra(self) -> None:
        if self.mode != "reference_attention":
            return
        if not self.naive:
            # The PIL backend: what zero123plus' pipeline ran (transformers 4's CLIPImageProcessor).
            self.condition_processor = self.source.from_pretrained(CLIPImageProcessorPil, "feature_extractor_vae")
        for name, module in self.unet.named_modules():
            if isinstance(module, Attention) and name.endswith("attn1"):
                module.set_processor(ReferenceAttentionProcessor(name, module.processor))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Latents:
        """images (B, 3, S, S) in [0, 1] -> ``latents`` (and ``condition`` in reference mode)."""
        if self.naive:
            latents = super().encode(images)
            if self.mode == "reference_attention":
                latents["condition"] = latents["latents"]
            return latents
        z = self.vae_mean((images * 2 - 1) * IMAGE_SCALE).float() * self.scaling_factor
        latents = {"latents": (z - LATENT_SHIFT) * LATENT_SCALE}
        if self.mode == "reference_attention":
            latents["condition"] = self.vae_mean(self.condition_pixels(images)).float()
        return latents

    def condition_pixels(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) in [0, 1] -> (B, 3, H, W): the condition image as zero123plus' pipeline feeds its VAE.

        The pipeline gives its ``feature_extractor_vae`` an 8-bit RGB image and encodes the processor's
        ``pixel_values`` as they are (no further scaling); the images are quantized to 8 bits alike.
        """
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return self.condition_processor(images=list(pixels), return_tensors="pt").pixel_values

    def unet_call(self, latents: Latents, noise: Latents, context: Tensor):
        read = self.unet_forward(latents["latents"], noise["latents"], context)
        if self.mode != "reference_attention":
            return lambda call: self.capture.run(read, call)
        write = self.unet_forward(latents["condition"], noise["condition"], context)

        def forward(call: AttentionCall) -> None:
            store: dict[str, Tensor] = {}
            write_call = AttentionCall(call.resolution, record=False, family={"reference": ReferencePass("write", store)})
            self.capture.run(write, write_call)
            call.family["reference"] = ReferencePass("read", store)
            self.capture.run(read, call)

        return forward
