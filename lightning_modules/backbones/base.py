"""The one interface between the LightningModule and a frozen diffusion model family.

A family differs from another in a handful of facts: its denoiser (a UNet, or SD 3's transformer:
its class, subfolder and context width), how images become latents and are noised, which added
conditions its denoiser wants, its default captured layers and, for zero123plus, a reference pass.
Everything else (loading, freezing, capturing maps) is shared here, and the LightningModule only
calls ``encode``, ``sample_noise`` and ``attention_maps``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, SchedulerMixin, UNet2DConditionModel
from torch import Tensor, nn

from lightning_modules.app.errors import ConfigError
from lightning_modules.app.hub import ModelSource
from lightning_modules.backbones.signature import ContextSignature
from lightning_modules.capture import AttentionCall, AttentionCapture, check_layer_names
from lightning_modules.engine import AppliedEngine, Engine

#: What ``encode`` makes of a batch, by name: ``latents`` (B, C, h, w) always; a family may add more
#: (zero123plus' reference mode: its condition's posterior and image embedding). ``sample_noise`` draws
#: the noise of ``latents`` (and the family's own draws, under their own keys).
Latents = dict[str, Tensor]


class Backbone(nn.Module):
    """A frozen denoiser (UNet, or SD 3's transformer) + VAE that turns images and a context into attention maps.

    Weights load in ``load()`` (called from the LightningModule's ``configure_model``), never in
    ``__init__``, so building the config and ``--print_config`` cost nothing. This class is the UNet
    families' (DDIM noise, ``cross_attention_kwargs``); a family with another denoiser sets the class
    attributes below and overrides the noise and the call (``backbones/sd3.py``).

    Args:
        pretrained_model_name_or_path: hub id or local folder in diffusers layout
            (``unet/`` (SD 3: ``transformer/``), ``vae/``, ``scheduler/`` subfolders).
        revision: hub revision (branch, tag or commit).
        variant: weight file variant, e.g. ``fp16`` (loaded, then upcast to ``engine.dtype``).
        local_files_only: never touch the network; fail if the files are not cached/local.
        layers: full names of the captured cross-attention layers; ``None`` = the family default.
            Checked against the denoiser's config before any weight loads.
        noise_level: index into the scheduler's ``num_inference_steps`` timestep grid; -1 is the
            least noisy step (docs/method.md section 2).
        num_inference_steps: size of the timestep grid that ``noise_level`` indexes (DDIM's for the UNets,
            the flow-matching scheduler's for SD 3).
        latent_scaling_factor: the factor VAE latents are multiplied by; ``None`` = the VAE config's
            ``scaling_factor`` (0.13025 for SDXL). StableXLKeypoints used SD's 0.18215 for SDXL.
        replace_output: replace the captured layers' outputs with the bicubically downsampled
            high-resolution attention, as StableXLKeypoints did (changes the network and the maps of
            every captured layer after the first; for reproduction only).
        engine: how the denoiser runs and the maps are computed (``Engine``: dtype, early stop,
            checkpointing, ...), the same options for every family; no option changes a number
            except ``dtype``.
        create_if_missing: called with ``pretrained_model_name_or_path`` before loading when that
            folder does not exist, to write it; the demo names its tiny-model writer here
            (``data.demo_models.tiny_sd15`` ...). ``None``: a missing folder is an error.
    """

    #: Captured layers when ``layers`` is not given (a family whose default depends on the denoiser's
    #: config leaves it empty and overrides ``default_layers_of``).
    default_layers: ClassVar[tuple[str, ...]] = ()
    #: The denoiser: its diffusers class, its subfolder, and the config key of its context width D.
    denoiser_class: ClassVar[type] = UNet2DConditionModel
    denoiser_subfolder: ClassVar[str] = "unet"
    context_width_key: ClassVar[str] = "cross_attention_dim"
    #: The scheduler class whose config gives the noise schedule.
    scheduler_class: ClassVar[type] = DDIMScheduler

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        layers: list[str] | None = None,
        noise_level: int = -1,
        num_inference_steps: int = 50,
        latent_scaling_factor: float | None = None,
        replace_output: bool = False,
        engine: Engine = Engine(),
        create_if_missing: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        if latent_scaling_factor is not None and not latent_scaling_factor > 0:
            raise ConfigError(f"latent_scaling_factor={latent_scaling_factor}: give a positive factor, or null for the "
                              "VAE config's.")
        if num_inference_steps < 1 or not -num_inference_steps <= noise_level < num_inference_steps:
            raise ConfigError(
                f"noise_level={noise_level} with num_inference_steps={num_inference_steps}: noise_level indexes the "
                f"{num_inference_steps}-step timestep grid, so use {-num_inference_steps}..{num_inference_steps - 1} "
                "(-1, the default, is the least noisy step; num_inference_steps >= 1)."
            )
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        self.revision = revision
        self.variant = variant
        self.local_files_only = local_files_only
        # None until the denoiser's config is read, for a family whose default depends on it.
        self.layers = list(layers) if layers is not None else list(self.default_layers) or None
        self.noise_level = noise_level
        self.num_inference_steps = num_inference_steps
        self.latent_scaling_factor = latent_scaling_factor
        self.replace_output = replace_output
        self.engine = engine
        self.dtype = engine.torch_dtype
        self.create_if_missing = create_if_missing
        self.denoiser: nn.Module | None = None
        self.vae: AutoencoderKL | None = None
        self.capture: AttentionCapture | None = None
        self.applied = AppliedEngine()

    # ------------------------------------------------------------------ loading
    def prepare(self) -> None:
        """Once per machine before ``load`` (rank 0): writes the model folder if it is missing and asked to."""
        if self.create_if_missing is not None and not Path(self.pretrained_model_name_or_path).exists():
            self.create_if_missing(self.pretrained_model_name_or_path)

    @cached_property
    def source(self) -> ModelSource:
        """Where the weights come from, with the checks and errors of a local folder or a hub id."""
        return ModelSource(self.pretrained_model_name_or_path, self.revision, self.local_files_only,
                           denoiser=self.denoiser_subfolder)

    def _from_pretrained(self, cls: type, subfolder: str, **kwargs) -> nn.Module:
        if not issubclass(cls, SchedulerMixin):  # a scheduler has no weights, hence no variant
            kwargs["variant"] = self.variant
        return self.source.from_pretrained(cls, subfolder, **kwargs)

    @property
    def is_loaded(self) -> bool:
        return self.denoiser is not None

    @property
    def unet(self) -> nn.Module | None:
        """The denoiser, by the UNet families' name for it."""
        return self.denoiser

    def load(self) -> None:
        """Loads the denoiser, VAE and scheduler from ``pretrained_model_name_or_path``, then ``attach``es them."""
        if self.is_loaded:
            return
        self.check_layers()
        scheduler = self._from_pretrained(self.scheduler_class, "scheduler")
        self.attach(
            self._from_pretrained(self.denoiser_class, self.denoiser_subfolder, torch_dtype=self.dtype),
            self._from_pretrained(AutoencoderKL, "vae", torch_dtype=self.vae_dtype),
            scheduler,
        )

    def check_layers(self) -> None:
        """Checks ``layers`` (the family default when not given) on a weightless (meta-device) denoiser built
        from the folder's ``unet/config.json`` (SD 3: ``transformer/config.json``)."""
        config = self.source.load_config(self.denoiser_class, self.denoiser_subfolder)
        self.check_denoiser_config(config)
        if self.layers is None:
            self.layers = list(self.default_layers_of(config))
        with torch.device("meta"):
            denoiser = self.denoiser_class.from_config(config)
        check_layer_names(denoiser, self.layers)

    def check_denoiser_config(self, config: dict) -> None:
        """Hook: raise ConfigError if the denoiser's config does not belong to this family (before weights load)."""

    def default_layers_of(self, config: dict) -> tuple[str, ...]:
        """The captured layers when ``layers`` is not given, for a denoiser of this ``config``."""
        return self.default_layers

    def attach(self, denoiser: nn.Module, vae: AutoencoderKL, scheduler) -> None:
        """Freezes the given components and installs the attention capture.

        ``load`` calls it; benchmarks call it directly with randomly initialized real-size models.
        ``scheduler``'s config gives the noise schedule (``set_noise_schedule``).
        """
        if self.layers is None:
            self.layers = list(self.default_layers_of(denoiser.config))
        self.denoiser = denoiser if denoiser.dtype == self.dtype else denoiser.to(self.dtype)
        self.vae = vae if vae.dtype == self.vae_dtype else vae.to(self.vae_dtype)
        # Images are only ever encoded: the decoder (about 40 % of the VAE) would only hold memory.
        self.vae.decoder = self.vae.post_quant_conv = None
        self.set_noise_schedule(scheduler)
        self._load_extra()
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()
        self.applied = self.engine.apply(self.denoiser, self.vae)
        self.capture = AttentionCapture(self.denoiser, self.layers, stop_early=self.applied.stop_early,
                                        replace_output=self.replace_output, layer_maps=self.applied.layer_maps)

    def set_noise_schedule(self, scheduler) -> None:
        """The noise of ``noise_level``: ``scheduler``'s config run as a 50-step DDIM grid (docs/method.md section 2)."""
        scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=False)
        scheduler.set_timesteps(self.num_inference_steps)
        self.check_noise_level(len(scheduler.timesteps))
        self.scheduler = scheduler
        self.register_buffer("timestep", scheduler.timesteps[self.noise_level].clone(), persistent=False)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone(), persistent=False)

    def check_noise_level(self, steps: int) -> None:
        if not -steps <= self.noise_level < steps:
            raise ValueError(f"noise_level={self.noise_level} is outside the {steps}-step grid.")

    def _load_extra(self) -> None:
        """Hook for families that need more than denoiser + VAE + scheduler."""

    def frozen_modules(self) -> list[nn.Module]:
        return [self.denoiser, self.vae]

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.dtype

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen weights stay in eval mode even when Lightning puts the LightningModule in train mode.
        return super().train(False)

    @property
    def context_dim(self) -> int:
        """D, the width of one context token: the denoiser's ``cross_attention_dim`` (SD 3: ``joint_attention_dim``)."""
        if not self.is_loaded:
            raise RuntimeError("The backbone is not loaded yet: call load() first.")
        return int(self.denoiser.config[self.context_width_key])

    @property
    def family(self) -> str:
        """The family's name, which every trained context records: its class name."""
        return type(self).__name__

    def signature(self, num_tokens: int | None = None, feature_upsample_res: int | None = None) -> ContextSignature:
        """What a context trained with this backbone only works with (the width and a config-dependent default
        layer list once known: loaded, or read from a local folder)."""
        layers = self.layers
        if layers is None:  # a default that depends on the denoiser's config, readable from a local folder
            config = self.local_denoiser_config()
            layers = None if config is None else self.default_layers_of(config)
        width = self.context_dim if self.is_loaded else self.configured_context_dim()
        return ContextSignature(self.family, self.pretrained_model_name_or_path, None if layers is None else tuple(layers),
                                feature_upsample_res, num_tokens, width)

    def local_denoiser_config(self) -> dict | None:
        """A local folder's ``unet/config.json`` (SD 3: ``transformer/config.json``), read without weights or
        network; None for a hub id or a folder not written yet."""
        if not (Path(self.pretrained_model_name_or_path) / self.denoiser_subfolder / "config.json").is_file():
            return None
        return self.source.load_config(self.denoiser_class, self.denoiser_subfolder)

    def configured_context_dim(self) -> int | None:
        """D read from a local folder's denoiser config (no weights, no network); None for a hub id or a
        folder not written yet."""
        config = self.local_denoiser_config()
        return None if config is None else int(config[self.context_width_key])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """The latent scaling: ``latent_scaling_factor`` if set, else the VAE config's."""
        if self.latent_scaling_factor is not None:
            return float(self.latent_scaling_factor)
        return float(self.vae.config.scaling_factor)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def encode(self, images: Tensor) -> Latents:
        """images: (B, 3, S, S) in [0, 1] -> latents (B, C, S/8, S/8), fp32, no gradient."""
        z = self.vae_mean(images * 2 - 1) * self.scaling_factor
        return {"latents": z.float()}

    def vae_mean(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> the VAE posterior's mean (B, C, H/8, W/8), unscaled, in the VAE's dtype."""
        x = self.applied.prepare(x.to(self.vae.device, self.vae.dtype))
        return self.vae.encode(x).latent_dist.mean

    def sample_noise(self, latents: Latents, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Latents:
        """Fresh eps ~ N(0, I) for every latent of the batch.

        ``generator``: one for the whole batch, or one per image (row b's noise from ``generator[b]``,
        so an image's noise does not depend on the batch it is in).
        """
        if generator is None or isinstance(generator, torch.Generator):
            return {
                name: torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                for name, z in latents.items()
            }
        if len(generator) != len(latents["latents"]):
            raise ValueError(f"{len(generator)} generators for a batch of {len(latents['latents'])} images.")
        rows = [{name: torch.randn(z.shape[1:], generator=g, device=z.device, dtype=z.dtype) for name, z in latents.items()}
                for g in generator]
        return {name: torch.stack([row[name] for row in rows]) for name in latents}

    def add_noise(self, z: Tensor, noise: Tensor) -> Tensor:
        """z_t = sqrt(a) z + sqrt(1 - a) eps at ``timestep`` (DDIM's add_noise, without its dtype casts)."""
        alpha = self.alphas_cumprod[self.timestep].to(z.dtype)
        return alpha.sqrt() * z + (1 - alpha).sqrt() * noise

    def added_conditions(self, context: Tensor, batch_size: int, image_size: int) -> dict:
        """Keyword arguments the UNet needs beside the context (SDXL: ``added_cond_kwargs``)."""
        return {}

    def denoiser_forward(self, latents: Tensor, noise: Tensor, context: Tensor,
                         hidden: Tensor | None = None) -> Callable[[dict], object]:
        """One UNet call on noised ``latents``, as a function of its ``cross_attention_kwargs``.

        ``hidden``: the UNet's ``encoder_hidden_states`` (B, T, D) when a family makes them per image
        (zero123plus' ramped image embedding); default the context, the same for every image.
        """
        batch = latents.shape[0]
        noisy = self.applied.prepare(self.add_noise(latents, noise).to(self.dtype))
        hidden = context.to(self.dtype).unsqueeze(0).expand(batch, -1, -1) if hidden is None else hidden.to(self.dtype)
        kwargs = self.added_conditions(context, batch, latents.shape[-1] * self.vae_scale_factor)
        return lambda call_kwargs: self.denoiser(noisy, self.timestep, encoder_hidden_states=hidden, return_dict=False,
                                                 cross_attention_kwargs=call_kwargs, **kwargs)

    def denoiser_call(self, latents: Latents, noise: Latents, context: Tensor) -> Callable[[AttentionCall], None]:
        """What produces the maps for one ``AttentionCall`` (zero123plus adds a reference pass)."""
        forward = self.denoiser_forward(latents["latents"], noise["latents"], context)
        return lambda call: self.capture.run(forward, call)

    def attention_maps(self, latents: Latents, noise: Latents, context: Tensor, resolution: int) -> Tensor:
        """One denoiser call -> maps (B, T, R, R): per-image probabilities over the T context tokens.

        Args:
            latents: from ``encode``; noise: from ``sample_noise`` (explicit, so tests can fix it).
            context: (T, D) the learned context, shared by every image of the batch.
            resolution: R, the side of the maps (``feature_upsample_res``).
        """
        maps = self.capture.maps(self.denoiser_call(latents, noise, context), resolution)
        self.applied.after_call(maps.device)
        return maps
