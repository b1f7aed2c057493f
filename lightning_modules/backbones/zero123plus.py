"""zero123plus-v1.2: the family of Stable123Keypoints (docs/method.md section 6.3).

An SD 2-style UNet (1024-wide context, v-prediction) fine-tuned to generate views of an object
from a condition image. Its official pipeline is hub remote code that wraps the UNet for
"reference-only" attention; this module never runs it. It loads the UNet, VAE and scheduler (and,
when asked, the CLIP vision encoder) as plain diffusers/transformers components and offers two modes:

- ``weights_only``: the UNet alone, exactly as SD 1.5 is used (docs/method.md section 2).
- ``reference_attention``: a reimplementation of the reference-only conditioning. A write pass runs
  the UNet on the noised condition latent and stores what enters each self-attention (``attn1``);
  the read pass (the captured one) lets each self-attention attend over its own tokens plus the
  stored ones. Maps are captured in the read pass only.

zero123plus was trained on its own latent and image normalization: target latents are
``(z * scaling_factor - 0.22) * 0.75`` of images scaled by 0.5 / 0.8 in [-1, 1], and condition
latents are the unscaled VAE latents of the condition image as the folder's ``feature_extractor_vae``
(a CLIPImageProcessor: resize, centre crop, rescale, normalize; v1.2: 512 px, bilinear, mean 0.5,
std 0.8) prepares it. Stable123Keypoints used SD's normalization for both (one likely cause of its
negative result); ``naive: true`` reproduces that.

How the pipeline conditions, and the two options that follow it (SUDO-AI-3D/zero123plus,
``diffusers-support/pipeline.py``):

- ``condition_latent``: the pipeline's condition latent is a *sample* of the VAE posterior
  (``encode_condition_image``: ``latent_dist.sample()``, i.e. mean + std * eps), not its mean.
  ``sample`` (default) does the same with a seeded eps that travels with the noise (below);
  ``mean`` conditions on the posterior mean (the same condition latent at every call).
- ``image_embedding``: the pipeline's attn2 context is its text embedding plus, at each of the 77
  positions, ``ramping_coefficients[i]`` (77 numbers in the folder's ``model_index.json``) times the
  condition image's CLIP image embedding (``vision_encoder`` on ``feature_extractor_clip`` pixels).
  ``ramp`` adds that term to the first min(T, 77) tokens of the learned context, per image (tokens
  77.. get nothing; with T < 77 the first T coefficients are used); ``none`` (default) leaves it out.
  Why ``none`` by default: in StableKeypoints a token is one learned vector shared by every image,
  and its map is a keypoint. The ramp makes tokens 0..76 image-dependent and sets them apart from the
  others by position only (the 77 coefficients belong to CLIP's text positions, which the learned
  tokens do not have), and it needs a 0.6 B-parameter CLIP ViT-H per batch. The image conditions the
  UNet already through reference attention. ``ramp`` is there to condition exactly as the pipeline does.

The draws (``sample_noise``), per image from its own generator (or whole-batch from one generator),
in the order in which the pipeline draws from its global generator (``encode_condition_image``, then
``prepare_latents``, then ``RefOnlyNoisedUNet.forward``):

1. ``noise["condition_posterior"]``: eps (4, H/8, W/8), only with ``condition_latent: sample`` in
   reference mode; the condition latent is ``condition_mean + condition_std * eps`` in fp32. This is
   ``vae.encode(pixels).latent_dist.sample(generator)`` for a fresh generator in the same state (the
   list of per-image generators, or the batch's generator); on the CPU, also
   ``torch.manual_seed(seed); pipeline.encode_condition_image(pixels)`` for
   ``sample_noise(latents, torch.Generator().manual_seed(seed))``.
2. ``noise["latents"]``: the target latent's noise (4, h, w).
3. ``noise["condition"]``: the write pass's noise of the condition latent (4, H/8, W/8), reference mode.

Without the posterior draw (``weights_only``, ``naive``, ``condition_latent: mean``) the target's
noise is the generator's first draw, as for SD and SDXL. Every draw is in index
order, as ``torch.randn(shape)``; the pipeline's ``torch.randn_like(cond_lat)`` lays the same numbers
out in cond_lat's memory order (channels_last out of diffusers' VAE on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from lightning_modules.capture import AttentionCall
from lightning_modules.backbones.base import Backbone, Latents
from lightning_modules.app.errors import ConfigError, HubError, MissingFileError

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
        naive: use SD's latent normalization for targets and conditions, as Stable123Keypoints did
            (the condition latent is then the target latent itself: ``condition_latent`` does not apply
            and ``image_embedding`` must stay ``none``).
        condition_latent: reference mode: ``sample`` (the pipeline's posterior sample, drawn with the
            noise) or ``mean`` (the posterior mean).
        image_embedding: reference mode: ``none`` or ``ramp`` (the pipeline's ramped CLIP image
            embedding added to the first 77 context tokens; loads ``vision_encoder/``,
            ``feature_extractor_clip/`` and ``model_index.json``'s ``ramping_coefficients``).
        Other arguments: see ``Backbone``.
    """

    default_layers: ClassVar[tuple[str, ...]] = ZERO123PLUS_LAYERS

    def __init__(
        self,
        pretrained_model_name_or_path: str = "sudo-ai/zero123plus-v1.2",
        mode: Literal["weights_only", "reference_attention"] = "weights_only",
        naive: bool = False,
        condition_latent: Literal["sample", "mean"] = "sample",
        image_embedding: Literal["none", "ramp"] = "none",
        **kwargs,
    ) -> None:
        super().__init__(pretrained_model_name_or_path, **kwargs)
        if mode not in ("weights_only", "reference_attention"):
            raise ConfigError(f"zero123plus mode={mode!r}: use 'weights_only' or 'reference_attention'.")
        if condition_latent not in ("sample", "mean"):
            raise ConfigError(f"zero123plus condition_latent={condition_latent!r}: use 'sample' or 'mean'.")
        if image_embedding not in ("none", "ramp"):
            raise ConfigError(f"zero123plus image_embedding={image_embedding!r}: use 'none' or 'ramp'.")
        if image_embedding == "ramp" and (mode != "reference_attention" or naive):
            raise ConfigError(
                "zero123plus image_embedding='ramp' conditions on the image as the pipeline does: it needs "
                f"mode='reference_attention' and naive=false (here mode={mode!r}, naive={naive}). Set "
                "image_embedding: none, or use the reference mode."
            )
        self.mode = mode
        self.naive = naive
        self.condition_latent = condition_latent
        self.image_embedding = image_embedding
        self.condition_processor: CLIPImageProcessorPil | None = None
        self.clip_processor: CLIPImageProcessorPil | None = None
        self.vision_encoder: CLIPVisionModelWithProjection | None = None
        self.register_buffer("ramp", None, persistent=False)

    @property
    def samples_condition(self) -> bool:
        """Whether the condition latent is a posterior sample (and ``sample_noise`` draws its eps)."""
        return self.mode == "reference_attention" and not self.naive and self.condition_latent == "sample"

    def _load_extra(self) -> None:
        if self.mode != "reference_attention":
            return
        if not self.naive:
            # The PIL backend: what zero123plus' pipeline ran (transformers 4's CLIPImageProcessor).
            self.condition_processor = self.source.from_pretrained(CLIPImageProcessorPil, "feature_extractor_vae")
        if self.image_embedding == "ramp":
            self._load_image_embedding()
        for name, module in self.unet.named_modules():
            if isinstance(module, Attention) and name.endswith("attn1"):
                module.set_processor(ReferenceAttentionProcessor(name, module.processor))

    def _load_image_embedding(self) -> None:
        """The CLIP vision encoder, its processor and the 77 ramp coefficients of ``model_index.json``."""
        fix = "Use a zero123plus folder (or hub id), or image_embedding: none."
        try:
            index = self.source.load_config(DiffusionPipeline, "")  # model_index.json, where the pipeline keeps them
        except (MissingFileError, HubError) as error:
            raise type(error)(f"{self.source.where}: cannot read model_index.json, whose ramping_coefficients "
                              f"image_embedding='ramp' needs ({error}). {fix}") from error
        coefficients = index.get("ramping_coefficients")
        if not coefficients:
            raise MissingFileError(f"{self.source.where}: its model_index.json has no ramping_coefficients, which "
                                   f"image_embedding='ramp' scales the image embedding by. {fix}")
        self.clip_processor = self.source.from_pretrained(CLIPImageProcessorPil, "feature_extractor_clip")
        encoder = self._from_pretrained(CLIPVisionModelWithProjection, "vision_encoder", torch_dtype=self.dtype)
        width = int(self.unet.config.cross_attention_dim)
        if encoder.config.projection_dim != width:
            raise ConfigError(
                f"{self.source.where}: vision_encoder/ embeds images {encoder.config.projection_dim} wide but the "
                f"UNet's context is {width} wide; the image embedding cannot be added. Use image_embedding: none."
            )
        self.vision_encoder = encoder
        self.ramp = torch.tensor(coefficients, dtype=torch.float32, device=self.unet.device)

    def frozen_modules(self) -> list[nn.Module]:
        extra = [self.vision_encoder] if self.vision_encoder is not None else []
        return [*super().frozen_modules(), *extra]

    @torch.no_grad()
    def encode(self, images: Tensor) -> Latents:
        """images (B, 3, S, S) in [0, 1] -> ``latents`` (B, 4, S/8, S/8), and in reference mode:

        - ``condition_mean`` (B, 4, H/8, W/8): the condition image's VAE posterior mean, unscaled
          (naive: the target latents); ``condition_std`` alike, when the condition latent is sampled;
        - ``image_embeds`` (B, D): its CLIP image embedding, with ``image_embedding: ramp``.
        """
        if self.naive:
            latents = super().encode(images)
            if self.mode == "reference_attention":
                latents["condition_mean"] = latents["latents"]
            return latents
        z = self.vae_mean((images * 2 - 1) * IMAGE_SCALE).float() * self.scaling_factor
        latents = {"latents": (z - LATENT_SHIFT) * LATENT_SCALE}
        if self.mode == "reference_attention":
            posterior = self.vae_posterior(self.condition_pixels(images))
            latents["condition_mean"] = posterior.mean.float()
            if self.samples_condition:
                latents["condition_std"] = posterior.std.float()
            if self.vision_encoder is not None:
                pixels = self.clip_pixels(images).to(self.vision_encoder.device, self.vision_encoder.dtype)
                latents["image_embeds"] = self.vision_encoder(pixels).image_embeds.float()
        return latents

    def vae_posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """x: (B, 3, H, W) in the VAE's input range -> its posterior: ``mean``, ``std`` (B, 4, H/8, W/8)."""
        return self.vae.encode(self.applied.prepare(x.to(self.vae.device, self.vae.dtype))).latent_dist

    def condition_pixels(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) in [0, 1] -> (B, 3, H, W): the condition image as zero123plus' pipeline feeds its VAE.

        The pipeline gives its ``feature_extractor_vae`` an 8-bit RGB image and encodes the processor's
        ``pixel_values`` as they are (no further scaling); the images are quantized to 8 bits alike.
        """
        return _processed(images, self.condition_processor)

    def clip_pixels(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) in [0, 1] -> (B, 3, 224, 224) for v1.2: what the pipeline's ``feature_extractor_clip``
        gives its ``vision_encoder``."""
        return _processed(images, self.clip_processor)

    def sample_noise(self, latents: Latents,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Latents:
        """Fresh eps ~ N(0, I): ``condition_posterior`` (when the condition latent is sampled), ``latents``,
        ``condition`` (reference mode), drawn in this order (module docstring) from each image's generator."""
        draws = {}
        if "condition_std" in latents:
            draws["condition_posterior"] = latents["condition_mean"]
        draws["latents"] = latents["latents"]
        if "condition_mean" in latents:
            draws["condition"] = latents["condition_mean"]
        return super().sample_noise(draws, generator)

    def condition_latents(self, latents: Latents, noise: Latents) -> Tensor:
        """-> (B, 4, H/8, W/8) the condition latent of the write pass: ``condition_mean + condition_std * eps``
        (the pipeline's ``latent_dist.sample``) or, with ``condition_latent: mean``, the mean."""
        if "condition_std" not in latents:
            return latents["condition_mean"]
        return latents["condition_mean"] + latents["condition_std"] * noise["condition_posterior"]

    def ramped_context(self, context: Tensor, image_embeds: Tensor) -> Tensor:
        """context (T, D), image_embeds (B, D) -> (B, T, D): the pipeline's ``text + ramp x image embedding``,
        with the learned context as the text: token i < min(T, 77) gets ``ramp[i] * image_embeds``."""
        n = min(len(context), len(self.ramp))
        ramped = context[:n] + image_embeds[:, None, :] * self.ramp[:n, None]
        return torch.cat([ramped, context[n:].expand(len(image_embeds), -1, -1)], dim=1)

    def denoiser_forward(self, latents: Tensor, noise: Tensor, context: Tensor,
                         image_embeds: Tensor | None = None) -> Callable[[dict], object]:
        """``Backbone.denoiser_forward``, with the ramped image embedding in the context when ``image_embeds`` is given."""
        hidden = None if image_embeds is None else self.ramped_context(context, image_embeds)
        return super().denoiser_forward(latents, noise, context, hidden)

    def denoiser_call(self, latents: Latents, noise: Latents, context: Tensor):
        embeds = latents.get("image_embeds")
        read = self.denoiser_forward(latents["latents"], noise["latents"], context, embeds)
        if self.mode != "reference_attention":
            return lambda call: self.capture.run(read, call)
        write = self.denoiser_forward(self.condition_latents(latents, noise), noise["condition"], context, embeds)

        def forward(call: AttentionCall) -> None:
            store: dict[str, Tensor] = {}
            write_call = AttentionCall(call.resolution, record=False, family={"reference": ReferencePass("write", store)})
            self.capture.run(write, write_call)
            call.family["reference"] = ReferencePass("read", store)
            self.capture.run(read, call)

        return forward


def _processed(images: Tensor, processor: CLIPImageProcessorPil) -> Tensor:
    """images (B, 3, S, S) in [0, 1] -> the processor's ``pixel_values`` of their 8-bit RGB versions (what a
    pipeline given PIL images computes)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return processor(images=list(pixels), return_tensors="pt").pixel_values
