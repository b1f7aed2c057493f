"""Continuing a run equals having asked for more; any interruption is finished by the same command (issue 21).

Through the real CLI: runs killed mid-epoch and while ranking the keypoint tokens, finished, then
continued to a larger ``max_steps``, end bit for bit as the straight run (context, tokens, optimizer
state, data order); the files keep the umask's mode; the detector of the continued state holds that
state's own config and its model card's command writes nothing into it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import REPO

DEMO = str(REPO / "conf" / "demo.yaml")
#: A umask other than the usual 022, so that a mode "read from the umask" differs from a hard-coded 0644.
UMASK = 0o007


def fit(cwd: Path, *args: str, umask: int = 0o022, check: bool = True) -> subprocess.CompletedProcess:
    """``python run.py <args>`` from ``cwd`` (a user's project folder), with ``umask``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600, preexec_fn=lambda: os.umask(umask), check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def assert_same_state(got: Path, expected: Path) -> None:
    """Two run folders end with the same context, tokens, optimizer state and data order, bit for bit."""
    mine, theirs = load_file(str(got / "embedding.safetensors")), load_file(str(expected / "embedding.safetensors"))
    assert torch.equal(mine["context"], theirs["context"]) and torch.equal(mine["keypoint_tokens"], theirs["keypoint_tokens"])
    a, b = state(got / "checkpoints" / "last.ckpt"), state(expected / "checkpoints" / "last.ckpt")
    assert torch.equal(a["state_dict"]["keypoint_tokens"], mine["keypoint_tokens"])
    assert a["loops"] == b["loops"] and a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    adam, adam_straight = a["optimizer_states"][0]["state"][0], b["optimizer_states"][0]["state"][0]
    assert adam.keys() == adam_straight.keys() and all(torch.equal(adam[k], adam_straight[k]) for k in adam)


@pytest.fixture
def project(tmp_path, tiny_sd_path, cub_root) -> Path:
    """A user's folder holding the demo's .demo/ (the tiny model and a small synthetic CUB: 18 training images,
    9 steps an epoch in batches of 2), so that conf/demo.yaml's relative paths are those of the README."""
    folder = tmp_path / "project"
    (folder / ".demo" / "models").mkdir(parents=True)
    (folder / ".demo" / "models" / "sd15-tiny").symlink_to(tiny_sd_path)
    (folder / ".demo" / "CUB_200_2011").symlink_to(cub_root)
    return folder


def _config(folder: Path, name: str, kill: dict | None) -> Path:
    """Checkpoints every 4 steps, and optionally a tests.ddp_probe callback that kills the run."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 4}},
                 {"class_path": "callbacks.visualization.AttentionVisualizer", "init_args": {"every_n_steps": 4}},
                 {"class_path": "callbacks.prediction_writer.KeypointWriter"}]
    if kill is not None:
        callbacks.append(kill)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "logger": False}}))
    return path


SMALL = ("--data.init_args.image_size", "64", "--model.feature_upsample_res", "16", "--model.num_indices", "6")


@pytest.mark.slow
def test_killed_finished_and_continued_runs_end_as_the_straight_run(project, tmp_path):
    def command(name: str, max_steps: int, workers: int, run: Path, kill: dict | None = None, resume: bool = False):
        args = ["fit", "--config", DEMO, "--config", str(_config(tmp_path, name, kill)), *SMALL,
                "--trainer.max_steps", str(max_steps), "--data.init_args.num_workers", str(workers),
                "--output_dir", str(run)]
        return args + (["--ckpt_path", str(run / "checkpoints" / "last.ckpt")] if resume else [])

    straight = tmp_path / "straight"
    fit(project, *command("straight", 12, 0, straight))

    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    # 1. Killed after step 5: its last checkpoint is step 4's, mid-epoch.
    killed = fit(project, *command("one", 8, 2, run, {"class_path": "tests.ddp_probe.KillAtStep", "init_args": {"step": 5}}),
                 umask=UMASK, check=False)
    assert killed.returncode == -signal.SIGKILL and state(last)["global_step"] == 4
    # 2. Resumed to 8, killed while ranking the keypoint tokens: the checkpoint is at max_steps, no context file.
    killed = fit(project, *command("two", 8, 2, run, {"class_path": "tests.ddp_probe.KillWhileRanking"}, resume=True),
                 umask=UMASK, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert state(last)["global_step"] == 8 and not state(last)["state_dict"]["keypoint_tokens"].numel()
    assert not (run / "embedding.safetensors").exists()
    # 3. The same command finishes it: ranks, stores the tokens in the checkpoint, exports.
    finished = fit(project, *command("two", 8, 2, run, resume=True), umask=UMASK)
    assert "finishing the run" in finished.stderr + finished.stdout
    with safe_open(str(run / "embedding.safetensors"), "pt") as file:
        assert file.metadata()["global_step"] == "8" and file.metadata()["checkpoint"] == str(last)
        assert torch.equal(file.get_tensor("keypoint_tokens"), state(last)["state_dict"]["keypoint_tokens"])
    # 4. The finished run continued to 12 (across the end of epoch 0 at step 9) is the straight 12-step run.
    fit(project, *command("three", 12, 2, run, resume=True), umask=UMASK)
    assert_same_state(run, straight)
    assert state(last)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "samples": 6}]
    assert state(last)["epoch"] == 1  # in epoch 1, three batches in, as the straight run

    # test reads the tokens the checkpoint holds (no ranking) and writes as the umask allows.
    tested = fit(project, "test", "--config", DEMO, *SMALL, "--trainer.logger", "false", "--ckpt_path", str(last),
                 "--model.augmentation_iterations", "1", umask=UMASK)
    assert "Keypoint tokens (from" not in tested.stderr + tested.stdout
    written = [run / "embedding.safetensors", last, run / "config.yaml", run / "config.resume-3.yaml",
               run / "test" / "regressor.safetensors", run / "test" / "metrics.json"]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {path.name: "0o660" for path in written}

    # The detector of the continued state: that state's config (max_steps 12, not the first command's 8),
    # its paths absolute, so its model card's command run from inside it writes nothing there.
    from lightning_modules import detector

    folder = Path(detector.export(str(run)))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 12
    assert config["model"]["backbone"]["init_args"]["pretrained_model_name_or_path"] == str(project / ".demo/models/sd15-tiny")
    assert config["trainer"]["default_root_dir"] == str(project / "outputs" / "demo")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    images = sorted((project / ".demo" / "CUB_200_2011" / "images" / "001.Synthetic_Bird_1").glob("*.jpg"))[:2]
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in images:
        (photos / image.name).symlink_to(image)
    fit(folder, "predict", "--config", "config.yaml", "--model.pretrained_context", ".", "--data.init_args.path",
        str(photos), "--model.augmentation_iterations", "1", "--trainer.logger", "false")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    (keypoints,) = (project / "outputs" / "demo").rglob("keypoints.json")
    assert len(json.loads(keypoints.read_text())["images"]) == 2


@pytest.fixture
def demo_project(tmp_path, tiny_sd_path) -> Path:
    """A user's folder with the demo's own dataset size (60 training images: 30 steps an epoch)."""
    from data.demo import DEMO_SIZE, write_synthetic_cub

    folder = tmp_path / "project"
    (folder / ".demo" / "models").mkdir(parents=True)
    (folder / ".demo" / "models" / "sd15-tiny").symlink_to(tiny_sd_path)
    write_synthetic_cub(folder / ".demo" / "CUB_200_2011", **DEMO_SIZE)
    return folder


@pytest.mark.slow
def test_readmes_continuation_of_the_demo_is_the_straight_80_step_run(demo_project, tmp_path):
    """README: `fit --config conf/demo.yaml`, then `--ckpt_path <run>/checkpoints/last.ckpt --trainer.max_steps 80`."""
    demo = ("fit", "--config", DEMO, "--trainer.logger", "false")
    fit(demo_project, *demo, "--trainer.max_steps", "80", "--output_dir", str(tmp_path / "straight"))
    run = tmp_path / "run"
    fit(demo_project, *demo, "--output_dir", str(run))
    fit(demo_project, *demo, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_steps", "80")
    assert_same_state(run, tmp_path / "straight")
    # Step 80 lies in epoch 2 (30 steps an epoch), 20 batches in: the continued run did not skip epoch 1's rest.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=2-step=80.ckpt", "last.ckpt"]
    assert state(run / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 2, "samples": 40}]
