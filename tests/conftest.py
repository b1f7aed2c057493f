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


def _tiny_model(tmp_path_factory, family: str, name: str) -> Path:
    """Writes the tiny random model of ``lightning_modules.backbones.<family>`` into a session folder."""
    from data.demo_models import write_tiny

    return write_tiny(family, tmp_path_factory.mktemp("models") / name)


@pytest.fixture(autouse=True)
def image_check_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test's decode-check cache (data.decode_check) in its own folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder / "stable_keypoints"


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory, "StableDiffusion", "sd15-tiny")


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
    return _tiny_model(tmp_path_factory, "StableDiffusionXL", "sdxl-tiny")


@pytest.fixture(scope="session")
def tiny_zero123plus_path(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory, "Zero123Plus", "zero123plus-tiny")


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> Path:
    from data.demo import write_synthetic_cub

    root = tmp_path_factory.mktemp("data") / "CUB_200_2011"
    write_synthetic_cub(root)
    return root
