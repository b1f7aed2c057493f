"""Every mistake a user can make ends in one line, exit status 2, no traceback, and nothing left behind (issue 21).

Each case runs one entry point's command line as a user would (``tests/cli_cases.py``: its own
process and folder); the cases are examples of classes: data settings, trainer settings, model and
optimizer settings, context files, output paths (a file in the way, a read-only or full disk) and
offline starts. Each must stop with exactly one ``error:`` line, the last one, naming what is wrong,
with exit status 2, no traceback, no "wandb sync" hint, and leave its folder as it found it (no run
folder, no W&B run, no config, no dataset or model written).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, tiny_module

DEMO = str(REPO / "conf" / "demo.yaml")
SDXL = str(REPO / "conf" / "sdxl.yaml")


class Case:
    """One command line, the folder it runs in, and the words its error line must hold."""

    def __init__(self, entry: str, args: list[str], expected: str, fault: str | None = None, env: dict | None = None):
        self.entry, self.args, self.expected, self.fault, self.env = entry, args, expected, fault, env or {}


def demo(command: str, folder: Path, paths: Paths, *extra: str, expected: str, **kwargs) -> Case:
    """``run.py <command>`` of the demo config on the tiny model and the small synthetic CUB, writing under ``folder``."""
    args = [command, "--config", DEMO, "--model.backbone.init_args.pretrained_model_name_or_path", str(paths.model),
            "--data.init_args.root", str(paths.data), "--trainer.default_root_dir", str(folder / "outputs"), *extra]
    return Case("run.py", args, expected, **kwargs)


def fit(folder: Path, paths: Paths, *extra: str, expected: str, **kwargs) -> Case:
    return demo("fit", folder, paths, *extra, expected=expected, **kwargs)


def predict(folder: Path, paths: Paths, *extra: str, expected: str) -> Case:
    return demo("predict", folder, paths, "--data.init_args.path", str(paths.images), "--model.augmentation_iterations", "1",
                *extra, expected=expected)


def context(name: str, expected: str):
    return lambda f, p: predict(f, p, "--model.pretrained_context", str(p.contexts / f"{name}.safetensors"), expected=expected)


#: name -> (the case's own folder, the shared inputs) -> the case.
CASES = {
    # data settings
    "image_size_not_a_multiple_of_8": lambda f, p: fit(f, p, "--data.init_args.image_size", "100",
                                                       expected="data.image_size=100"),
    "negative_num_workers": lambda f, p: fit(f, p, "--data.init_args.num_workers", "-1", expected="data.num_workers=-1"),
    "missing_predict_path": lambda f, p: demo("predict", f, p, "--data.init_args.path", "/does/not/exist",
                                              expected="data.path='/does/not/exist' does not exist"),
    "empty_predict_folder": lambda f, p: demo("predict", f, p, "--data.init_args.path", str(f / "photos"), expected="photos"),
    "batch_larger_than_the_split": lambda f, p: fit(f, p, "--data.init_args.batch_size", "20",
                                                    expected="data.batch_size=20 is larger than the training split"),
    "fraction_of_batches_below_one": lambda f, p: fit(f, p, "--trainer.limit_train_batches", "0.05",
                                                      expected="trainer.limit_train_batches=0.05"),
    "truncated_bounding_boxes": lambda f, p: fit(f, p, "--data.init_args.root", str(f / "CUB_200_2011"),
                                                 expected="bounding_boxes.txt:5: expected 5 fields"),
    "damaged_split_file": lambda f, p: fit(f, p, "--data.init_args.root", str(f / "CUB_200_2011"),
                                           expected="train_test_split.txt:3: 'x' is not an integer"),
    "test_on_unlabelled_images": lambda f, p: demo("test", f, p, "--data", "data.folder.ImageFolderDataModule",
                                                   "--data.init_args.path", str(p.images), expected="unlabelled images"),
    # trainer settings
    "no_steps": lambda f, p: fit(f, p, "--trainer.max_steps", "0", expected="trainer.max_steps=0"),
    "no_epochs": lambda f, p: fit(f, p, "--trainer.max_steps", "-1", "--trainer.max_epochs", "0",
                                  expected="trainer.max_epochs=0"),
    "no_batches": lambda f, p: fit(f, p, "--trainer.limit_train_batches", "0", expected="trainer.limit_train_batches=0"),
    "fewer_steps_than_the_checkpoint": lambda f, p: fit(f, p, "--trainer.max_steps", "4", "--ckpt_path", str(p.checkpoint),
                                                        expected="is already at step 8"),
    "half_precision": lambda f, p: fit(f, p, "--trainer.precision", "16-mixed", expected="trainer.precision='16-mixed'"),
    # model and optimizer settings
    "negative_learning_rate": lambda f, p: fit(f, p, "--config", str(p.negative_lr),
                                               expected="model.optimizer: Invalid learning rate: -1"),
    "negative_weight_decay": lambda f, p: fit(f, p, "--config", str(p.negative_weight_decay),
                                              expected="model.optimizer: Invalid weight_decay value: -1"),
    "noise_level_outside_the_grid": lambda f, p: fit(f, p, "--model.backbone.init_args.noise_level", "100",
                                                     expected="noise_level=100 with num_inference_steps=50"),
    "callback_setting": lambda f, p: fit(f, p, "--trainer.callbacks+=callbacks.visualization.AttentionVisualizer",
                                         "--trainer.callbacks.every_n_steps", "0", expected="AttentionVisualizer every_n_steps=0"),
    "zero_sigma": lambda f, p: fit(f, p, "--model.sigma_px", "0", expected="model.sigma_px=0.0"),
    # context files
    "context_repeated_tokens": context("repeated_tokens", "repeat a token"),
    "context_float_tokens": context("float_tokens", "integer indices"),
    "context_too_few_tokens": context("too_few_tokens", "holds 4 keypoint tokens but model.top_k=10"),
    "context_no_tokens": context("no_tokens", "holds no keypoint tokens"),
    "context_no_metadata": context("no_metadata", "has no family"),
    "context_truncated": context("truncated", "cannot be read"),
    "context_not_safetensors": context("not_safetensors", "cannot be read"),
    "stablekeypoints_context_without_tokens": lambda f, p: predict(f, p, "--model.pretrained_context", str(p.contexts / "embedding.pt"),
                                                                   expected="without its keypoint tokens"),
    "stablekeypoints_float_tokens": lambda f, p: predict(f, p, "--model.pretrained_context", str(p.contexts / "embedding.pt"),
                                                         "--model.pretrained_keypoint_tokens", str(p.contexts / "indices_float.pt"),
                                                         expected="integer indices"),
    # output paths
    "output_dir_is_a_file": lambda f, p: fit(f, p, "--output_dir", str(f / "a_file"), expected="is a file, not a folder"),
    "output_dir_below_a_file": lambda f, p: predict(f, p, "--output_dir", str(f / "a_file" / "out"),
                                                    expected="is a file, not a folder"),
    "read_only_disk": lambda f, p: fit(f, p, expected="Read-only file system", fault=f"erofs:{f}"),
    "full_disk_at_the_first_picture": lambda f, p: fit(f, p, "--model.num_indices", "2", expected="No space left on device",
                                                       fault="enospc_png"),
    "detector_without_a_finished_run": lambda f, p: Case("detector", ["export", str(f)], "embedding.safetensors does not exist"),
    "detector_output_is_a_file": lambda f, p: Case("detector", ["export", str(p.run), "--output", str(f / "a_file")], "is a file"),
    "detector_push_without_owner": lambda f, p: Case("detector", ["push", str(p.run), "no-owner"], "README.md does not exist"),
    "preprocess_read_only_output": lambda f, p: Case("cub_preprocess", ["--root", str(p.data), "--output", str(f / "gray")],
                                                     "Read-only file system", fault=f"erofs:{f}"),
    "preprocess_missing_root": lambda f, p: Case("cub_preprocess", ["--root", str(f / "nowhere"), "--output", str(f / "gray")],
                                                 "images.txt' is missing"),
    "paper_table_output_is_a_file": lambda f, p: Case("paper_table", ["--configs", "cub_001", "--output", str(f / "a_file")],
                                                      "a file is in the way"),
    # offline starts: no network for the dataset, no cached model or detector
    "offline_dataset_download": lambda f, p: Case(
        "run.py", ["fit", "--config", SDXL, "--data.init_args.root", str(f / "datasets" / "CUB_200_2011"),
                   "--trainer.default_root_dir", str(f / "outputs")], "Could not download",
        env={"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}),
    "offline_model_not_cached": lambda f, p: Case(
        "run.py", ["fit", "--config", SDXL, "--data.init_args.root", str(p.data), "--data.init_args.download", "false",
                   "--trainer.default_root_dir", str(f / "outputs")], "not in the local hub cache"),
    "offline_detector_not_cached": lambda f, p: predict(f, p, "--model.pretrained_context", "someone/not-downloaded",
                                                        expected="not in the local hub cache"),
    # a failed predict from a run's checkpoint leaves the run as it was: the corrected command writes predict/photos
    "predict_in_a_run": lambda f, p: predict(f, p, "--ckpt_path", str(f / "run" / "checkpoints" / "last.ckpt"),
                                             "--model.backbone.init_args.noise_level", "-60", expected="noise_level=-60"),
}


class Paths:
    """The inputs the cases share: the tiny model, the small synthetic CUB, a few images, a finished run's
    folder, a checkpoint at step 8, optimizer configs and context files (good and damaged)."""

    def __init__(self, root: Path, model: Path, data: Path) -> None:
        from safetensors.torch import save_file

        from lightning_modules.app.checkpoints import RECORD_KEY
        from lightning_modules.detector import embedding_metadata, save_context

        self.model, self.data = model, data
        self.images = root / "photos"
        self.images.mkdir()
        for image in sorted((data / "images" / "001.Synthetic_Bird_1").glob("*.jpg"))[:2]:
            (self.images / image.name).symlink_to(image)
        # The demo config's context: 100 tokens of the tiny model, 32 px maps, 10 keypoints.
        module = tiny_module(model, num_tokens=100, feature_upsample_res=32, top_k=10, furthest_point_num_samples=25)
        context, tokens, signature = module.context.detach(), torch.arange(10) * 3, module.signature()
        self.checkpoint = root / "step8.ckpt"
        torch.save({"global_step": 8, "state_dict": {"context": context}, RECORD_KEY: signature.record()}, self.checkpoint)
        self.run = root / "run"
        save_context(self.run / "embedding.safetensors", context, tokens, signature, {"config": "None"})
        (self.run / "config.yaml").write_text("model:\n  num_tokens: 100\n")
        self.contexts = root / "contexts"
        ctx = self.contexts
        good = save_context(ctx / "good.safetensors", context, tokens, signature, {})
        meta = embedding_metadata(good)
        for name, bad in (("repeated_tokens", torch.full((10,), 3)), ("float_tokens", tokens.float() + 0.5),
                          ("too_few_tokens", tokens[:4])):
            save_file({"context": context, "keypoint_tokens": bad}, str(ctx / f"{name}.safetensors"), metadata=meta)
        save_file({"context": context}, str(ctx / "no_tokens.safetensors"), metadata=meta)
        save_file({"context": context, "keypoint_tokens": tokens}, str(ctx / "no_metadata.safetensors"))
        (ctx / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        (ctx / "not_safetensors.safetensors").write_text("a context, honestly\n" * 20)
        torch.save(context.clone(), ctx / "embedding.pt")
        torch.save(tokens.float(), ctx / "indices_float.pt")
        self.negative_lr, self.negative_weight_decay = root / "negative_lr.yaml", root / "negative_weight_decay.yaml"
        for path, init_args in ((self.negative_lr, {"lr": -1}), (self.negative_weight_decay, {"lr": 0.005, "weight_decay": -1})):
            path.write_text(yaml.safe_dump({"model": {"optimizer": {"class_path": "torch.optim.Adam", "init_args": init_args}}}))


def _damaged_copy(data: Path, folder: Path, name: str, keep_bytes: int | None = None, third_line: str | None = None) -> None:
    """``folder/CUB_200_2011``: links to ``data``'s files but a damaged copy of ``name``."""
    root = folder / "CUB_200_2011"
    root.mkdir(parents=True)
    for entry in data.iterdir():
        if entry.name != name:
            (root / entry.name).symlink_to(entry)
    text = (data / name).read_text()
    if keep_bytes is not None:  # cut inside line 5
        lines = text.splitlines(keepends=True)
        text = "".join(lines[:4]) + lines[4][:keep_bytes]
    if third_line is not None:
        lines = text.splitlines(keepends=True)
        lines[2] = third_line
        text = "".join(lines)
    (root / name).write_text(text)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_sd_path, cub_root):
    """Runs every case once (one driver process), -> {name: (case, exit status, output, folder before, folder)}."""
    root = tmp_path_factory.mktemp("user_errors")
    paths = Paths(root, tiny_sd_path, cub_root)
    folder = root / "cases"
    cases = {name: build(folder / name, paths) for name, build in CASES.items()}
    for name in cases:
        (folder / name).mkdir(parents=True)
    (folder / "empty_predict_folder" / "photos").mkdir()
    for name in ("output_dir_is_a_file", "output_dir_below_a_file", "detector_output_is_a_file", "paper_table_output_is_a_file"):
        (folder / name / "a_file").write_text("mine\n")
    (folder / "predict_in_a_run" / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(paths.checkpoint, folder / "predict_in_a_run" / "run" / "checkpoints" / "last.ckpt")
    _damaged_copy(cub_root, folder / "truncated_bounding_boxes", "bounding_boxes.txt", keep_bytes=6)
    _damaged_copy(cub_root, folder / "damaged_split_file", "train_test_split.txt", third_line="3 x\n")
    before = {name: _tree(folder / name) for name in cases}
    spec = {name: {"entry": case.entry, "args": case.args, "output": str(root / f"{name}.out"), "cwd": str(folder / name),
                   "env": case.env, "fault": case.fault} for name, case in cases.items()}
    (root / "cases.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO),
           "HF_HOME": str(root / "hf_home"), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(root / "cache")}
    env.pop("STABLE_KEYPOINTS_TRACEBACK", None)
    subprocess.run([sys.executable, str(REPO / "tests" / "cli_cases.py"), str(root / "cases.json"), str(root / "results.json")],
                   cwd=root, env=env, check=True, timeout=900)
    codes = json.loads((root / "results.json").read_text())
    return {name: (case, codes[name], (root / f"{name}.out").read_text(), before[name], folder / name)
            for name, case in cases.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(outcomes, name):
    case, code, output, before, folder = outcomes[name]
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], output[-3000:]
    assert case.expected in errors[0]
    assert "wandb sync" not in output
    assert _tree(folder) == before  # no run folder, W&B run, config, dataset or model written
