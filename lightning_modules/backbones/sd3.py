"""Stable Diffusion 3 / 3.5: keypoints from a diffusion transformer's joint attention (docs/models.md).

SD 3's denoiser is an MMDiT (``SD3Transformer2DModel``): image patches and text tokens are two
streams with their own weights that meet in one joint attention per block. Here the learned
context takes the text stream's place (T tokens x ``joint_attention_dim``, 4096 for SD 3.5; no text
encoder is loaded), and a block's map of token t is its image queries' attention to the context
stream's keys, over the context tokens (``capture.query_heads`` / ``key_heads``: ``to_q`` with
``norm_q`` on the image stream, ``add_k_proj`` with ``norm_added_k`` on the context stream), on the
patch grid (latent side / patch size), upsampled to ``feature_upsample_res`` like the UNets' maps.

Latents are the 16-channel VAE's posterior mean as SD 3's pipelines scale it,
``(z - shift_factor) * scaling_factor``; noise is flow matching's
``x_t = (1 - sigma) x_0 + sigma * eps`` at ``noise_level`` on the scheduler's grid
(``FlowMatchEulerDiscreteScheduler.set_timesteps(num_inference_steps)``, as the pipeline builds
it); the transformer is called at ``timestep = sigma * num_train_timesteps``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor

from lightning_modules.app.errors import ConfigError
from lightning_modules.backbones.base import Backbone, Latents


def calculate_shift(image_tokens: int, base_image_seq_len: int, max_image_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """The dynamic shift mu of an image of ``image_tokens`` patches: linear in the token count, as diffusers'
    SD 3 pipeline computes it (``pipeline_stable_diffusion_3.calculate_shift``, whose module would import the
    pipeline's text and image encoders)."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_tokens * slope + base_shift - slope * base_image_seq_len


def joint_attention_layer(block: int) -> str:
    """The name of SD 3's joint attention in transformer block ``block``."""
    return f"transformer_blocks.{block}.attn"


class StableDiffusion3(Backbone):
    """Stable Diffusion 3 / 3.5 (medium, large): ``transformer/``, ``vae/`` and ``scheduler/`` are all it loads.

    Args:
        pooled_embedding: the transformer's ``pooled_projections`` (what the pipeline fills with the CLIP
            encoders' pooled outputs, added to the timestep embedding that modulates every block):
            ``zeros`` (default): SD 3 was trained with each text encoder dropped at random, its embeddings
            zeroed (Esser et al., 2024), so zeros are a condition the model knows, and the context then
            acts through the joint attention alone, as StableKeypoints' context acts through
            cross-attention alone. ``context_mean``: the mean over tokens of the context's first
            ``pooled_projection_dim`` channels (where the pipeline puts the CLIP features; zero-padded
            when the context is narrower), trained through, as SDXL's ``pooled_embedding``.
        Other arguments: see ``Backbone``. ``replace_output`` (StableXLKeypoints' UNet-layer replacement)
        does not apply to joint attention and is refused.

    Captured layers: the joint attentions ``transformer_blocks.<i>.attn``. The default is the four
    blocks around the middle of the stack, ``num_layers // 2 - 2`` to ``num_layers // 2 + 1``
    (SD 3.5 medium: 10-13 of 24; large: 17-20 of 38; a model of fewer blocks: those it has). The
    reason: a transformer keeps one patch grid through its depth, so depth decides what the features
    mean, not their resolution; StableKeypoints took the middle of SD's cross-attention layers
    (7-10 of 16), between the early layers' position-bound features and the last ones' denoising
    detail; and the forward stops there, about 40 % of the blocks early. It is a starting point
    not measured on the real weights; ``layers`` takes any other blocks. SD 3.5 medium's blocks
    0-12 also hold an ``attn2`` (MMDiT-X's image-only self-attention): its keys are image patches,
    so it has no map over the context and is refused as a layer.
    """

    denoiser_class = SD3Transformer2DModel
    denoiser_subfolder = "transformer"
    context_width_key = "joint_attention_dim"
    scheduler_class = FlowMatchEulerDiscreteScheduler

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-3.5-medium",
        pooled_embedding: Literal["zeros", "context_mean"] = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(pretrained_model_name_or_path, **kwargs)
        if pooled_embedding not in ("zeros", "context_mean"):
            raise ConfigError(f"pooled_embedding={pooled_embedding!r}: use 'zeros' or 'context_mean'.")
        if self.replace_output:
            raise ConfigError("replace_output=true reproduces StableXLKeypoints' replaced UNet cross-attention "
                              "outputs; SD 3's joint attention has no such variant. Set replace_output: false.")
        self.pooled_embedding = pooled_embedding
        self._noise_levels: dict[int | None, tuple[Tensor, Tensor]] = {}

    def check_denoiser_config(self, config: dict) -> None:
        name = config.get("_class_name", "SD3Transformer2DModel")
        if name != "SD3Transformer2DModel":
            raise ConfigError(f"{self.pretrained_model_name_or_path}: its transformer/ is a {name}, not an "
                              "SD3Transformer2DModel; lightning_modules.backbones.StableDiffusion3 runs SD 3 and 3.5 only.")

    def default_layers_of(self, config: dict) -> tuple[str, ...]:
        blocks, middle = int(config["num_layers"]), int(config["num_layers"]) // 2
        return tuple(joint_attention_layer(i) for i in range(max(0, middle - 2), min(blocks, middle + 2)))

    # ------------------------------------------------------------------ noise
    def set_noise_schedule(self, scheduler) -> None:
        """Keeps the flow-matching scheduler; its grid may depend on the image size (``noise_at``)."""
        self.check_noise_level(self.num_inference_steps)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self._noise_levels = {}

    def noise_at(self, image_tokens: int) -> tuple[Tensor, Tensor]:
        """-> (sigma, timestep), fp32 scalars: ``noise_level`` on the scheduler's ``num_inference_steps`` grid.

        A scheduler with ``use_dynamic_shifting`` shifts its grid by the image's ``image_tokens`` patches,
        as SD 3's pipeline does (``calculate_shift``); SD 3.5's fixed ``shift`` does not depend on it.
        """
        config = self.scheduler.config
        key = image_tokens if config.use_dynamic_shifting else None
        if key not in self._noise_levels:
            mu = None
            if config.use_dynamic_shifting:
                mu = calculate_shift(image_tokens, config.base_image_seq_len, config.max_image_seq_len,
                                     config.base_shift, config.max_shift)
            self.scheduler.set_timesteps(self.num_inference_steps, mu=mu)
            # sigmas ends with the terminal 0 of the sampler; the grid is the steps before it.
            sigma, timestep = self.scheduler.sigmas[:-1][self.noise_level], self.scheduler.timesteps[self.noise_level]
            self._noise_levels[key] = sigma.clone(), timestep.clone()
        return self._noise_levels[key]

    def patch_grid(self, latents: Tensor) -> int:
        """latents (B, C, h, w) -> the side of the transformer's patch grid, checked against what it can embed."""
        patch, limit = self.denoiser.config.patch_size, self.denoiser.config.pos_embed_max_size
        side = latents.shape[-1]
        pixels = side * self.vae_scale_factor
        if latents.shape[-2] != side or side % patch:
            raise ConfigError(f"{latents.shape[-2] * self.vae_scale_factor} x {pixels} px images: SD 3 needs square "
                              f"images whose side is a multiple of {patch * self.vae_scale_factor} px (data.image_size).")
        if limit is not None and side // patch > limit:
            raise ConfigError(f"data.image_size={pixels} makes a {side // patch} x {side // patch} patch grid, more than "
                              f"the transformer's pos_embed_max_size={limit}: use at most "
                              f"{limit * patch * self.vae_scale_factor} px.")
        return side // patch

    def add_noise(self, z: Tensor, noise: Tensor) -> Tensor:
        """z_t = (1 - sigma) z + sigma * eps (the scheduler's ``scale_noise``) at ``noise_level``."""
        sigma = self.noise_at(self.patch_grid(z) ** 2)[0].to(z.device, z.dtype)
        return (1 - sigma) * z + sigma * noise

    # ------------------------------------------------------------------ forward
    @property
    def shift_factor(self) -> float:
        """The VAE config's ``shift_factor`` (0 when it has none)."""
        return float(self.vae.config.shift_factor or 0.0)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Latents:
        """images (B, 3, S, S) in [0, 1] -> latents (B, 16, S/8, S/8) = (z - shift_factor) * scaling_factor of the
        VAE posterior's mean z, fp32, no gradient."""
        z = self.vae_mean(images * 2 - 1).float()
        return {"latents": (z - self.shift_factor) * self.scaling_factor}

    def pooled_projections(self, context: Tensor, batch_size: int) -> Tensor:
        """context (T, D) -> (B, pooled_projection_dim) per ``pooled_embedding``."""
        width = int(self.denoiser.config.pooled_projection_dim)
        if self.pooled_embedding == "zeros":
            return context.new_zeros(batch_size, width)
        mean = context.mean(dim=0)[:width]
        return F.pad(mean, (0, width - len(mean))).expand(batch_size, -1)

    def denoiser_forward(self, latents: Tensor, noise: Tensor, context: Tensor,
                         hidden: Tensor | None = None) -> Callable[[dict], object]:
        """One transformer call on noised ``latents``, as a function of its ``joint_attention_kwargs``: the
        context is the text stream's input (``encoder_hidden_states``), the same for every image."""
        batch = latents.shape[0]
        timestep = self.noise_at(self.patch_grid(latents) ** 2)[1].to(latents.device).expand(batch)
        noisy = self.applied.prepare(self.add_noise(latents, noise).to(self.dtype))
        hidden = context.to(self.dtype).unsqueeze(0).expand(batch, -1, -1) if hidden is None else hidden.to(self.dtype)
        pooled = self.pooled_projections(context, batch).to(self.dtype)
        return lambda call_kwargs: self.denoiser(noisy, encoder_hidden_states=hidden, pooled_projections=pooled,
                                                 timestep=timestep, joint_attention_kwargs=call_kwargs, return_dict=False)
