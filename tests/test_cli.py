"""The command line as a user runs it: fit, resume, DDP, test, predict, config and input errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_module

DEMO = str(REPO / "conf" / "demo.yaml")
#: Evaluation runs compare 1 and 2 devices, not quality: 3 augmentations per image instead of 10.
FEW_AUGMENTATIONS = ("--model.augmentation_iterations", "3")


def run_cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    # One thread in every process: Lightning gives each DDP process cpu_count / processes threads, and
    # another thread count changes float sums in the UNet, which flips argmaxes of the random model's
    # flat maps; 1-device vs 2-device comparisons must differ only in how images are split.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def demo_args(out: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--config", DEMO,
        "--model.backbone.init_args.pretrained_model_name_or_path", str(model),
        "--data.init_args.root", str(data),
        "--trainer.default_root_dir", str(out),
        *extra,
    ]


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_sd_path, cub_root):
    """One short demo fit through the CLI, shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("demo_run")
    run_cli("fit", *demo_args(out, tiny_sd_path, cub_root, "--trainer.max_steps", "6"))
    return out


@pytest.mark.slow
def test_demo_fit_writes_small_checkpoint_embedding_and_wandb_offline_run(demo_run):
    (ckpt,) = checkpoints(demo_run)
    assert ckpt.stat().st_size < 1_000_000  # the context and optimizer state only, never the frozen UNet
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert set(state["state_dict"]) == {"context", "keypoint_tokens"}
    assert state["global_step"] == 6
    from safetensors import safe_open

    (embedding,) = list(demo_run.rglob("embedding.safetensors"))
    with safe_open(str(embedding), "pt") as f:
        assert f.get_tensor("context").shape == (100, 32)
        assert f.get_tensor("keypoint_tokens").shape == (10,)
        assert f.metadata()["family"] == "StableDiffusion"
    assert list((embedding.parent / "wandb").glob("offline-run-*"))  # in the run folder


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_ends_with_identical_contexts(tiny_sd_path, cub_root, tmp_path):
    probe = tmp_path / "contexts"
    run_cli("fit", *demo_args(tmp_path, tiny_sd_path, cub_root, "--trainer.max_steps", "3", "--trainer.devices", "2",
                              "--trainer.strategy", "ddp", "--trainer.callbacks+=tests.ddp_probe.SaveContextPerRank",
                              f"--trainer.callbacks.directory={probe}"))
    # each process planned its own timestamped folder; only rank 0's exists, holding everything
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and p != probe]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert len(list((run / "visualizations").glob("step_*"))) == 1
    rank0, rank1 = (torch.load(probe / f"context_rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    initial = torch.randn(100, 32, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(rank0, initial)  # it trained


@pytest.mark.slow
def test_missing_dataset_error_names_the_file_and_the_fix(tiny_sd_path, tmp_path):
    result = run_cli("fit", *demo_args(tmp_path, tiny_sd_path, tmp_path / "nowhere" / "CUB_200_2011",
                                       "--data.init_args.generate_synthetic", "false"), check=False)
    assert result.returncode != 0
    assert "images.txt" in result.stderr and "download: true" in result.stderr


def test_print_config_is_instant_and_loads_no_weights(capsys):
    from run import main

    for name in ("sd15", "sdxl", "sdxl_reproduce", "zero123plus", "demo"):
        start = time.perf_counter()
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(REPO / "conf" / f"{name}.yaml"), "--print_config"])
        assert exit_.value.code in (0, None)
        assert time.perf_counter() - start < 5
        printed = capsys.readouterr().out
        assert "backbone:" in printed and "pretrained_model_name_or_path" in printed


def test_a_wrong_config_key_is_an_error_before_anything_runs(capsys):
    from run import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DEMO, "--model.num_tokenz", "10"])
    assert exit_.value.code != 0
    assert "num_tokenz" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "16-true"])
def test_half_precision_trainer_is_refused_with_the_reason(precision, tiny_sd_path):
    import lightning as L

    module = tiny_module(tiny_sd_path, load=False)
    module.trainer = L.Trainer(precision=precision, accelerator="cpu", logger=False)
    with pytest.raises(ValueError, match="does not converge.*bfloat16"):
        module.setup("fit")


