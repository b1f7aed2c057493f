"""What a person sees: bars that end once and where the work ends, messages on their own lines, warnings
without their source line, the test results by name, and a W&B run whose config tells runs apart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import StepProgressBar
from data.decode_check import find_unreadable
from lightning_modules.evaluation import RegressorEvaluation
from lightning_modules.metrics import NormalizedKeypointError
from tests.conftest import REPO
from tests.test_cli import demo_args


def run_merged(*args: str) -> str:
    """``python run.py <args>`` with stdout and stderr in one stream, as a terminal or a log file shows them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0].mean()) ** 2

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return None

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return batch[0]

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def _trainer(tmp_path: Path, **limits) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     callbacks=[StepProgressBar()], accelerator="cpu", **limits)


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(n, 1)), batch_size=1)


def _lines(out: str) -> list[str]:
    """Every line a log file of ``out`` shows (tqdm redraws with carriage returns)."""
    return [line for line in out.replace("\r", "\n").split("\n") if line.strip()]


def test_steps_bar_prints_its_final_count_once_and_ends_its_line(tmp_path: Path, capsys) -> None:
    _trainer(tmp_path, max_steps=10).fit(_Tiny(), _loader(4))
    out = capsys.readouterr().out
    assert sum("10/10" in line for line in _lines(out)) == 1
    assert out.endswith("\n")  # what is printed next starts on a line of its own


def test_test_bars_name_each_loader_and_end_their_lines(tmp_path: Path, capsys) -> None:
    _trainer(tmp_path).test(_Tiny(), [_loader(3), _loader(2)], verbose=False)
    lines = _lines(capsys.readouterr().out)
    assert not any("DataLoader" in line for line in lines)
    regression = [line for line in lines if line.startswith("Regression split (fitting the regressor)")]
    test = [line for line in lines if line.startswith("Test split (scored)")]
    assert sum("3/3" in line for line in regression) == 1 and sum("2/2" in line for line in test) == 1


def test_predict_bar_ends_its_line_at_the_last_batch(tmp_path: Path, capsys) -> None:
    class Says(L.Callback):
        def on_predict_epoch_end(self, trainer, pl_module):
            print("Keypoints of 3 images written")

    trainer = _trainer(tmp_path)
    trainer.callbacks.insert(0, Says())  # before the bar's own hooks, as the KeypointWriter runs
    trainer.predict(_Tiny(), _loader(3))
    out = capsys.readouterr().out
    assert "\nKeypoints of 3 images written\n" in out.replace("\r", "\n")
    assert re.search(r"3/3[^\n\r]*\n", out) and sum("3/3" in line for line in _lines(out)) == 1
    assert all(line.startswith(("Predicting: ", "Keypoints of")) for line in _lines(out))  # no "0/?", no "DataLoader 0"


def test_image_check_bar_reaches_its_total(tmp_path: Path, capsys) -> None:
    files = []
    for k in range(3):
        files.append(tmp_path / f"{k}.png")
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(files[-1])
    assert find_unreadable(files, "Checking train images") == []
    err = capsys.readouterr().err
    assert "Checking train images: 100%" in _lines(err)[-1] and "3/3" in _lines(err)[-1]  # 2/3 before the fix


def test_a_warning_shows_its_origin_and_message_but_not_its_source_line() -> None:
    from lightning_modules.app.cli import quiet_unactionable_output

    saved = warnings.formatwarning
    try:
        quiet_unactionable_output()
        text = warnings.formatwarning("Found 3 problems", UserWarning, "/x/data.py", 12, "    warnings.warn(...)")
    finally:
        warnings.formatwarning = saved
    assert text == "/x/data.py:12: UserWarning: Found 3 problems\n"


def test_test_summary_names_the_metric_and_labels_the_regression_pass(tmp_path: Path) -> None:
    evaluation = RegressorEvaluation(NormalizedKeypointError(), name="normalized_keypoint_error", protocol="stablekeypoints")
    evaluation.num_regression_images, evaluation.num_test_images, evaluation.value = 60, 32, 22.56694
    assert evaluation.summary(tmp_path / "metrics.json").splitlines() == [
        "Test results (protocol: stablekeypoints)",
        "  regression split                60 images fitted the regressor",
        "  test split                      32 images scored",
        "  test/normalized_keypoint_error  22.5669  (lower is better)",
        f"Written to {tmp_path / 'metrics.json'}",
    ]


@pytest.mark.slow
def test_demo_run_shows_a_clean_console_and_its_whole_config_on_wandb(tmp_path: Path, tiny_sd_path: Path, cub_root: Path) -> None:
    small = ("--trainer.max_steps", "2", "--model.num_tokens", "40", "--model.feature_upsample_res", "16",
             "--model.top_k", "4", "--model.furthest_point_num_samples", "8", "--model.num_indices", "4",
             "--model.augmentation_iterations", "2", "--data.init_args.image_size", "64",
             "--model.optimizer.init_args.lr", "0.003")  # fmt: skip
    out = run_merged("fit", *demo_args(tmp_path, tiny_sd_path, cub_root, *small))
    assert sum("2/2" in line for line in _lines(out) if line.startswith("Steps")) == 1
    for message in ("`Trainer.fit` stopped", "Keypoint tokens (from", "Context exported to", "Run folder:"):
        assert re.search(rf"(^|\n){re.escape(message)}", out), message  # each on a line of its own
    assert "Traceback" not in out and "warnings.warn(" not in out
    assert "Checking train images: 100%" in out

    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    config = yaml.safe_load((wandb_run / "files" / "config.yaml").read_text())
    model, data = config["model"]["value"], config["data"]["value"]
    assert model["backbone"]["init_args"]["pretrained_model_name_or_path"] == str(tiny_sd_path)
    assert model["optimizer"]["init_args"]["lr"] == 0.003 and data["init_args"]["batch_size"] == 2
    assert config["trainer"]["value"]["max_steps"] == 2 and config["seed_everything"]["value"] == 0
    assert config["family"]["value"] == "StableDiffusion" and config["model_id"]["value"] == str(tiny_sd_path)
    assert len(config["layers"]["value"]) == 4 and re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", config["code_version"]["value"])
    assert config["num_tokens"]["value"] == 40  # the LightningModule's hyperparameters, as before
    assert "HandleAbandonedError" not in (wandb_run / "logs" / "debug.log").read_text()

    test = run_merged("test", *demo_args(tmp_path, tiny_sd_path, cub_root, *small),
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    lines = _lines(test)
    assert not any("DataLoader" in line or "┃" in line for line in lines)
    assert any(line.startswith("Regression split (fitting the regressor)") for line in lines)
    assert "\nTest results (protocol: default)\n" in test.replace("\r", "\n")
    assert re.search(r"\n  test/normalized_keypoint_error  \d+\.\d{4}  \(lower is better\)\n", test)
    (test_run,) = (run / "test" / "wandb").glob("offline-run-*")
    summary = (test_run / "files" / "wandb-summary.json").read_text()
    assert '"test/normalized_keypoint_error"' in summary
