"""Where each command writes, provenance, the W&B logger's run, the progress bar and the silenced noise."""

from __future__ import annotations

import datetime
import logging
import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import StepProgressBar
from callbacks.wandb_logger import WandbLogger
from lightning_modules.app import run_folder
from lightning_modules.app.cli import quiet_unactionable_output
from lightning_modules.app.errors import ConfigError
from lightning_modules.app.run_folder import RunLayout, code_version, new_run_id, run_of_checkpoint, unused_folder, wandb_id
from tests.conftest import REPO


# ------------------------------------------------------------------ layout
def test_fit_starts_a_new_run_folder_named_by_its_id(tmp_path):
    layout = RunLayout.plan("fit", tmp_path / "exp", run_id="20261201-093000-abcdef")
    run = (tmp_path / "exp" / "20261201-093000-abcdef").resolve()
    assert (layout.run_dir, layout.output_dir, layout.config_file) == (run, run, run / "config.yaml")
    assert layout.wandb_id == "20261201-093000-abcdef" and not layout.resumed
    assert not run.exists()  # planning creates nothing


def test_new_run_ids_sort_by_time_and_differ():
    when = datetime.datetime(2026, 12, 1, 9, 30, 5)
    first, second = new_run_id(when), new_run_id(when)
    assert re.fullmatch(r"20261201-093005-[0-9a-f]{6}", first) and first != second


