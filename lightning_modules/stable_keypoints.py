"""The LightningModule: a learned context that makes a frozen UNet's attention maps into keypoints."""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_modules.augmentation import AffineAugmentation, PhotometricAugmentation, warp
from lightning_modules.backbones.base import Backbone
from lightning_modules.app.checkpoints import RECORD_KEY, AtomicCheckpointIO, check_fits, checkpoint_record
from lightning_modules.concentration import attention_concentration
from lightning_modules.detector import detector_embedding, embedding_metadata, is_hub_id
from lightning_modules.app.errors import CheckpointMismatchError, ConfigError, MissingFileError, NonFiniteError
from lightning_modules.evaluation import TEST_LOADER, RegressorEvaluation
from lightning_modules.keypoints import augmented_keypoints, inside_region, rank_keypoint_tokens, to_source_pixels
from lightning_modules.losses import equivariance_loss, localization_loss
from lightning_modules.app.run_folder import EMBEDDING_FILE, METRICS_FILE, REGRESSOR_FILE, provenance
from lightning_modules.app.seeding import Draw, seeded_generator
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
        allow_tf32: on CUDA, let fp32 matrix products use TF32 tensor cores (SPEC section 8 allows it;
            about 1e-3 relative error per product, far below the method's noise).
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
        allow_tf32: bool = True,
    ) -> None:
        super().__init__()
        check_settings(
            num_tokens=num_tokens,
            feature_upsample_res=feature_upsample_res,
            top_k=top_k,
            furthest_point_num_samples=furthest_point_num_samples,
            sigma_px=sigma_px,
            localization_weight=localization_weight,
            equivariance_weight=equivariance_weight,
            num_indices=num_indices,
            augmentation_iterations=augmentation_iterations,
            soft_argmax_window_px=soft_argmax_window_px,
            extraction_chunk_size=extraction_chunk_size,
        )
        # A hub id is looked up in configure_model (the cache, else the Hub), a local path here.
        if pretrained_context is not None and not Path(pretrained_context).exists() and not is_hub_id(pretrained_context):
            raise MissingFileError(
                f"model.pretrained_context={pretrained_context!r} does not exist: give the file a trained context was "
                "saved to, a detector folder or its hub id (owner/name)."
            )
        if pretrained_keypoint_tokens is not None and not Path(pretrained_keypoint_tokens).is_file():
            raise MissingFileError(f"model.pretrained_keypoint_tokens={pretrained_keypoint_tokens!r} does not exist: give "
                                   "the file the keypoint tokens were saved to.")
        self.save_hyperparameters(ignore=["backbone", "optimizer"])
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
        self.test_metric = None
        self.evaluation: RegressorEvaluation | None = None

    # ------------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        self._check_precision()  # before any download or model writing
        self.backbone.prepare()

    def setup(self, stage: str) -> None:
        self._check_precision()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            # Lightning's default writer can leave a truncated checkpoint on a full disk; a CheckpointIO
            # the user configured is kept.
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self.hparams.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _check_precision(self) -> None:
        # The CLI checks the value as typed (Lightning turns 16-mixed into bf16-mixed on CPU); this
        # check is for Trainers built in Python.
        check_trainer_precision(self.trainer.precision)

    def configure_model(self) -> None:
        if self.context is not None and self.backbone.is_loaded:
            return
        self.backbone.load()
        if self.context is None and self.hparams.pretrained_context:
            self._load_pretrained()
        if self.context is None:
            generator = torch.Generator().manual_seed(self.hparams.context_seed)
            init = torch.randn(self.hparams.num_tokens, self.backbone.context_dim, generator=generator)
            self.context = nn.Parameter(init.to(self.device))
        elif self.context.shape[-1] != self.backbone.context_dim:
            raise CheckpointMismatchError(
                f"The context is {self.context.shape[-1]} wide but {self.backbone.pretrained_model_name_or_path} "
                f"expects {self.backbone.context_dim}: the checkpoint belongs to another model family."
            )
        # DDP broadcasts from rank 0, when it wraps the module, every parameter and buffer it is not
        # told to ignore (about 10 GB for SDXL's frozen weights), and the buffers again at every forward.
        # Every rank loads the same frozen weights itself, so only what trains is synchronized.
        self._ddp_params_and_buffers_to_ignore = frozen_tensor_names(self)

    def _load_pretrained(self) -> None:
        hp = self.hparams
        path = detector_embedding(hp.pretrained_context)  # a file, a detector folder or a hub id
        if path.suffix == ".safetensors":
            self._check_trained_like_this(hp.pretrained_context, embedding_metadata(path))
        context, tokens = load_context(str(path), hp.pretrained_keypoint_tokens)
        if context.shape[-1] != self.backbone.context_dim:
            raise CheckpointMismatchError(
                f"pretrained_context={hp.pretrained_context!r} is {context.shape[-1]} wide but the "
                f"backbone expects {self.backbone.context_dim}."
            )
        if context.shape[0] != hp.num_tokens:
            raise CheckpointMismatchError(
                f"pretrained_context={hp.pretrained_context!r} holds {context.shape[0]} tokens but "
                f"model.num_tokens={hp.num_tokens}: set model.num_tokens {context.shape[0]}."
            )
        if not torch.isfinite(context).all():
            raise ConfigError(f"pretrained_context={hp.pretrained_context!r} holds non-finite values (NaN or inf).")
        if tokens is not None and tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < hp.num_tokens):
            raise ConfigError(
                f"The imported keypoint tokens {tokens.tolist()} must lie in [0, {hp.num_tokens}) "
                f"(model.num_tokens={hp.num_tokens}): they index the context's tokens."
            )
        self.context = nn.Parameter(context.float().to(self.device))
        if tokens is not None:
            self.keypoint_tokens = tokens.long().to(self.device)

    def _check_trained_like_this(self, source: str, meta: dict[str, str]) -> None:
        """Refuses a context trained with another family, other layers or another map resolution."""
        ours = {"family": type(self.backbone).__name__, "layers": ",".join(self.backbone.layers),
                "feature_upsample_res": str(self.hparams.feature_upsample_res)}
        differ = [f"{key}: {meta[key]!r} there, {value!r} here" for key, value in ours.items()
                  if key in meta and meta[key] != value]
        if differ:
            raise CheckpointMismatchError(
                f"pretrained_context={source!r} was trained differently ({'; '.join(differ)}): its keypoints would "
                "mean nothing here. Use the config it was trained with (a detector folder's config.yaml) or set "
                "these keys to its values."
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.Adam([self.context], lr=5e-3)
        return self.optimizer_factory([self.context])

    # ------------------------------------------------------------------ checkpoints
    def require_finite_context(self, what: str) -> None:
        """Refuses to write ``what`` from a context holding NaN or inf: nothing non-finite leaves the run."""
        if self.context is not None and not torch.isfinite(self.context).all():
            raise NonFiniteError(
                f"Refusing to write {what} at step {self.global_step}: the context holds "
                f"{int((~torch.isfinite(self.context)).sum())} non-finite values. Use an earlier checkpoint."
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.require_finite_context("a checkpoint")
        # Only what trains (and the chosen keypoint tokens): KBs to MBs, never the frozen GBs.
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("backbone.")
        }
        checkpoint[RECORD_KEY] = checkpoint_record(
            type(self.backbone).__name__, self.backbone.pretrained_model_name_or_path, self.backbone.layers,
            self.context.shape,
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_fits(
            checkpoint,
            family=type(self.backbone).__name__,
            model=self.backbone.pretrained_model_name_or_path,
            layers=self.backbone.layers,
            num_tokens=self.hparams.num_tokens,
            context_dim=self.backbone.context_dim if self.backbone.is_loaded else None,
        )
        state = checkpoint["state_dict"]
        if self.context is None:
            self.context = nn.Parameter(torch.empty_like(state["context"]))
        self.keypoint_tokens = torch.empty_like(state.get("keypoint_tokens", self.keypoint_tokens))

    # ------------------------------------------------------------------ training
    def _generator(self, *entropy: int) -> torch.Generator:
        """A generator on this device seeded from ``noise_seed`` and ``entropy``."""
        return seeded_generator(self.hparams.noise_seed, *entropy, device=self.device)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """A generator for one step's noise and transforms, reproducible from (seed, rank, step, batch).

        Resume-safe: Lightning restores ``global_step`` and the epoch's batch index from the checkpoint.
        """
        return self._generator(Draw.TRAINING_STEP, self.global_rank, self.global_step, batch_idx)

    def extraction_generators(self, sample_keys: Tensor | list[int]) -> list[torch.Generator]:
        """B x ``augmentation_iterations`` generators, image-major: augmentation i of the image with
        key k draws its transform and noise from ``(noise_seed, EXTRACTION, k, i)``, whatever its batch,
        position or device (``sample_key`` of ``data.base``)."""
        keys = [int(key) for key in sample_keys]
        return [self._generator(Draw.EXTRACTION, key, i) for key in keys for i in range(self.hparams.augmentation_iterations)]

    def maps_of(self, images: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """images: (B, 3, S, S) in [0, 1] -> maps (B, T, R, R) with fresh noise (one generator, or one per image)."""
        latents = self.backbone.encode(images)
        noise = self.backbone.sample_noise(latents, generator)
        return self.backbone.attention_maps(latents, noise, self.context, self.hparams.feature_upsample_res)

    def losses(self, maps: Tensor, maps_transformed: Tensor, transform: Tensor) -> dict[str, Tensor]:
        """maps, maps_transformed: (B, T, R, R); transform: (B, 3, 3) -> the loss terms of one step."""
        hp = self.hparams
        with torch.no_grad():
            fps_source = maps_transformed if hp.fps_maps == "transformed" else None
            tokens = select_tokens(
                maps.detach(),
                hp.top_k,
                hp.furthest_point_num_samples,
                hp.selection,
                hp.sigma_px,
                fps_maps=None if fps_source is None else fps_source.detach(),
            )
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
        maps, transform = self.equivariance_pair(images, self.step_generator(batch_idx))
        # One split, not two slices: its backward joins the halves' gradients in one tensor instead of
        # writing each into its own zero-filled copy of the whole batch and adding them.
        out = self.losses(*maps.split(batch_size), transform)
        if not torch.isfinite(out["loss"]):
            raise NonFiniteError(
                f"Training stopped at step {self.global_step}: the loss is {out['loss'].item()} "
                f"(localization {out['loss_loc'].item()}, equivariance {out['loss_equiv'].item()}). "
                "Lower the optimizer's lr or check model.sigma_px and the loss weights; resume from the last "
                "checkpoint written before this step."
            )
        for name in ("loss", "loss_loc", "loss_equiv", "concentration", "spatial_entropy"):
            # sync_dist: the logged value is the mean over all ranks, not rank 0's share of the batch.
            self.log(f"train/{name}", out[name], prog_bar=name == "loss", batch_size=batch_size, sync_dist=True)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grad = self.context.grad
        if grad is not None and not torch.isfinite(grad).all():
            raise NonFiniteError(
                f"Training stopped at step {self.global_step}: the context's gradient holds "
                f"{int((~torch.isfinite(grad)).sum())} non-finite values, so the step was not taken. "
                "Lower the optimizer's lr or check the loss weights; resume from the last checkpoint."
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.device.type == "cpu":
            release_freed_host_memory()

    # ------------------------------------------------------------------ keypoints
    @torch.no_grad()
    def choose_keypoint_tokens(self) -> Tensor:
        """Ranks tokens over ``num_indices`` random training images (SPEC 5.1) -> ``keypoint_tokens`` (K,).

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
                generators = [self._generator(Draw.RANKING, int(key)) for key in batch["sample_key"]]
                maps = self.maps_of(batch["image"].to(self.device), generators)
                selections.append(select_tokens(maps, hp.top_k, hp.furthest_point_num_samples, hp.selection, hp.sigma_px))
            if not selections:
                raise RuntimeError("No training images to rank keypoint tokens on: the index dataloader is empty.")
            selections = torch.cat(selections)
            tokens, _ = rank_keypoint_tokens(selections, hp.num_tokens, hp.top_k)
            rank_zero_info(f"Keypoint tokens (from {len(selections)} images): {tokens.tolist()}")
        if trainer.world_size > 1:
            tokens = trainer.strategy.broadcast(tokens.to(self.device), src=0)
        self.keypoint_tokens = tokens.to(self.device)
        return self.keypoint_tokens

    def ensure_keypoint_tokens(self) -> Tensor:
        if not self.keypoint_tokens.numel():
            self.choose_keypoint_tokens()
        return self.keypoint_tokens

    @torch.no_grad()
    def keypoints(self, images: Tensor, sample_keys: Tensor | list[int], regions: Tensor | None = None) -> Tensor:
        """images: (B, 3, S, S) in [0, 1], their ``sample_key``s (B,) -> (B, K, 2) normalized (x, y) keypoints (SPEC 5.2).

        ``regions`` (B, 4) normalized (x0, y0, x1, y1): search each image's keypoints there only.
        """
        hp = self.hparams
        return augmented_keypoints(
            self.maps_of,
            images,
            self.ensure_keypoint_tokens(),
            self.augmentation,
            hp.augmentation_iterations,
            self.extraction_generators(sample_keys),
            hp.soft_argmax_window_px,
            hp.extraction_chunk_size,
            regions,
        )

    # ------------------------------------------------------------------ test: regressor + metric
    def on_test_start(self) -> None:
        self.ensure_keypoint_tokens()
        self.test_metric = self.trainer.datamodule.make_metric()
        self.evaluation = RegressorEvaluation(self.test_metric, self.trainer.datamodule.fit_regressor, self.device)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Keypoints of loader 0 (the regression split) and loader 1 (the test split), collected by
        ``self.evaluation`` (``lightning_modules/evaluation.py``).

        -> ``keypoints`` (B, K, 2) and, for loader 1, the regressor's ``predictions`` (B, J, 2),
        normalized (x, y), for callbacks (``callbacks.visualization.TestResultsTable``).
        """
        keypoints = self.keypoints(batch["image"], batch["sample_key"])
        self.evaluation.update(dataloader_idx, batch["index"], keypoints, batch["keypoints"], batch["visible"])
        if dataloader_idx != TEST_LOADER:
            return {"keypoints": keypoints}
        return {"keypoints": keypoints, "predictions": self.evaluation.regressor(keypoints)}

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The loader boundary: every rank has collected its share of the regression split.
        if dataloader_idx == TEST_LOADER and self.evaluation.regressor is None:
            self.evaluation.fit()

    def on_test_epoch_end(self) -> None:
        name = metric_name(self.test_metric)
        value = self.evaluation.score(self.global_rank, self.trainer.world_size)
        self.log(f"test/{name}", value, add_dataloader_idx=False, sync_dist=True)  # equal on every rank
        if self.trainer.is_global_zero:
            out = self.run_dir()
            out.mkdir(parents=True, exist_ok=True)
            self.evaluation.regressor.save(out / REGRESSOR_FILE)
            result = {
                "metric": name,
                "value": value,
                "higher_is_better": bool(self.test_metric.higher_is_better),
                "dataset": type(self.trainer.datamodule).__name__,
                "keypoint_tokens": self.keypoint_tokens.tolist(),
                "model": self.backbone.pretrained_model_name_or_path,
                "num_regression_images": self.evaluation.num_regression_images,
                "num_test_images": self.evaluation.num_test_images,
                **self.provenance(),
            }
            (out / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
            rank_zero_info(f"\n{'metric':<32} value\n{name:<32} {value:.4f}\nwritten to {out / METRICS_FILE}")

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
        """The folder this command writes into: ``trainer.default_root_dir``.

        Under the CLI that is the fit run's folder, or the run's ``test/`` or ``predict/<images>/``
        (``lightning_modules/app/run_folder.py``); every artifact's path starts here. Each node plans it on
        its own disk (processes Lightning launches take their launcher's plan), so a rank writes
        beside its node's copy of the checkpoint.
        """
        return Path(self.trainer.default_root_dir)

    def provenance(self) -> dict[str, str | None]:
        """What this command's artifacts came from: ``checkpoint``, ``config`` and ``code_version``."""
        return provenance(self._trainer, self)

    def export_embedding(self, path: str | Path, checkpoint: str | None = None) -> Path:
        """Writes the context (and the keypoint tokens, when chosen) to a safetensors file.

        Its metadata names the model, the layers and the origin (``provenance()``; ``checkpoint``:
        the checkpoint holding the same context, when there is one).
        """
        self.require_finite_context(f"the context to {path}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"context": self.context.detach().float().cpu().contiguous()}
        if self.keypoint_tokens.numel():
            tensors["keypoint_tokens"] = self.keypoint_tokens.cpu().contiguous()
        metadata = {
            "model": self.backbone.pretrained_model_name_or_path,
            "family": type(self.backbone).__name__,
            "layers": ",".join(self.backbone.layers),
            "feature_upsample_res": str(self.hparams.feature_upsample_res),
            "global_step": str(self.global_step),
            **{key: str(value) for key, value in self.provenance().items()},
        }
        if checkpoint:  # fit: the context is that of its last checkpoint; record where it started from
            metadata["started_from"] = metadata["checkpoint"]
            metadata["checkpoint"] = str(Path(checkpoint).resolve())
        save_file(tensors, str(path), metadata=metadata)
        return path

    def on_train_end(self) -> None:
        # Not on_fit_end: Lightning calls that after its teardown has moved the module to the CPU, where
        # ranking num_indices images through a real UNet takes hours instead of seconds.
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
        if self.trainer.datamodule is not None and not self.keypoint_tokens.numel():
            self.choose_keypoint_tokens()
            # The last checkpoint was written before the tokens existed: refresh it so that test and
            # predict from it need not rank them again.
            # save_checkpoint holds a barrier, so every rank must take the same branch: rank 0 (the
            # one that writes) decides, since on node-local disks the file exists on its node only.
            if self.trainer.strategy.broadcast(bool(last) and Path(last).exists(), src=0):
                self.trainer.save_checkpoint(last, weights_only=False)  # a full checkpoint, as ModelCheckpoint's
        if self.trainer.is_global_zero:
            path = self.export_embedding(self.run_dir() / EMBEDDING_FILE, checkpoint=last or None)
            rank_zero_info(f"Context exported to {path}")


def check_trainer_precision(precision: str | int | None) -> None:
    """Raises ``ConfigError`` naming ``precision`` unless it keeps the context, maps and losses in fp32."""
    if precision is None or str(precision) in ("32-true", "32", "64-true", "64"):
        return
    raise ConfigError(
        f"trainer.precision={str(precision)!r} is refused: fp16 does not converge for this method and "
        "mixed precision would also cast the context, maps and losses. Keep trainer.precision at 32 and "
        "set model.backbone.init_args.engine.dtype: bfloat16 to run only the frozen UNet/VAE in bf16."
    )


def check_settings(
    *,
    num_tokens: int,
    feature_upsample_res: int,
    top_k: int,
    furthest_point_num_samples: int,
    sigma_px: float,
    localization_weight: float,
    equivariance_weight: float,
    num_indices: int,
    augmentation_iterations: int,
    soft_argmax_window_px: int | None,
    extraction_chunk_size: int | None,
) -> None:
    """Raises ``ConfigError`` naming the first ``model.<key>`` whose value cannot work.

    Checked where the values enter (``__init__``), so a bad value stops the run before any weights
    load instead of ending in a raw torch error, a NaN context or a failure after all of training.
    """
    positive = dict(
        num_tokens=num_tokens,
        feature_upsample_res=feature_upsample_res,
        sigma_px=sigma_px,
        num_indices=num_indices,
        augmentation_iterations=augmentation_iterations,
    )
    for key, value in positive.items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"model.{key}={value!r}: it must be > 0.")
    for key, value in dict(localization_weight=localization_weight, equivariance_weight=equivariance_weight).items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"model.{key}={value!r}: a loss weight must be finite and >= 0.")
    if not 2 <= top_k <= furthest_point_num_samples <= num_tokens:
        raise ConfigError(
            f"model.top_k={top_k}, model.furthest_point_num_samples={furthest_point_num_samples}, "
            f"model.num_tokens={num_tokens}: need 2 <= top_k <= furthest_point_num_samples <= num_tokens."
        )
    if soft_argmax_window_px is not None and (soft_argmax_window_px <= 0 or soft_argmax_window_px % 2 == 0):
        raise ConfigError(
            f"model.soft_argmax_window_px={soft_argmax_window_px}: use an odd positive window (e.g. 5), "
            "or null for the plain argmax."
        )
    if extraction_chunk_size is not None and extraction_chunk_size <= 0:
        raise ConfigError(f"model.extraction_chunk_size={extraction_chunk_size}: use a positive number, or null for all at once.")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_host_memory() -> None:
    """Hands memory freed by tensors back to the OS (glibc only; a no-op elsewhere).

    glibc keeps freed heap memory for reuse, and a training step's mix of tensor sizes fragments
    it: on CPU the peak RSS of SD 1.5 at 512 px grew from 5.7 to 6.4 GiB over three steps without
    this, and stays at 5.75 GiB with it, at no measurable cost (``benchmarks/bench.py``).
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def frozen_tensor_names(module: nn.Module) -> list[str]:
    """Names of every buffer and every parameter that does not train: what DDP need not synchronize."""
    names = [name for name, parameter in module.named_parameters() if not parameter.requires_grad]
    return names + [name for name, _ in module.named_buffers()]


def metric_name(metric) -> str:
    """``NormalizedKeypointError`` -> ``normalized_keypoint_error``: the key of ``test/<name>``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(metric).__name__).lower()


def load_context(path: str, tokens_path: str | None = None) -> tuple[Tensor, Tensor | None]:
    """A trained context (T, D) and its keypoint tokens (K,) or None, from either file format.

    This project's ``embedding.safetensors`` holds both; StableKeypoints saved the context as
    ``embedding.pt`` ((T, D) or (1, T, D)) and the tokens separately as ``indices.pt``.
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"model.pretrained_context={path!r} does not exist.")
    tokens = None
    if file.suffix == ".safetensors":
        tensors = load_file(str(file))
        if "context" not in tensors:
            raise ConfigError(f"model.pretrained_context: {path} holds no 'context' tensor (keys: {sorted(tensors)}).")
        context, tokens = tensors["context"], tensors.get("keypoint_tokens")
    else:
        context = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(context, Tensor):
            raise ConfigError(f"model.pretrained_context: {path} does not hold a tensor: expected StableKeypoints' embedding.pt.")
    if context.dim() == 3 and context.shape[0] == 1:
        context = context[0]
    if context.dim() != 2:
        raise ConfigError(f"model.pretrained_context: {path}: a context is (T, D) or (1, T, D), got {tuple(context.shape)}.")
    if tokens_path is not None:
        if not Path(tokens_path).is_file():
            raise MissingFileError(f"model.pretrained_keypoint_tokens={tokens_path!r} does not exist.")
        tokens = torch.load(tokens_path, map_location="cpu", weights_only=True)
        tokens = torch.as_tensor(tokens).flatten().long()
    return context, tokens
