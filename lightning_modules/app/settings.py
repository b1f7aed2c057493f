"""Values that cannot work, refused where they enter with a line naming the key, before any expensive work."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from lightning_modules.app.errors import ConfigError, NonFiniteError


def check_trainer_precision(precision: str | int | None) -> None:
    """Raises ``ConfigError`` naming ``precision`` unless it keeps the context, maps and losses in fp32."""
    if precision is None or str(precision) in ("32-true", "32", "64-true", "64"):
        return
    raise ConfigError(
        f"trainer.precision={str(precision)!r} is refused: fp16 does not converge for this method and "
        "mixed precision would also cast the context, maps and losses. Keep trainer.precision at 32 and "
        "set model.backbone.init_args.engine.dtype: bfloat16 to run only the frozen UNet/VAE in bf16."
    )


def check_training_steps(trainer: Mapping) -> None:
    """Raises ``ConfigError`` naming the ``trainer.<key>`` (as typed) that leaves ``fit`` no training step to run.

    (A batch larger than the training split is the data's check: ``KeypointDataModule.check_stage``.)
    """
    max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ConfigError(f"trainer.max_steps={max_steps}: not one training step would run. Give the number of steps "
                          "to train (the demo trains 40), or -1 to train for trainer.max_epochs.")
    if max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
        raise ConfigError(f"trainer.max_epochs={max_epochs}: not one training step would run. Give a positive number "
                          "of epochs, or leave it unset and give trainer.max_steps.")
    limit = trainer.get("limit_train_batches")
    if limit is not None and limit <= 0:
        raise ConfigError(f"trainer.limit_train_batches={limit}: not one training step would run. Leave it unset (all "
                          "batches), or give a positive number of batches or fraction of them.")


def check_model_settings(
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
    **other: object,
) -> None:
    """Raises ``ConfigError`` naming the first ``model.<key>`` whose value cannot work (``other`` keys are not checked).

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


def check_optimizer(optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None) -> None:
    """Builds ``model.optimizer`` once on a stand-in parameter, so a value it refuses (``lr: -1``) or a non-finite
    one stops the run before any weights load, the run's folder or its W&B run exist."""
    if optimizer is None:
        return
    try:
        built = optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model.optimizer: {error}. Fix its init_args (StableKeypoints: torch.optim.Adam with "
                          "lr 0.005).") from error
    for key, value in built.param_groups[0].items():
        numbers = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"model.optimizer: {type(built).__name__}'s {key}={value!r} is not finite: give a finite "
                              "value in its init_args.")


def require_finite_context(context: Tensor | None, what: str, step: int) -> None:
    """Refuses to write ``what`` from a context holding NaN or inf: nothing non-finite leaves the run."""
    if context is not None and not torch.isfinite(context).all():
        raise NonFiniteError(
            f"Refusing to write {what} at step {step}: the context holds {int((~torch.isfinite(context)).sum())} "
            "non-finite values. Use an earlier checkpoint."
        )


def require_finite_loss(losses: dict[str, Tensor], step: int) -> None:
    """Stops training at a NaN or infinite loss, naming the step and both terms."""
    if not torch.isfinite(losses["loss"]):
        raise NonFiniteError(
            f"Training stopped at step {step}: the loss is {losses['loss'].item()} "
            f"(localization {losses['loss_loc'].item()}, equivariance {losses['loss_equiv'].item()}). "
            "Lower the optimizer's lr or check model.sigma_px and the loss weights; resume from the last "
            "checkpoint written before this step."
        )


def require_finite_gradient(grad: Tensor | None, step: int) -> None:
    """Stops training before an optimizer step on a non-finite gradient of the context."""
    if grad is not None and not torch.isfinite(grad).all():
        raise NonFiniteError(
            f"Training stopped at step {step}: the context's gradient holds {int((~torch.isfinite(grad)).sum())} "
            "non-finite values, so the step was not taken. Lower the optimizer's lr or check the loss weights; "
            "resume from the last checkpoint."
        )
