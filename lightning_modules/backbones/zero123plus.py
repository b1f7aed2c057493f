"""zero123plus-v1.2: the family of Stable123Keypoints (SPEC section 6.3).

An SD 2-style UNet (1024-wide context, v-prediction) fine-tuned to generate views of an object
from a condition image. Its official pipeline is hub remote code that wraps the UNet for
"reference-only" attention; this module never runs it. It loads the UNet, VAE and scheduler as
plain diffusers components and offers two modes:

- ``weights_only``: the UNet alone, exactly as SD 1.5 is used (SPEC section 2).
- ``reference_attention``: a reimplementation of the reference-only conditioning. A write pass runs
  the UNet on the noised condition latent and stores what enters each self-attention (``attn1``);
  the read pass (the captured one) lets each self-attention attend over its own tokens plus the
  stored ones. Maps are captured in the read pass only.

zero123plus was trained on its own latent and image normalization: target latents are
``(z * scaling_factor - 0.22) * 0.75`` of images scaled by 0.5 / 0.8 in [-1, 1], and condition
latents are the unscaled VAE latents of the condition image at 320 px. Stable123Keypoints used SD's
normalization for both (one likely cause of its negative result); ``naive: true`` reproduces that.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import Attention
from torch import Tensor

from lightning_modules.backbones.base import Backbone, Latents
from lightning_modules.backbones.sd import TINY_VAE, tiny_sd_unet

ZERO123PLUS_LAYERS = tuple(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2" for i in range(3))

LATENT_SHIFT, LATENT_SCALE = 0.22, 0.75  # zero123plus' scale_latents
IMAGE_SCALE = 0.5 / 0.8  # zero123plus v1.2's scale_image
CONDITION_SIZE = 320  # its feature_extractor_vae resizes the condition image to 320 px


class ReferenceAttentionProcessor:
    """``attn1`` processor: stores its input in the write pass, attends over it in the read pass."""

    def __init__(self, name: str, original, store: dict[str, Tensor], mode: list[str]) -> None:
        self.name = name
        self.original = original
        self.store = store
        self.mode = mode  # one shared cell: "off", "write" or "read"

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args, **kwargs) -> Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.mode[0] == "write":
            self.store[self.name] = context
        elif self.mode[0] == "read":
            context = torch.cat([context, self.store[self.name]], dim=1)
        return self.original(attn, hidden_states, context, *args, **kwargs)


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
            raise ValueError(f"zero123plus mode={mode!r}: use 'weights_only' or 'reference_attention'.")
        self.mode = mode
        self.naive = naive
        self._reference_store: dict[str, Tensor] = {}
        self._reference_mode = ["off"]

    def _load_extra(self) -> None:
        if self.mode != "reference_attention":
            return
        for name, module in self.unet.named_modules():
            if isinstance(module, Attention) and name.endswith("attn1"):
                module.set_processor(
                    ReferenceAttentionProcessor(name, module.processor, self._reference_store, self._reference_mode)
                )

    def _vae_latents(self, x: Tensor) -> Tensor:
        return self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mean.float()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Latents:
        """images (B, 3, S, S) in [0, 1] -> ``latents`` (and ``condition`` in reference mode)."""
        if self.naive:
            latents = super().encode(images)
            if self.mode == "reference_attention":
                latents["condition"] = latents["latents"]
            return latents
        x = images * 2 - 1
        z = self._vae_latents(x * IMAGE_SCALE) * self.vae.config.scaling_factor
        latents = {"latents": (z - LATENT_SHIFT) * LATENT_SCALE}
        if self.mode == "reference_attention":
            condition = F.interpolate(x, size=(CONDITION_SIZE, CONDITION_SIZE), mode="bilinear", antialias=True,
                                      align_corners=False)
            latents["condition"] = self._vae_latents(condition)
        return latents

    def unet_call(self, latents: Latents, noise: Latents, context: Tensor):
        read = super().unet_call(latents, noise, context)
        if self.mode != "reference_attention":
            return read
        write = super().unet_call({"latents": latents["condition"]}, {"latents": noise["condition"]}, context)

        def forward() -> None:
            self._reference_store.clear()
            try:
                self._reference_mode[0] = "write"
                with self.capture.paused():
                    self.capture.run_unet(write)
                self._reference_mode[0] = "read"
                read()
            finally:
                self._reference_mode[0] = "off"
                self._reference_store.clear()  # the stored states hold the graph: free them

        return forward

    @classmethod
    def write_tiny(cls, folder: str | Path, seed: int = 0) -> None:
        folder = Path(folder)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            tiny_sd_unet(cross_attention_dim=48, use_linear_projection=True, attention_head_dim=(2, 4, 8, 8)).save_pretrained(
                folder / "unet"
            )
            AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
        EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="linear", prediction_type="v_prediction",
            timestep_spacing="linspace", steps_offset=1,
        ).save_pretrained(folder / "scheduler")
