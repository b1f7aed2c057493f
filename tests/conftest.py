"""Shared fixtures: tiny random models written once per session, in the real diffusers layout."""

from __future__ import annotations

import functools
import http.server
import os
import threading
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


#: The tiny model's usual settings: 40 tokens, 16 px maps, 4 keypoints of 8 candidates, sigma 1 px.
TINY_SETTINGS = dict(num_tokens=40, feature_upsample_res=16, top_k=4, furthest_point_num_samples=8, sigma_px=1.0)


def tiny_module(model_path, family: type | None = None, backbone: dict | None = None, load: bool = True, **settings):
    """A ``StableKeypoints`` on a tiny model: ``TINY_SETTINGS`` updated by ``settings``.

    Args:
        model_path: the tiny model's folder (a fixture of this file).
        family: the backbone class (default ``StableDiffusion``); backbone: its keyword arguments.
        load: load the weights and make the context (``configure_model``).
    """
    from lightning_modules.backbones import StableDiffusion
    from lightning_modules.stable_keypoints import StableKeypoints

    module = StableKeypoints((family or StableDiffusion)(str(model_path), **(backbone or {})), **{**TINY_SETTINGS, **settings})
    if load:
        module.configure_model()
    return module


@pytest.fixture(scope="session")
def tiny_sd_module(tiny_sd_path):
    """A loaded StableKeypoints on the tiny SD model (shared: do not train it in place)."""
    return tiny_module(tiny_sd_path)


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
def tiny_zero123plus_64_path(tiny_zero123plus_path, tmp_path_factory) -> Path:
    """The tiny zero123plus with a 64 px condition image instead of v1.2's 512: the same code path, a fraction of the work."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("z123") / "zero123plus-tiny-64"
    shutil.copytree(tiny_zero123plus_path, folder)
    config = folder / "feature_extractor_vae" / "preprocessor_config.json"
    small = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
    config.write_text(json.dumps({**json.loads(config.read_text()), **small}))
    return folder


@pytest.fixture(scope="session")
def tiny_sd35_path(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory, "StableDiffusion3", "sd35-tiny")


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> Path:
    from data.demo import write_synthetic_cub

    root = tmp_path_factory.mktemp("data") / "CUB_200_2011"
    write_synthetic_cub(root)
    return root


@pytest.fixture
def served(tmp_path: Path):
    """A folder served over HTTP on localhost (pooch fetches http, https and ftp) -> (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
