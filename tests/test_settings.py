"""Bad settings stop the run where they enter; nothing non-finite is trained on or written."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_modules.app.errors import CheckpointMismatchError, ConfigError, DamagedFileError, NonFiniteError
from lightning_modules.detector import export_context
from lightning_modules.stable_keypoints import StableKeypoints
from tests.conftest import tiny_module

def unloaded(**overrides) -> StableKeypoints:
    """A module on a backbone that is never loaded: settings checks must not need weights."""
    return tiny_module("/no/such/model", load=False, **overrides)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sigma_px", 0.0, "model.sigma_px=0.0: it must be > 0"),
        ("sigma_px", -1.0, "model.sigma_px=-1.0: it must be > 0"),
        ("sigma_px", math.nan, "model.sigma_px=nan: it must be > 0"),
        ("feature_upsample_res", 0, "model.feature_upsample_res=0: it must be > 0"),
        ("num_indices", 0, "model.num_indices=0: it must be > 0"),
        ("augmentation_iterations", 0, "model.augmentation_iterations=0: it must be > 0"),
        ("soft_argmax_window_px", 4, "model.soft_argmax_window_px=4: use an odd positive window"),
        ("soft_argmax_window_px", 0, "model.soft_argmax_window_px=0: use an odd positive window"),
        ("soft_argmax_window_px", -3, "model.soft_argmax_window_px=-3: use an odd positive window"),
        ("extraction_chunk_size", 0, "model.extraction_chunk_size=0: use a positive number"),
        ("localization_weight", -1.0, "model.localization_weight=-1.0: a loss weight must be finite and >= 0"),
        ("equivariance_weight", math.inf, "model.equivariance_weight=inf: a loss weight must be finite and >= 0"),
        ("top_k", 1, "model.top_k=1, .*need 2 <= top_k"),
        ("num_tokens", 0, "model.num_tokens=0: it must be > 0"),
    ],
)
def test_a_bad_model_setting_is_a_config_error_naming_the_key(key, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        unloaded(**{key: value})


def test_good_non_default_settings_pass() -> None:
    module = unloaded(soft_argmax_window_px=5, extraction_chunk_size=3, augmentation_iterations=2, num_indices=7,
                      localization_weight=0.0)
    assert (module.hparams.soft_argmax_window_px, module.hparams.num_indices) == (5, 7)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("batch_size", 0, "data.batch_size=0: it must be > 0"), ("num_workers", -1, "data.num_workers=-1: it must be >= 0")],
)
def test_a_bad_data_setting_is_a_config_error_naming_the_key(key, value, message, cub_root) -> None:
    from data.cub import CUBDataModule

    with pytest.raises(ConfigError, match=message):
        CUBDataModule(str(cub_root), image_size=64, **{key: value})


def test_a_nan_loss_stops_training_naming_the_step(tiny_sd_module) -> None:
    images = torch.full((1, 3, 64, 64), math.nan)
    with pytest.raises(NonFiniteError, match=r"Training stopped at step 0: the loss is nan .*lr"):
        tiny_sd_module.training_step({"image": images}, 0)


def test_a_non_finite_gradient_stops_before_the_optimizer_step(tiny_sd_module) -> None:
    context = tiny_sd_module.context
    context.grad = torch.zeros_like(context)
    context.grad[3, 1] = math.inf
    try:
        with pytest.raises(NonFiniteError, match="step 0: the context's gradient holds 1 non-finite values"):
            tiny_sd_module.on_before_optimizer_step(torch.optim.Adam([context]))
        context.grad[3, 1] = 0.0
        tiny_sd_module.on_before_optimizer_step(torch.optim.Adam([context]))  # a finite gradient passes
    finally:
        context.grad = None


def test_a_non_finite_context_is_never_exported_or_checkpointed(tmp_path) -> None:
    module = unloaded()
    context = torch.zeros(40, 32)
    context[0, 0] = math.nan
    module.context = nn.Parameter(context)
    with pytest.raises(NonFiniteError, match="Refusing to write the context to .*1 non-finite values"):
        export_context(module, tmp_path / "embedding.safetensors")
    assert not (tmp_path / "embedding.safetensors").exists()
    with pytest.raises(NonFiniteError, match="Refusing to write a checkpoint"):
        module.on_save_checkpoint({"state_dict": {"context": module.context}})


def _write_embedding(path, context: torch.Tensor, tokens: list[int]) -> str:
    from safetensors.torch import save_file

    from lightning_modules.backbones import StableDiffusion

    # The metadata every exported context file carries (a file without it is refused: tests/test_user_errors.py).
    metadata = {"family": "StableDiffusion", "layers": ",".join(StableDiffusion.default_layers), "feature_upsample_res": "16"}
    save_file({"context": context, "keypoint_tokens": torch.tensor(tokens)}, str(path), metadata=metadata)
    return str(path)


def test_imported_keypoint_tokens_must_index_the_context(tiny_sd_path, tmp_path) -> None:
    path = _write_embedding(tmp_path / "embedding.safetensors", torch.randn(40, 32), [0, 3, 40, 5])
    module = tiny_module(tiny_sd_path, load=False, pretrained_context=path)
    with pytest.raises(DamagedFileError, match=r"keypoint tokens \[0, 3, 40, 5\] must lie in \[0, 40\)"):
        module.configure_model()


def test_an_imported_context_of_another_token_count_is_refused(tiny_sd_path, tmp_path) -> None:
    path = _write_embedding(tmp_path / "embedding.safetensors", torch.randn(30, 32), [0, 1, 2, 3])
    module = tiny_module(tiny_sd_path, load=False, pretrained_context=path)
    with pytest.raises(CheckpointMismatchError, match="holds 30 tokens but model.num_tokens=40"):
        module.configure_model()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(degrees=-1.0), r"model.augmentation.degrees=-1.0: it must be finite and >= 0"),
        (dict(degrees=math.nan), r"model.augmentation.degrees=nan"),
        (dict(translate_frac=-0.1), r"model.augmentation.translate_frac=-0.1"),
        (dict(scale=(0.0, 1.0)), r"model.augmentation.scale=\(0.0, 1.0\): need 0 < low <= high"),
        (dict(scale=(1.0, 0.8)), r"model.augmentation.scale=\(1.0, 0.8\)"),
    ],
)
def test_a_bad_augmentation_range_is_a_config_error(options, message) -> None:
    from lightning_modules.augmentation import AffineAugmentation

    with pytest.raises(ConfigError, match=message):
        AffineAugmentation(**options)


@pytest.mark.parametrize("key", ["pretrained_context", "pretrained_keypoint_tokens"])
def test_a_missing_pretrained_file_is_named_before_any_weights_load(key, tmp_path) -> None:
    from lightning_modules.app.errors import MissingFileError

    with pytest.raises(MissingFileError, match=f"model.{key}='.*missing.pt' does not exist"):
        unloaded(**{key: str(tmp_path / "missing.pt")})
