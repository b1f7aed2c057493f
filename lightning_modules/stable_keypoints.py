"""The LightningModule: a learned context that makes a frozen UNet's attention maps into keypoints.

The method, step by step: ``training_step`` (one VAE and one UNet call for each image and its
transformed copy, token selection, the two losses), ``choose_keypoint_tokens`` after fit (the K
tokens most often selected) and ``keypoints`` (maps averaged over augmentations, peaks). Everything
around it lives elsewhere: the family behind ``backbone``, the engine behind the backbone, the test
stage in ``evaluation.py``, context files in ``detector.py``, checks and files in ``app/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_modules import detector
from lightning_modules.app import fit_end
from lightning_modules.app import checkpoints
from lightning_modules.app.errors import CheckpointMismatchError
from lightning_modules.app.run_folder import provenance
from lightning_modules.app.seeding import ModelDraws
from lightning_modules.app.settings import (
    check_model_settings,
    check_optimizer,
    check_trainer_precision,
    require_finite_gradient,
    require_finite_loss,
)
from lightning_modules.augmentation import AffineAugmentation, PhotometricAugmentation, warp
from lightning_modules.backbones.base import Backbone
from lightning_modules.backbones.signature import ContextSignature
from lightning_modules.concentration import attention_concentration
from lightning_modules.engine import frozen_tensor_names, release_freed_host_memory
from lightning_modules.evaluation import RegressorEvaluation
from lightning_modules.keypoints import augmented_keypoints, inside_region, rank_keypoint_tokens, to_source_pixels
from lightning_modules.losses import equivariance_loss, localization_loss
from lightning_modules.selection import RankingMethod, select_tokens


class StableKeypoints(L.LightningModule):
    """Unsupervised keypoints from a frozen diffusion model (StableKeypoints, CVPR 2024).

    The only trainable tensor is the context (num_tokens, D), fed to the UNet as
    ``encoder_hidden_states``. Each step draws a random affine transform per image, encodes the
    image and its transformed copy in one VAE call, gets both attention maps in one UNet call,
    selects ``top_k`` tokens per image and applies the localization and equivariance losses.

    Args:
        backbone: the frozen model family (SD 1.5/2.x, SDXL, zero123plus).
        num_tokens: T, the number of context tokens.
        context_seed: seed of the context's N(0, 1) initialization.
        noise_seed: seed of every draw of the model: a training step's noise and transforms (with
            the rank, step and batch index, so a resumed run draws what the uninterrupted one would
            have), the token-ranking images and their noise, and each image's extraction noise and
            transforms (with its ``sample_key``: the same for any batch size, order or device count).
        feature_upsample_res: R, the side of the attention maps in pixels.
        top_k: K, tokens optimized per image (and keypoints in the end).
        furthest_point_num_samples: candidates kept by the ranking before furthest point sampling.
        selection: candidate ranking: ``gaussian`` (KL to a Gaussian at the argmax), ``entropy``
            or ``consistent`` (tokens 0..candidates-1).
        fps_maps: maps whose argmaxes the furthest point sampling spreads: ``original`` (the same
            maps as the ranking and the losses' targets) or ``transformed`` (StableKeypoints:
            the augmented image's maps, in the augmented frame).
        sigma_px: Gaussian sigma in pixels of the R grid, for the ranking and the localization target.
        localization_weight: weight of the localization loss.
        equivariance_weight: weight of the equivariance loss.
        equivariance_mask: average the equivariance loss over pixels the warp covers only
            (off = StableKeypoints: uncovered pixels count as zeros).
        augmentation: ranges of the random affine transform.
        photometric: opt-in colour jitter, grayscale and blur of the transformed copy in training
            (kornia; ``None`` or all zeros = off, StableKeypoints). Extraction never uses it.
        optimizer: the optimizer of the context; ``None`` = Adam(lr=5e-3), StableKeypoints' choice.
        num_indices: training images, drawn at random (seeded by ``noise_seed``), whose selections
            rank the global keypoint tokens.
        augmentation_iterations: random transforms averaged per image when extracting keypoints.
        soft_argmax_window_px: refine each keypoint to the soft-argmax in this odd window (pixels of
            the image); ``None`` = plain argmax.
        extraction_chunk_size: warped images per UNet call during extraction (``None`` = all
            ``batch_size x augmentation_iterations`` at once; lower it to save memory).
        predict_within_image: ``predict`` places keypoints on the photo only, never in the padding
            that makes a non-square image square (the batch's ``image_region``); ``False`` searches
            the whole square, as ``test`` does (StableKeypoints). Either way each point says
            whether it is ``inside`` the photo.
        pretrained_context: start from a trained context instead of a random one: a detector folder
            or its hub id (``lightning_modules/detector.py``), this project's ``embedding.safetensors``
            (with its keypoint tokens) or StableKeypoints' ``embedding.pt``.
        pretrained_keypoint_tokens: StableKeypoints' ``indices.pt`` (the K keypoint tokens).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_tokens: int = 500,
        context_seed: int = 0,
        noise_seed: int = 0,
        feature_upsample_res: int = 128,
        top_k: int = 10,
        furthest_point_num_samples: int = 25,
        selection: RankingMethod = "gaussian",
        fps_maps: Literal["original", "transformed"] = "original",
        sigma_px: float = 2.0,
        localization_weight: float = 100.0,
        equivariance_weight: float = 1000.0,
        equivariance_mask: bool = False,
        augmentation: AffineAugmentation = AffineAugmentation(),
        photometric: PhotometricAugmentation | None = None,
        optimizer: OptimizerCallable | None = None,
        num_indices: int = 100,
        augmentation_iterations: int = 10,
        soft_argmax_window_px: int | None = None,
        extraction_chunk_size: int | None = None,
        predict_within_image: bool = True,
        pretrained_context: str | None = None,
        pretrained_keypoint_tokens: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer"])
        check_model_settings(**self.hparams)  # before any weights load
        check_optimizer(optimizer)
        detector.check_sources(pretrained_context, pretrained_keypoint_tokens)
        self.backbone = backbone
        self.augmentation = augmentation
        self.photometric = photometric
        self.optimizer_factory = optimizer
        # Created in configure_model, once the backbone says how wide a token is.
        self.context: nn.Parameter | None = None
        # Global keypoint tokens (K,), ordered by selection count; set after fit (see keypoints.py).
        self.register_buffer("keypoint_tokens", torch.empty(0, dtype=torch.long))
        # Frozen weights never enter a checkpoint; their keys are absent on load by design.
        self.strict_loading = False
        self.evaluation: RegressorEvaluation | None = None
        # The step of the checkpoint this fit resumes, when its training had already ended (see on_fit_start).
        self._resumed_ended_at: int | None = None

    def signature(self) -> ContextSignature:
        """What this model's context only works with (``backbones/signature.py``)."""
        return self.backbone.signature(self.hparams.num_tokens, self.hparams.feature_upsample_res)

    # ------------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        check_trainer_precision(self.trainer.precision)  # before any download or model writing
        self.backbone.prepare()

    def setup(self, stage: str) -> None:
        # The CLI checks the value as typed (Lightning turns 16-mixed into bf16-mixed on CPU); this
        # check is for Trainers built in Python.
        check_trainer_precision(self.trainer.precision)
        checkpoints.use_atomic_writer(self.trainer.strategy)

    def configure_model(self) -> None:
        if self.context is not None and self.backbone.is_loaded:
            return
        self.backbone.load()
        hp = self.hparams
        if self.context is None and hp.pretrained_context:
            context, tokens = detector.load_pretrained(hp.pretrained_context, hp.pretrained_keypoint_tokens, self.signature(),
                                                       hp.top_k, need_tokens=self.needs_keypoint_tokens())
            self.context = nn.Parameter(context.to(self.device))
            if tokens is not None:
                self.keypoint_tokens = tokens.to(self.device)
        if self.context is None:
            generator = torch.Generator().manual_seed(hp.context_seed)
            init = torch.randn(hp.num_tokens, self.backbone.context_dim, generator=generator)
            self.context = nn.Parameter(init.to(self.device))
        elif self.context.shape[-1] != self.backbone.context_dim:
            raise CheckpointMismatchError(
                f"The context is {self.context.shape[-1]} wide but {self.backbone.pretrained_model_name_or_path} "
                f"expects {self.backbone.context_dim}: the checkpoint belongs to another model family."
            )
        self._ddp_params_and_buffers_to_ignore = frozen_tensor_names(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.Adam([self.context], lr=5e-3)
        return self.optimizer_factory([self.context])

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.prepare_to_save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_ended_at = checkpoints.restore(self, checkpoint)

    # ------------------------------------------------------------------ training
    @property
    def draws(self) -> ModelDraws:
        """The generators of every draw of the model, seeded by ``noise_seed`` and the draw's purpose."""
        return ModelDraws(self.hparams.noise_seed, self.device)

    def maps_of(self, images: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """images: (B, 3, S, S) in [0, 1] -> maps (B, T, R, R) with fresh noise (one generator, or one per image)."""
        latents = self.backbone.encode(images)
        noise = self.backbone.sample_noise(latents, generator)
        return self.backbone.attention_maps(latents, noise, self.context, self.hparams.feature_upsample_res)

    def losses(self, maps: Tensor, maps_transformed: Tensor, transform: Tensor) -> dict[str, Tensor]:
        """maps, maps_transformed: (B, T, R, R); transform: (B, 3, 3) -> the loss terms of one step."""
        hp = self.hparams
        tokens = self.select(maps.detach(), maps_transformed.detach() if hp.fps_maps == "transformed" else None)
        rows = torch.arange(maps.shape[0], device=maps.device)[:, None]
        selected, selected_transformed = maps[rows, tokens], maps_transformed[rows, tokens]  # (B, K, R, R)
        loss_loc = localization_loss(selected, hp.sigma_px)
        loss_equiv = equivariance_loss(selected, selected_transformed, transform, mask=hp.equivariance_mask)
        mass, entropy = attention_concentration(selected, hp.sigma_px)
        return {
            "loss": hp.localization_weight * loss_loc + hp.equivariance_weight * loss_equiv,
            "loss_loc": loss_loc,
            "loss_equiv": loss_equiv,
            "concentration": mass.mean(),
            "spatial_entropy": entropy.mean(),
            "tokens": tokens,
        }

    def select(self, maps: Tensor, fps_maps: Tensor | None = None) -> Tensor:
        """maps: (B, T, R, R) -> (B, top_k) tokens per image: ranked, then spread by furthest point sampling."""
        hp = self.hparams
        return select_tokens(maps, hp.top_k, hp.furthest_point_num_samples, hp.selection, hp.sigma_px, fps_maps=fps_maps)

    def equivariance_pair(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """images: (B, 3, S, S) -> (maps (2B, T, R, R) of the images then of their transformed copies,
        transforms (B, 3, 3) normalized, see ``augmentation.py``)."""
        transform = self.augmentation.sample(images.shape[0], generator, self.device)
        transformed = warp(images, transform)
        if self.photometric is not None:
            transformed = self.photometric(transformed, generator)
        # The image and its transformed copy share one VAE call and one UNet call.
        return self.maps_of(torch.cat([images, transformed]), generator), transform

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        batch_size = images.shape[0]
        maps, transform = self.equivariance_pair(images, self.draws.step(self.global_rank, self.global_step, batch_idx))
        # One split, not two slices: its backward joins the halves' gradients in one tensor instead of
        # writing each into its own zero-filled copy of the whole batch and adding them.
        out = self.losses(*maps.split(batch_size), transform)
        require_finite_loss(out, self.global_step)
        for name in ("loss", "loss_loc", "loss_equiv", "concentration", "spatial_entropy"):
            # sync_dist: the logged value is the mean over all ranks, not rank 0's share of the batch.
            self.log(f"train/{name}", out[name], prog_bar=name == "loss", batch_size=batch_size, sync_dist=True)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        require_finite_gradient(self.context.grad, self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.device.type == "cpu":
            release_freed_host_memory()

    # ------------------------------------------------------------------ keypoints
    @torch.no_grad()
    def choose_keypoint_tokens(self) -> Tensor:
        """Ranks tokens over ``num_indices`` random training images (docs/method.md section 5.1) -> ``keypoint_tokens`` (K,).

        The images are ``keypoint_index_dataloader(num_indices, noise_seed)``'s seeded draw, each
        with noise from ``(noise_seed, RANKING, sample_key)``. Global rank 0 ranks and broadcasts
        the tokens, so the ranks agree even where counts tie.
        """
        hp = self.hparams
        trainer = self.trainer
        tokens = torch.zeros(hp.top_k, dtype=torch.long, device=self.device)
        if trainer.is_global_zero:
            selections = []
            for batch in trainer.datamodule.keypoint_index_dataloader(hp.num_indices, hp.noise_seed):
                maps = self.maps_of(batch["image"].to(self.device), self.draws.ranking(batch["sample_key"]))
                selections.append(self.select(maps))
            if not selections:
                raise RuntimeError("No training images to rank keypoint tokens on: the index dataloader is empty.")
            selections = torch.cat(selections)
            tokens, _ = rank_keypoint_tokens(selections, hp.num_tokens, hp.top_k)
            rank_zero_info(f"Keypoint tokens (from {len(selections)} images): {tokens.tolist()}")
        if trainer.world_size > 1:
            tokens = trainer.strategy.broadcast(tokens.to(self.device), src=0)
        self.keypoint_tokens = tokens.to(self.device)
        return self.keypoint_tokens

    def needs_keypoint_tokens(self) -> bool:
        """Whether this command uses the keypoint tokens as they are (``test``, ``predict``); ``fit`` ranks its own."""
        return self._trainer is not None and self.trainer.state.fn in ("test", "predict") and not self.trainer.ckpt_path

    def ensure_keypoint_tokens(self) -> Tensor:
        """The keypoint tokens of the context, ranked first when it has none (a checkpoint from inside a fit)."""
        if not self.keypoint_tokens.numel():
            self.choose_keypoint_tokens()
        return self.keypoint_tokens

    @torch.no_grad()
    def keypoints(self, images: Tensor, sample_keys: Tensor | list[int], regions: Tensor | None = None) -> Tensor:
        """images: (B, 3, S, S) in [0, 1], their ``sample_key``s (B,) -> (B, K, 2) normalized (x, y) keypoints (docs/method.md section 5.2).

        ``regions`` (B, 4) normalized (x0, y0, x1, y1): search each image's keypoints there only.
        """
        hp = self.hparams
        return augmented_keypoints(self.maps_of, images, self.ensure_keypoint_tokens(), self.augmentation,
                                   hp.augmentation_iterations, self.draws.extraction(sample_keys, hp.augmentation_iterations),
                                   hp.soft_argmax_window_px, hp.extraction_chunk_size, regions)

    # ------------------------------------------------------------------ test: the evaluation stage
    def on_test_start(self) -> None:
        self.ensure_keypoint_tokens()
        self.evaluation = RegressorEvaluation.of(self.trainer.datamodule.evaluation(), self.device)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Keypoints of loader 0 (the regression split) and loader 1 (the test split) -> what
        ``RegressorEvaluation.step`` returns (the keypoints, and on loader 1 the regressor's predictions)."""
        return self.evaluation.step(dataloader_idx, batch, self.keypoints(batch["image"], batch["sample_key"]))

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.at_batch_start(dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self.evaluation.finish(self)

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        self.ensure_keypoint_tokens()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """-> keypoints (B, K, 2): normalized in the model's image, and (x, y) pixels of the source image;
        ``inside`` (B, K) bool: the point lies on the photo (not the padding of its square crop)."""
        regions = batch.get("image_region")
        restrict = regions if self.hparams.predict_within_image else None
        keypoints = self.keypoints(batch["image"], batch["sample_key"], restrict)
        pixels = to_source_pixels(keypoints, batch["crop_box"], batch.get("flipped"))
        inside = inside_region(keypoints, regions) if regions is not None else torch.ones_like(keypoints[..., 0]).bool()
        return {"path": batch["path"], "keypoints": keypoints, "keypoints_px": pixels, "inside": inside}

    # ------------------------------------------------------------------ export
    def run_dir(self) -> Path:
        """The folder this command writes into: ``trainer.default_root_dir`` (under the CLI the run's folder,
        or its ``test/`` or ``predict/<images>/``: ``app/run_folder.py``)."""
        return Path(self.trainer.default_root_dir)

    def provenance(self) -> dict[str, str | None]:
        """What this command's artifacts came from: ``checkpoint``, ``config`` and ``code_version``."""
        return provenance(self._trainer, self)

    def on_train_start(self) -> None:
        # This fit trains, so keypoint tokens ranked for the context it started from no longer belong to
        # it: no checkpoint of this fit holds them, and they are ranked again at its end.
        self.keypoint_tokens = torch.empty(0, dtype=torch.long, device=self.device)

    def on_train_end(self) -> None:
        # Not on_fit_end: Lightning calls that after its teardown has moved the module to the CPU, where
        # ranking num_indices images through a real UNet takes hours instead of seconds.
        fit_end.finish_fit(self)

    def on_fit_start(self) -> None:
        # A resume from a checkpoint whose training had ended (the run was killed while ranking the tokens
        # or exporting) trains no step, so Lightning calls no on_train_end: the run is finished here.
        if self._resumed_ended_at is not None:
            fit_end.finish_resumed(self, self._resumed_ended_at)
