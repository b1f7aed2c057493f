"""Where weights come from: local folders, hub ids offline and online, and the demo's own tiny model."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from unittest import mock

import pytest

import lightning_modules.app.hub as hub
from lightning_modules.backbones import StableDiffusion, StableDiffusionXL
from lightning_modules.app.errors import HubError, MissingFileError


def test_a_hub_id_offline_names_it_and_says_what_to_do():
    # conftest sets HF_HUB_OFFLINE=1, as a user without network would.
    start = time.perf_counter()
    with pytest.raises(HubError) as error:
        StableDiffusion("nobody/no-such-model").load()
    assert time.perf_counter() - start < 5  # no ~25 s of retries
    message = str(error.value)
    assert "'nobody/no-such-model'" in message and "HF_HUB_OFFLINE=1" in message
    assert "local folder" in message and "not in the local hub cache" in message


def test_local_files_only_is_named_as_the_reason(monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match="local_files_only: true"):
        StableDiffusion("nobody/no-such-model", local_files_only=True).load()


def test_no_network_is_told_apart_from_offline_mode(monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with mock.patch.object(hub, "hf_hub_download", side_effect=AssertionError("no request when unreachable")):
        with pytest.raises(HubError) as error:
            StableDiffusion("nobody/no-such-model").load()
    message = str(error.value)
    assert "cannot reach https://huggingface.co" in message and "'nobody/no-such-model'" in message
    assert "It is not cached" in message


def test_a_missing_repository_is_told_apart_from_no_network(monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    response = mock.Mock(headers={}, status_code=404)
    for raised, expected in [
        (RepositoryNotFoundError("404", response=response), "no such repository"),
        (GatedRepoError("403", response=response), "is gated: accept its license"),
        (RevisionNotFoundError("404", response=response), "revision='v9' does not exist"),
    ]:
        with mock.patch.object(hub, "hf_hub_download", side_effect=raised):
            with pytest.raises(HubError, match=expected):
                StableDiffusion("nobody/no-such-model", revision="v9").load()


def test_a_missing_local_folder_is_a_missing_file_not_a_hub_lookup(tmp_path):
    with mock.patch.object(hub, "hf_hub_download", side_effect=AssertionError("looked up on the hub")):
        with pytest.raises(MissingFileError, match="no such folder") as error:
            StableDiffusion(str(tmp_path / "models" / "sd15-tny")).load()
    assert str(tmp_path / "models" / "sd15-tny") in str(error.value)


def test_a_folder_without_a_component_names_it(tiny_sd_path, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_path, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(MissingFileError, match="has no vae/ folder"):
        StableDiffusion(str(folder)).load()


def test_the_demo_model_is_written_only_at_the_demos_own_folder(tmp_path, monkeypatch, caplog):
    from data.demo_models import DEMO_MODELS, tiny_sd15, tiny_sdxl

    monkeypatch.chdir(tmp_path)
    mistyped = StableDiffusion(".demo/models/sd15-tny", create_if_missing=tiny_sd15)
    with pytest.raises(MissingFileError) as error:
        mistyped.prepare()
    assert "'.demo/models/sd15-tny' does not exist" in str(error.value)
    assert str(DEMO_MODELS["StableDiffusion"]) in str(error.value)
    assert not (tmp_path / ".demo").exists()
    # Another family's demo folder is not this family's: nothing written there either.
    with pytest.raises(MissingFileError):
        StableDiffusionXL(str(DEMO_MODELS["StableDiffusion"]), create_if_missing=tiny_sdxl).prepare()
    assert not (tmp_path / ".demo").exists()

    demo = StableDiffusion(str(DEMO_MODELS["StableDiffusion"]), create_if_missing=tiny_sd15)
    with caplog.at_level(logging.INFO):
        demo.prepare()
    assert "Wrote a tiny random StableDiffusion model to .demo/models/sd15-tiny" in caplog.text
    assert sorted(p.name for p in (tmp_path / ".demo" / "models").iterdir()) == ["sd15-tiny"]
    demo.load()
    assert demo.context_dim == 32
    caplog.clear()
    with caplog.at_level(logging.INFO):
        StableDiffusion(str(DEMO_MODELS["StableDiffusion"]), create_if_missing=tiny_sd15).prepare()
    assert "Wrote" not in caplog.text  # an existing folder is used as it is


def test_without_the_flag_nothing_is_ever_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    StableDiffusion(".demo/models/sd15-tiny").prepare()
    assert not Path(".demo").exists()
