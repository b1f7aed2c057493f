"""Scale-out: what DDP synchronizes, multi-node runs, the shared-filesystem download, resumable predict."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

import data.cub as cub
from callbacks.prediction_writer import KeypointWriter, image_record, read_shard, shard_identity
from data.cub import CUBDataModule
from data.folder import ImageFolderDataModule
from lightning_modules.errors import ConfigError
from lightning_modules.stable_keypoints import frozen_tensor_names
from tests.conftest import REPO
from tests.test_callbacks import POINTS, StubKeypointModel, trainer
from tests.test_cli import DEMO

# ------------------------------------------------------------------ 14.1 what DDP synchronizes


def test_every_frozen_tensor_is_kept_out_of_ddp_and_only_the_context_is_synchronized(tiny_sd_module):
    ignored = set(tiny_sd_module._ddp_params_and_buffers_to_ignore)
    parameters = dict(tiny_sd_module.named_parameters())
    buffers = dict(tiny_sd_module.named_buffers())
    assert (set(parameters) | set(buffers)) - ignored == {"context"}
    assert ignored == (set(parameters) - {"context"}) | set(buffers)
    assert {"backbone.timestep", "backbone.alphas_cumprod", "keypoint_tokens"} <= ignored
    frozen_bytes = sum(p.numel() * p.element_size() for name, p in parameters.items() if name in ignored)
    assert frozen_bytes > 100 * tiny_sd_module.context.numel() * 4  # what no longer leaves rank 0


def test_frozen_tensor_names_follows_requires_grad():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module[0].weight.requires_grad_(False)
    assert frozen_tensor_names(module) == ["0.weight", "1.running_mean", "1.running_var", "1.num_batches_tracked"]


# ------------------------------------------------------------------ 14.2 the download on a shared filesystem


def test_two_nodes_downloading_into_one_shared_folder_fetch_once(cub_root, tmp_path, monkeypatch):
    import hashlib
    import tarfile

    archive = tmp_path / "served" / "CUB_200_2011.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cub_root, arcname="CUB_200_2011")
    monkeypatch.setattr(cub, "CUB_URL", archive.as_uri())
    monkeypatch.setattr(cub, "CUB_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    fetch, fetches = cub._fetch, []

    def slow_fetch(*args):  # a slow network: the second node starts while the first still downloads
        fetches.append(args[0])
        time.sleep(0.5)
        fetch(*args)

    monkeypatch.setattr(cub, "_fetch", slow_fetch)
    target = tmp_path / "shared" / "CUB_200_2011"
    errors = []

    def node() -> None:
        try:
            CUBDataModule(str(target), download=True).prepare_data()
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=node) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(fetches) == 1
    assert not cub.missing_annotation_files(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".CUB_200_2011.lock", "CUB_200_2011"]


# ------------------------------------------------------------------ 14.3 resumable predict, in one process


class CountingStub(StubKeypointModel):
    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir)
        self.predicted: list[str] = []

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        self.predicted += list(batch["path"])
        return super().predict_step(batch, batch_idx, dataloader_idx)


@pytest.fixture
def five_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (40 + 4 * i, 32), (10 * i, 20, 30)).save(folder / f"img{i}.png")
    return folder


def _predict(tmp_path: Path, folder: Path, out: Path, model: L.LightningModule | None = None) -> CountingStub:
    model = model or CountingStub(str(tmp_path / "run"))
    data = ImageFolderDataModule(str(folder), image_size=32, batch_size=2, num_workers=0)
    trainer(tmp_path, [KeypointWriter(output_dir=str(out), overlays=False)]).predict(model, datamodule=data,
                                                                                     return_predictions=False)
    return model


def test_a_killed_predict_resumes_with_the_images_it_had_not_finished(tmp_path, five_images):
    out = tmp_path / "out"
    first = _predict(tmp_path, five_images, out)
    assert len(first.predicted) == 5
    shard = out / "shards" / "rank-00000.jsonl"
    header, *records = shard.read_text().splitlines()
    assert json.loads(header)["shard"]["model"] == "stub/model" and len(records) == 5
    # As a kill leaves it: two batches written, the third cut in the middle of a line.
    shard.write_text("\n".join([header, *records[:2]]) + "\n" + records[2][:17])
    (out / "keypoints.json").unlink()
    second = _predict(tmp_path, five_images, out)
    assert second.predicted == [str(five_images / f"img{i}.png") for i in (2, 3, 4)]
    index = json.loads((out / "keypoints.json").read_text())
    assert [Path(e["path"]).name for e in index["images"]] == [f"img{i}.png" for i in range(5)]
    assert all(len(e["keypoints"]) == len(POINTS) for e in index["images"])
    _, shard_records = read_shard(shard)
    assert [Path(r["path"]).name for r in shard_records] == [f"img{i}.png" for i in range(5)]  # the torn line is gone
    (out / "keypoints.json").unlink()  # killed after the last batch, before the merge
    third = _predict(tmp_path, five_images, out)  # nothing left to predict: merged all the same
    assert third.predicted == [] and json.loads((out / "keypoints.json").read_text())["images"] == index["images"]


def test_shards_of_another_context_are_refused_before_any_prediction(tmp_path, five_images):
    out = tmp_path / "out"
    _predict(tmp_path, five_images, out)
    other = CountingStub(str(tmp_path / "run"))
    with torch.no_grad():
        other.context += 1
    with pytest.raises(ConfigError, match="rank-00000.jsonl holds keypoints of another model, context"):
        _predict(tmp_path, five_images, out, other)
    assert other.predicted == []


def test_shard_identity_names_model_context_and_settings(tmp_path):
    model = StubKeypointModel(str(tmp_path))
    model.hparams.update(augmentation_iterations=3, feature_upsample_res=16, soft_argmax_window_px=None, noise_seed=7)
    fake_trainer = type("T", (), {"datamodule": type("D", (), {"image_size": 64})()})()
    identity = shard_identity(fake_trainer, model)
    assert identity["model"] == "stub/model"
    assert identity["settings"] == {"augmentation_iterations": 3, "feature_upsample_res": 16,
                                    "soft_argmax_window_px": None, "noise_seed": 7, "image_size": 64}
    model.hparams.noise_seed = 8
    assert shard_identity(fake_trainer, model) != identity


def test_image_record_rounds_pixels_and_names_the_overlay_only_when_drawn():
    import numpy as np

    record = image_record(3, "a/b.png", 40, 30, np.array([[1.23456, 2.0]]), None)
    assert record == {"index": 3, "path": "a/b.png", "width": 40, "height": 30, "keypoints": [[1.235, 2.0]]}
    assert image_record(3, "a/b.png", 40, 30, np.zeros((1, 2)), "overlays/x.png")["overlay"] == "overlays/x.png"


def test_a_damaged_middle_line_is_an_error_naming_the_shard(tmp_path):
    shard = tmp_path / "rank-00000.jsonl"
    shard.write_text('{"shard": {}}\n{not json\n{"path": "a"}\n')
    with pytest.raises(ValueError, match="rank-00000.jsonl:2 is not a JSON line"):
        read_shard(shard)
