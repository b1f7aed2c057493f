"""Scale-out: what DDP synchronizes, multi-node runs, the shared-filesystem download, resumable predict."""

from __future__ import annotations

import json
import os
import shutil
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
from lightning_modules.app.errors import ConfigError
from lightning_modules.engine import frozen_tensor_names
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


def test_two_nodes_downloading_into_one_shared_folder_fetch_once(cub_root, tmp_path, served, monkeypatch):
    import hashlib
    import tarfile

    import data.download

    folder, url = served
    archive = folder / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cub_root, arcname="CUB_200_2011")
    monkeypatch.setattr(cub, "CUB_URL", f"{url}/CUB_200_2011.tgz")
    monkeypatch.setattr(cub, "CUB_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    retrieve, fetches = data.download.pooch.retrieve, []

    def slow_retrieve(url, *args, **kwargs):  # a slow network: the second node starts while the first still downloads
        fetches.append(url)
        time.sleep(0.5)
        return retrieve(url, *args, **kwargs)

    monkeypatch.setattr(data.download.pooch, "retrieve", slow_retrieve)
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
    assert sorted(p.name for p in target.parent.iterdir()) == ["CUB_200_2011"]  # no archive or lock left


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

    record = image_record(3, "a/b.png", 40, 30, np.array([[1.23456, 2.0], [5, 6]]), np.array([True, False]), None)
    assert record == {"index": 3, "path": "a/b.png", "width": 40, "height": 30, "keypoints": [[1.235, 2.0], [5.0, 6.0]],
                      "inside": [True, False]}
    drawn = image_record(3, "a/b.png", 40, 30, np.zeros((1, 2)), np.ones(1, bool), "overlays/x.png")
    assert drawn["overlay"] == "overlays/x.png"


def test_a_damaged_middle_line_is_an_error_naming_the_shard(tmp_path):
    shard = tmp_path / "rank-00000.jsonl"
    shard.write_text('{"shard": {}}\n{not json\n{"path": "a"}\n')
    with pytest.raises(ValueError, match="rank-00000.jsonl:2 is not a JSON line"):
        read_shard(shard)


# ------------------------------------------------------------------ 14.2 and 14.3 through the CLI, several processes
#: Small and quick: the tiny model at 64 px, a few steps, one bird class.
SMALL = ["--data.init_args.image_size", "64", "--data.init_args.subset", "cub_001", "--data.init_args.batch_size", "1",
         "--model.feature_upsample_res", "16", "--model.num_indices", "4", "--model.augmentation_iterations", "2",
         "--trainer.logger", "false"]
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    """run.py in ``cwd`` (its own process group, so a hung or killed job can be ended whole)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           **env}
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(*processes: subprocess.Popen, timeout: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """-> (returncode, output) of each; a job still running after ``timeout`` is a hang: killed and failed."""
    deadline, results = time.monotonic() + timeout, []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"run.py {' '.join(process.args[2:4])} hung for {timeout} s:\n{process.communicate()[0][-4000:]}")
        results.append((process.returncode, output))
    return results


def two_nodes(stage: str, nodes: list[Path], model: Path, data: Path, *extra: str, expect: int = 0) -> list[str]:
    """One job of 2 'nodes' on this machine: NODE_RANK 0 and 1, one CPU process each, each in its own folder.

    Outputs are relative paths, so each node writes under its own folder as on node-local disks.
    """
    port = str(free_port())
    args = ["--config", DEMO, "--model.backbone.init_args.pretrained_model_name_or_path", str(model),
            "--data.init_args.root", str(data), "--trainer.default_root_dir", "out", *SMALL,
            "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
            "--trainer.accelerator", "cpu", *extra]
    jobs = [launch(node, stage, *args, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank))
            for rank, node in enumerate(nodes)]
    outputs = []
    for rank, (code, output) in enumerate(finish(*jobs)):
        assert code == expect, f"node {rank} of `{stage}` ended with {code}:\n{output[-6000:]}"
        outputs.append(output)
    return outputs


@pytest.fixture(scope="module")
def two_node_fit(tmp_path_factory, tiny_sd_path, cub_root):
    root = tmp_path_factory.mktemp("two_nodes")
    nodes, probe = [root / "node0", root / "node1"], root / "probe"
    two_nodes("fit", nodes, tiny_sd_path, cub_root, "--trainer.max_steps", "3",
              "--trainer.callbacks+=tests.ddp_probe.RecordDDPSync", f"--trainer.callbacks.directory={probe}")
    return nodes, probe


@pytest.mark.slow
def test_a_two_node_job_fits_tests_and_predicts_with_one_set_of_outputs(two_node_fit, tiny_sd_path, cub_root):
    (node0, node1), probe = two_node_fit
    # fit: the same context on both nodes, only it synchronized by DDP, the logged loss the mean of both.
    rank0, rank1 = (torch.load(probe / f"context_rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    assert not torch.equal(rank0, torch.randn(100, 32, generator=torch.Generator().manual_seed(0)))  # it trained
    for rank in (0, 1):
        ddp = json.loads((probe / f"ddp_rank{rank}.json").read_text())
        assert ddp["synced_parameters"] == ["context"] and ddp["synced_buffers"] == []
        assert ddp["synced_bytes"] == 100 * 32 * 4
        assert set(ddp["ignored"]) == set(ddp["all_names"]) - {"context"}
    losses = [json.loads((probe / f"losses_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]  # sync_dist: rank 0 alone would log its own images
    (ckpt,) = list(node0.rglob("last.ckpt"))
    assert len(torch.load(ckpt, weights_only=False)["state_dict"]["keypoint_tokens"]) == 10  # refreshed at fit end
    assert len(list(node0.rglob("embedding.safetensors"))) == 1
    assert not list(node1.rglob("*.ckpt")) and not list(node1.rglob("embedding.safetensors"))

    # Each node has its own copy of the checkpoint, at the same relative path, as on node-local disks;
    # test and predict write beside it (in the run's folder) on each node.
    relative = ckpt.relative_to(node0)
    (node1 / relative).parent.mkdir(parents=True)
    shutil.copy(ckpt, node1 / relative)
    ckpt = relative
    two_nodes("test", [node0, node1], tiny_sd_path, cub_root, "--ckpt_path", str(ckpt))
    assert len(list(node0.rglob("metrics.json"))) == 1 and not list(node1.rglob("metrics.json"))

    # predict, killed on both nodes after two batches each, then resumed: each image exactly once.
    images = cub_root / "images" / "001.Synthetic_Bird_1"
    predict = ["--ckpt_path", str(ckpt), "--data.init_args.path", str(images)]
    killed = two_nodes("predict", [node0, node1], tiny_sd_path, cub_root, *predict, "--trainer.callbacks+=tests.ddp_probe.KillAfterBatches",
                       "--trainer.callbacks.batches=2", expect=-signal.SIGKILL)
    assert not list(node0.rglob("keypoints.json"))
    (shard0,), (shard1,) = list(node0.rglob("rank-00000.jsonl")), list(node1.rglob("rank-00001.jsonl"))
    first = [r["path"] for shard in (shard0, shard1) for r in read_shard(shard)[1]]
    assert len(first) == 4 and len(set(first)) == 4, killed[0][-3000:]
    outputs = two_nodes("predict", [node0, node1], tiny_sd_path, cub_root, *predict)
    assert "4 images already have keypoints" in outputs[0] and "images/s" in outputs[0]
    sources = [str(p) for p in sorted(images.glob("*.jpg"))]
    (merged,) = list(node0.rglob("keypoints.json"))
    assert [entry["path"] for entry in json.loads(merged.read_text())["images"]] == sources  # node 1's rows were sent
    predicted = [r["path"] for shard in (shard0, shard1) for r in read_shard(shard)[1]]
    assert sorted(predicted) == sources  # over both runs, every image predicted exactly once
    assert not list(node1.rglob("keypoints.json"))
    assert [p.name for p in node0.rglob("rank-*.jsonl")] == ["rank-00000.jsonl"]  # node-local shards
    assert len(list(node0.rglob("overlays/*.png"))) + len(list(node1.rglob("overlays/*.png"))) == len(sources)


def test_finished_images_are_dropped_from_a_subset_of_readable_images_too(five_images):
    from torch.utils.data import Subset

    from data.sampling import without_paths
    from data.image_folder import ImageFolderDataset

    dataset = ImageFolderDataset(five_images, 32)
    readable = Subset(dataset, [0, 2, 3, 4])  # as KeypointDataModule.checked leaves it with skip_unreadable
    left = without_paths(readable, {str(five_images / "img2.png"), str(five_images / "img4.png")})
    assert left.indices == [0, 3] and left.dataset is dataset
    assert [left[i]["index"] for i in range(len(left))] == [0, 3]  # each keeps its index in the dataset
    assert without_paths(readable, set()) is readable