def test_a_resume_continues_in_the_checkpoints_run_and_keeps_its_config(tmp_path):
    run = tmp_path / "exp" / "20261201-093000-abcdef"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("fit config\n")
    layout = RunLayout.plan("fit", tmp_path / "other", ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    assert layout.run_dir == run.resolve() and layout.resumed
    assert layout.config_file == run.resolve() / "config.resume-1.yaml"
    assert layout.wandb_id == "20261201-093000-abcdef"  # the same W&B run
    (run / "config.resume-1.yaml").write_text("first resume\n")
    again = RunLayout.plan("fit", tmp_path / "other", ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    assert again.config_file.name == "config.resume-2.yaml"


def test_test_and_predict_write_inside_the_checkpoints_run_never_over_results(tmp_path):
    run = tmp_path / "exp" / "r1"
    ckpt = str(run / "checkpoints" / "step=20.ckpt")
    first = RunLayout.plan("test", tmp_path / "elsewhere", ckpt_path=ckpt)
    assert first.run_dir == run.resolve() and first.output_dir == run.resolve() / "test"
    assert first.config_file == run.resolve() / "test" / "config.yaml" and first.wandb_id == "r1-test"
    (run / "test").mkdir(parents=True)
    assert RunLayout.plan("test", tmp_path, ckpt_path=ckpt).output_dir == run.resolve() / "test"  # empty: reused
    (run / "test" / "metrics.json").write_text("{}")
    assert RunLayout.plan("test", tmp_path, ckpt_path=ckpt).output_dir == run.resolve() / "test-2"
    predict = RunLayout.plan("predict", tmp_path, ckpt_path=ckpt, predict_name="birds")
    assert predict.output_dir == run.resolve() / "predict" / "birds" and predict.wandb_id == "r1-predict-birds"
    assert RunLayout.plan("predict", tmp_path, ckpt_path=ckpt).output_dir.name == "test_split"


def test_a_checkpoint_outside_a_run_gets_a_new_run(tmp_path):
    layout = RunLayout.plan("test", tmp_path / "exp", ckpt_path=str(tmp_path / "downloaded.ckpt"), run_id="new")
    assert layout.output_dir == (tmp_path / "exp" / "new" / "test").resolve()
    assert run_of_checkpoint(tmp_path / "downloaded.ckpt") is None
    assert run_of_checkpoint(None) is None


def test_output_dir_wins_and_must_not_hold_an_earlier_commands_results(tmp_path):
    run = tmp_path / "exp" / "r1"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    chosen = tmp_path / "mine"
    layout = RunLayout.plan("test", tmp_path, ckpt_path=ckpt, output_dir=str(chosen))
    assert layout.output_dir == chosen.resolve() and layout.run_dir == run.resolve()
    fit = RunLayout.plan("fit", tmp_path, output_dir=str(chosen))
    assert fit.run_dir == chosen.resolve() and fit.wandb_id == "mine"
    chosen.mkdir()
    (chosen / "config.yaml").write_text("earlier\n")
    with pytest.raises(ConfigError, match="already holds the results of an earlier command"):
        RunLayout.plan("predict", tmp_path, ckpt_path=ckpt, output_dir=str(chosen))


def test_unused_folder_and_wandb_id(tmp_path):
    (tmp_path / "a").mkdir()
    assert unused_folder(tmp_path / "a") == tmp_path / "a"
    (tmp_path / "a" / "f").write_text("x")
    (tmp_path / "a-2").mkdir()
    (tmp_path / "a-2" / "f").write_text("x")
    assert unused_folder(tmp_path / "a") == tmp_path / "a-3"
    assert wandb_id("my run/1:b") == "my-run-1-b"


# ------------------------------------------------------------------ provenance
def test_code_version_is_the_git_commit_and_unknown_outside_git(tmp_path, monkeypatch):
    code_version.cache_clear()
    try:
        version = code_version()
        if (REPO / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", version)
        monkeypatch.setattr(run_folder, "REPO", tmp_path)
        code_version.cache_clear()
        assert code_version() == "unknown"
    finally:
        code_version.cache_clear()


# ------------------------------------------------------------------ W&B logger
def test_wandb_logger_ignores_unset_cli_arguments_and_quiets_wandb(tmp_path):
    # What the CLI passes: every wandb.init argument it knows, None when unset.
    logger = WandbLogger(project="p", offline=True, resume=None, group=None, settings=None, anonymous=None)
    assert logger._wandb_init["resume"] == "allow"  # Lightning's default survives
    assert "anonymous" not in logger._wandb_init  # wandb warns about the key whatever its value
    assert logger._wandb_init["settings"] == {"silent": True}
    logger.use_run(tmp_path / "run", "run-id", group="run")
    assert logger._wandb_init["dir"] == str(tmp_path / "run") == logger.save_dir
    assert (logger._wandb_init["id"], logger.version, logger._wandb_init["group"]) == ("run-id", "run-id", "run")


def test_wandb_logger_keeps_what_the_config_sets(tmp_path, monkeypatch):
    monkeypatch.setattr("callbacks.wandb_logger.wandb_can_go_online", lambda: (True, ""))
    logger = WandbLogger(project="p", save_dir=str(tmp_path / "mine"), id="chosen", group="g", offline=None)
    assert logger._wandb_init["settings"] == {"quiet": True}  # online: W&B still prints the run's URL
    logger.use_run(tmp_path / "run", "run-id", group="run")
    assert logger.save_dir == str(tmp_path / "mine")
    assert (logger._wandb_init["id"], logger._wandb_init["group"]) == ("chosen", "g")


# ------------------------------------------------------------------ progress bar
class _Steps(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def _fit_printing(tmp_path, capsys, **limits) -> str:
    loader = DataLoader(TensorDataset(torch.rand(4, 1)), batch_size=1)  # 4 steps per epoch
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[StepProgressBar()], accelerator="cpu", **limits)
    trainer.fit(_Steps(), loader)
    return capsys.readouterr().out.replace("\r", "\n")


def test_progress_bar_counts_steps_across_epochs_under_max_steps(tmp_path, capsys):
    out = _fit_printing(tmp_path, capsys, max_steps=10)
    assert "Steps: 100%" in out and "10/10" in out and "step/s" in out
    assert "Epoch" not in out and "-2" not in out and "v_num" not in out


def test_progress_bar_under_an_epoch_budget_is_lightnings(tmp_path, capsys):
    out = _fit_printing(tmp_path, capsys, max_epochs=2)
    assert "Epoch 1: 100%" in out and "4/4" in out and "Steps:" not in out


# ------------------------------------------------------------------ noise
def test_only_the_named_unactionable_messages_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_unactionable_output()
        warnings.warn("Found 787 module(s) in eval mode at the start of training. This may lead to ...",
                      PossibleUserWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
                      FutureWarning)
        warnings.warn("Found 3 problems in your data", UserWarning)
    assert [str(w.message) for w in caught] == ["Found 3 problems in your data"]

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    try:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero_info("Keypoint tokens: [1, 2]")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Keypoint tokens: [1, 2]"]


# ------------------------------------------------------------------ validate
def test_validate_is_refused_with_the_reason_and_what_to_run(capsys):
    from run import main

    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--config", str(REPO / "conf" / "demo.yaml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "`validate` is not offered" in err and "python run.py test" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "{fit,test,predict}" in capsys.readouterr().out


def test_provenance_without_a_checkpoint_names_the_pretrained_context(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    (tmp_path / "detector").mkdir()
    local = SimpleNamespace(hparams={"pretrained_context": "detector"})
    assert run_folder.provenance(None, local) == {
        "checkpoint": str(tmp_path / "detector"), "config": None, "code_version": code_version()}
    hub = SimpleNamespace(hparams={"pretrained_context": "someone/cub-keypoints"})
    assert run_folder.checkpoint_of(None, hub) == "someone/cub-keypoints"  # a hub id stays a hub id
    assert run_folder.checkpoint_of(None, SimpleNamespace(hparams={})) is None


def test_a_killed_predict_is_continued_in_its_folder_and_a_finished_one_is_not(tmp_path):
    run = tmp_path / "r1"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    folder = run / "predict" / "birds"
    (folder / "shards").mkdir(parents=True)
    (folder / "config.yaml").write_text("first\n")
    again = RunLayout.plan("predict", tmp_path, ckpt_path=ckpt, predict_name="birds")
    assert again.output_dir == folder.resolve() and again.resumed
    assert again.config_file == folder.resolve() / "config.resume-1.yaml"
    mine = RunLayout.plan("predict", tmp_path, ckpt_path=ckpt, output_dir=str(folder))  # --output_dir too
    assert mine.output_dir == folder.resolve() and mine.resumed
    (folder / "keypoints.json").write_text("{}")
    done = RunLayout.plan("predict", tmp_path, ckpt_path=ckpt, predict_name="birds")
    assert done.output_dir == run.resolve() / "predict" / "birds-2" and not done.resumed


def test_launched_processes_take_their_launchers_layout_and_nobody_else_does(monkeypatch, tmp_path):
    import json
    import os
    import sys

    from lightning_modules.app.cli import LAYOUT_VARIABLE, inherited_layout

    layout = RunLayout.plan("fit", tmp_path, run_id="20261201-093000-abcdef")
    assert RunLayout.from_json(layout.to_json()) == layout
    handed = {"pid": os.getppid(), "argv": sys.argv[1:], "command": "fit", "layout": layout.to_json()}
    monkeypatch.setenv(LAYOUT_VARIABLE, json.dumps(handed))
    assert inherited_layout("fit") == layout
    assert inherited_layout("test") is None  # another command
    monkeypatch.setenv(LAYOUT_VARIABLE, json.dumps({**handed, "argv": ["predict", "--config", "x.yaml"]}))
    assert inherited_layout("fit") is None  # a parent that ran the CLI in-process, then started run.py
    monkeypatch.setenv(LAYOUT_VARIABLE, json.dumps({**handed, "pid": os.getpid()}))
    assert inherited_layout("fit") is None  # this process's own earlier command
    monkeypatch.delenv(LAYOUT_VARIABLE)
    assert inherited_layout("fit") is None