@pytest.fixture(scope="module")
def single_device_outputs(demo_run, tiny_sd_path, cub_root, tmp_path_factory):
    """``test`` and ``predict`` (on class 001's images) from the demo checkpoint, on one device."""
    out = tmp_path_factory.mktemp("single_device")
    (ckpt,) = checkpoints(demo_run)
    # --output_dir: a run's checkpoint would otherwise write into that (shared) run's folder.
    run_cli("test", *demo_args(out / "test", tiny_sd_path, cub_root, "--ckpt_path", str(ckpt), *FEW_AUGMENTATIONS,
                               "--output_dir", str(out / "test")))
    run_cli("predict", *demo_args(out / "predict", tiny_sd_path, cub_root, "--ckpt_path", str(ckpt), *FEW_AUGMENTATIONS,
                                  "--data.init_args.path", str(cub_root / "images" / "001.Synthetic_Bird_1"),
                                  "--output_dir", str(out / "predict")))
    return out


@pytest.mark.slow
def test_test_and_predict_through_the_cli_write_their_files(single_device_outputs, cub_root):
    import json

    from PIL import Image

    (metrics_file,) = list((single_device_outputs / "test").rglob("metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    assert metrics["metric"] == "normalized_keypoint_error" and 0 <= metrics["value"] < 100
    assert (metrics["num_regression_images"], metrics["num_test_images"]) == (18, 9)
    assert (metrics_file.parent / "regressor.safetensors").is_file()
    assert list((metrics_file.parent / "test_examples").glob("*.png"))

    images = cub_root / "images" / "001.Synthetic_Bird_1"
    (index_file,) = list((single_device_outputs / "predict").rglob("keypoints.json"))
    index = json.loads(index_file.read_text())
    assert "x, y in pixels of the original image" in index["convention"]
    sources = sorted(images.glob("*.jpg"))
    assert len(index["images"]) == len(sources)
    first = index["images"][0]
    with Image.open(first["path"]) as source:
        assert (first["width"], first["height"]) == source.size
    assert len(first["keypoints"]) == 10 and first["inside"] == [True] * 10  # predict_within_image by default
    overlays = sorted((index_file.parent / "overlays").glob("*.png"))
    assert len(overlays) == len(sources)
    from callbacks.drawing import display_scale

    with Image.open(overlays[0]) as overlay:  # at display size, the legend below
        shown = round(first["width"] * display_scale(first["width"], first["height"]))
        assert overlay.format == "PNG" and overlay.width == shown and overlay.height > first["height"] * shown / first["width"]


@pytest.mark.slow
def test_test_on_two_ranks_counts_every_image_once_and_gives_the_one_device_metrics(
    single_device_outputs, demo_run, tiny_sd_path, cub_root, tmp_path
):
    import json

    from safetensors.torch import load_file

    (ckpt,) = checkpoints(demo_run)
    # 9 test images on 2 ranks: the DistributedSampler pads rank 1's share with a repeated image.
    run_cli("test", *demo_args(tmp_path, tiny_sd_path, cub_root, "--ckpt_path", str(ckpt), *FEW_AUGMENTATIONS,
                               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--output_dir", str(tmp_path / "test")))
    (one_file,) = list((single_device_outputs / "test").rglob("metrics.json"))
    (two_file,) = list(tmp_path.rglob("metrics.json"))
    one, two = json.loads(one_file.read_text()), json.loads(two_file.read_text())
    assert (two["num_regression_images"], two["num_test_images"]) == (18, 9)
    assert two["value"] == pytest.approx(one["value"], rel=1e-5)
    torch.testing.assert_close(load_file(str(two_file.parent / "regressor.safetensors"))["weight"],
                               load_file(str(one_file.parent / "regressor.safetensors"))["weight"])


def test_a_missing_predict_path_fails_before_any_model_loads():
    from run import main

    from lightning_modules.app.errors import MissingFileError

    with pytest.raises(MissingFileError, match="data.path='/no/such/folder' does not exist"):  # not jsonargparse's wrapper
        main(["predict", "--config", DEMO, "--data.init_args.path", "/no/such/folder"])


@pytest.mark.slow
def test_predict_under_ddp_writes_one_index_in_dataset_order_with_the_one_device_keypoints(
    single_device_outputs, demo_run, tiny_sd_path, cub_root, tmp_path
):
    import json

    (ckpt,) = checkpoints(demo_run)
    images = cub_root / "images" / "001.Synthetic_Bird_1"
    run_cli("predict", *demo_args(tmp_path, tiny_sd_path, cub_root, "--ckpt_path", str(ckpt), *FEW_AUGMENTATIONS,
                                  "--data.init_args.path", str(images), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                                  "--output_dir", str(tmp_path / "predict")))
    (index_file,) = list(tmp_path.rglob("keypoints.json"))
    rows = json.loads(index_file.read_text())["images"]
    assert [row["path"] for row in rows] == [str(p) for p in sorted(images.glob("*.jpg"))]  # each once, both ranks merged
    assert len(list((index_file.parent / "overlays").glob("*.png"))) == len(rows)
    (single_file,) = list((single_device_outputs / "predict").rglob("keypoints.json"))
    single = json.loads(single_file.read_text())["images"]
    assert [row["keypoints"] for row in rows] == [row["keypoints"] for row in single]  # per-image draws


def test_sdxl_reproduce_holds_stablexlkeypoints_settings_and_sdxl_the_right_ones(capsys):
    import yaml

    from run import main

    configs = {}
    for name in ("sdxl_reproduce", "sdxl"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(REPO / "conf" / f"{name}.yaml"), "--print_config"])
        configs[name] = yaml.safe_load(capsys.readouterr().out)
    config = configs["sdxl_reproduce"]
    backbone = config["model"]["backbone"]["init_args"]
    assert backbone["layers"] == [f"up_blocks.0.attentions.0.transformer_blocks.{i}.attn2" for i in range(3)]
    assert backbone["latent_scaling_factor"] == 0.18215 and backbone["replace_output"] is True
    assert config["model"]["optimizer"] == {"class_path": "torch.optim.AdamW",
                                            "init_args": {**config["model"]["optimizer"]["init_args"], "lr": 0.005,
                                                          "weight_decay": 0.0001}}
    assert config["trainer"]["max_steps"] == 200
    assert (config["data"]["init_args"]["batch_size"], config["data"]["init_args"]["image_size"]) == (4, 512)
    right = configs["sdxl"]["model"]["backbone"]["init_args"]
    assert right["latent_scaling_factor"] is None and right["replace_output"] is False


@pytest.mark.slow
@pytest.mark.slow
def test_a_truncated_training_image_stops_fit_at_setup_with_its_name(tiny_sd_path, cub_root, tmp_path):
    import shutil

    root = tmp_path / "CUB_200_2011"
    shutil.copytree(cub_root, root)
    first = root / "images" / (root / "images.txt").read_text().split()[1]
    first.write_bytes(first.read_bytes()[:300])
    result = run_cli("fit", *demo_args(tmp_path / "out", tiny_sd_path, root, "--data.init_args.generate_synthetic", "false"),
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(first) in result.stderr and "skip_unreadable=true" in result.stderr
    assert not checkpoints(tmp_path / "out")  # no step ran (skip_unreadable: tests/test_images.py)


def test_a_user_error_is_one_message_and_exit_2_with_the_traceback_on_request(tmp_path):
    args = ["fit", "--config", DEMO, "--model.sigma_px", "0", "--trainer.default_root_dir", str(tmp_path)]
    result = run_cli(*args, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "error: model.sigma_px=0.0: it must be > 0." in lines and len(lines) <= 4  # (and Lightning's "Seed set")
    os.environ["STABLE_KEYPOINTS_TRACEBACK"] = "1"
    try:
        result = run_cli(*args, check=False)
    finally:
        del os.environ["STABLE_KEYPOINTS_TRACEBACK"]
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    import run

    def bug(args=None):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr(run, "main", bug)
    with pytest.raises(ZeroDivisionError):
        run.run([])


@pytest.mark.slow
def test_ckpt_path_honours_evaluation_settings_and_refuses_another_token_count(demo_run, tiny_sd_path, cub_root, tmp_path):
    import yaml

    (ckpt,) = checkpoints(demo_run)
    images = cub_root / "images" / "001.Synthetic_Bird_1"
    run_cli("predict", *demo_args(tmp_path, tiny_sd_path, cub_root, "--ckpt_path", str(ckpt),
                                  "--output_dir", str(tmp_path / "predict"),
                                  "--data.init_args.path", str(images), "--model.soft_argmax_window_px", "5",
                                  "--model.augmentation_iterations", "2"))
    config_file = tmp_path / "predict" / "config.yaml"  # the command's (its W&B run has a files/config.yaml too)
    saved = yaml.safe_load(config_file.read_text())["model"]
    assert (saved["soft_argmax_window_px"], saved["augmentation_iterations"]) == (5, 2)  # not the checkpoint's null, 10

    result = run_cli("predict", *demo_args(tmp_path / "other", tiny_sd_path, cub_root, "--ckpt_path", str(ckpt),
                                           "--data.init_args.path", str(images), "--model.num_tokens", "50"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds a context of 100 tokens, but model.num_tokens=50: set --model.num_tokens 100" in result.stderr


#: Messages every command used to print that a user can do nothing about (issue 12.8).
NOISE = ("litlogger", "anonymous setting", "LeafSpec", "in eval mode at the start", "weights_only",
         "dirpath has changed", "exists and is not empty", "Tracking run with wandb", "Epoch 0/-2")


@pytest.mark.slow
def test_one_run_folder_across_fit_test_predict_resume_and_its_detector(tiny_sd_path, cub_root, tmp_path):
    import json

    import yaml
    from safetensors import safe_open

    import wandb

    from lightning_modules.app.run_folder import code_version

    # This process uses wandb first, as a notebook or driver script would: its WANDB_SERVICE reaches every
    # command below. Sharing that wandb-core once made the resumed fit fail with "run ID ... is in use".
    wandb.init(mode="offline", dir=str(tmp_path / "parent"), project="parent").finish()
    assert os.environ.get("WANDB_SERVICE")

    fit = run_cli("fit", *demo_args(tmp_path, tiny_sd_path, cub_root, "--trainer.max_steps", "2"))
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "parent"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "embedding.safetensors",
                                                     "visualizations", "wandb"]
    last = run / "checkpoints" / "last.ckpt"
    for path in (run, run / "config.yaml", last, run / "embedding.safetensors"):
        assert str(path) in fit.stderr  # fit ends by saying where everything is
    assert "best:" not in fit.stderr  # no monitor: the newest periodic checkpoint is no "best"
    assert not [word for word in NOISE if word in fit.stderr + fit.stdout]
    assert "Steps: 100%" in fit.stdout and "2/2" in fit.stdout
    config_text = (run / "config.yaml").read_text()
    assert config_text.startswith("# Written by `run.py fit`") and f"# code_version: {code_version()}" in config_text
    assert yaml.safe_load(config_text)["trainer"]["max_steps"] == 2
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith(run.name)  # the W&B run id is the folder's name

    elsewhere = tmp_path / "elsewhere"  # test and predict follow the checkpoint, not default_root_dir
    run_cli("test", *demo_args(elsewhere, tiny_sd_path, cub_root, "--ckpt_path", str(last)))
    image = sorted((cub_root / "images" / "001.Synthetic_Bird_1").glob("*.jpg"))[0]
    run_cli("predict", *demo_args(elsewhere, tiny_sd_path, cub_root, "--ckpt_path", str(last),
                                  "--data.init_args.path", str(image)))
    assert not elsewhere.exists()
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    index = json.loads((run / "predict" / image.stem / "keypoints.json").read_text())
    for record, config in ((metrics, run / "test" / "config.yaml"), (index, run / "predict" / image.stem / "config.yaml")):
        assert (record["checkpoint"], record["config"]) == (str(last), str(config))
        assert record["code_version"] == code_version()
        assert config.read_text().startswith("# Written by `run.py") and f"# checkpoint: {last}" in config.read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2  # fit's config kept
    assert (run / "test" / "regressor.safetensors").is_file() and list((run / "test" / "test_examples").glob("*.png"))

    resume = run_cli("fit", *demo_args(elsewhere, tiny_sd_path, cub_root, "--trainer.max_steps", "3",
                                       "--ckpt_path", str(last)))
    assert not elsewhere.exists() and not [word for word in NOISE if word in resume.stderr]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    assert yaml.safe_load((run / "config.resume-1.yaml").read_text())["trainer"]["max_steps"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(run.name) for p in wandb_runs)  # the same W&B id, continued
    with safe_open(str(run / "embedding.safetensors"), "pt") as file:
        meta = file.metadata()
    assert (meta["checkpoint"], meta["started_from"], meta["global_step"]) == (str(last), str(last), "3")
    assert meta["config"] == str(run / "config.resume-1.yaml") and meta["code_version"] == code_version()

    # The detector of the resumed state: the test above scored the older state, so it is left out.
    export = subprocess.run([sys.executable, "-m", "lightning_modules.detector", "export", str(run)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    detector = run / "detector"
    assert export.stdout.strip() == str(detector) and not (detector / "metrics.json").exists()
    out = tmp_path / "from_detector"
    run_cli("predict", *demo_args(tmp_path, tiny_sd_path, cub_root, "--model.pretrained_context", str(detector),
                                  "--data.init_args.path", str(image), "--output_dir", str(out)))
    from_detector = json.loads((out / "keypoints.json").read_text())
    assert from_detector["checkpoint"] == str(detector)
    with safe_open(str(detector / "embedding.safetensors"), "pt") as file:
        assert from_detector["keypoint_tokens"] == file.get_tensor("keypoint_tokens").tolist()
