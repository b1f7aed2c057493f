"""Shared fixtures: tiny random models written once per session, in the real diffusers layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    from lightning_modules.backbones import StableDiffusion

    path = tmp_path_factory.mktemp("models") / "sd15-tiny"
    StableDiffusion.write_tiny(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_module(tiny_sd_path):
    """A loaded StableKeypoints on the tiny SD model (shared: do not train it in place)."""
    from lightning_modules.backbones import StableDiffusion
    from lightning_modules.stable_keypoints import StableKeypoints

    module = StableKeypoints(StableDiffusion(str(tiny_sd_path)), num_tokens=40, feature_upsample_res=16, top_k=4,
                             furthest_point_num_samples=8, sigma_px=1.0)
    module.configure_model()
    return module


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    from lightning_modules.backbones import StableDiffusionXL

    path = tmp_path_factory.mktemp("models") / "sdxl-tiny"
    StableDiffusionXL.write_tiny(path)
    return path


@pytest.fixture(scope="session")
def tiny_zero123plus_path(tmp_path_factory) -> Path:
    from lightning_modules.backbones import Zero123Plus

    path = tmp_path_factory.mktemp("models") / "zero123plus-tiny"
    Zero123Plus.write_tiny(path)
    return path


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> Path:
    from data.demo import write_synthetic_cub

    root = tmp_path_factory.mktemp("data") / "CUB_200_2011"
    write_synthetic_cub(root)
    return root
