"""Checkpoints: atomic writes, clear errors for missing or truncated files, and a record of the model they fit."""

from __future__ import annotations

import errno

import lightning as L
import pytest
import torch

from lightning_modules.backbones.sd import SD_UP_LAYERS
from lightning_modules.backbones.signature import ContextSignature
from lightning_modules.app.checkpoints import RECORD_KEY, AtomicCheckpointIO, read_checkpoint
from lightning_modules.app.errors import CheckpointMismatchError, ConfigError, MissingFileError
from tests.conftest import REPO, tiny_module

DEMO = str(REPO / "conf" / "demo.yaml")


def fake_checkpoint(family: str = "StableDiffusion", tokens: int = 50, width: int = 32, layers=SD_UP_LAYERS,
                    model: str = "/models/sd15-tiny", feature_upsample_res: int | None = None, **hparams) -> dict:
    """What StableKeypoints writes: the context, its keypoint tokens, the record and hyperparameters."""
    return {
        "state_dict": {"context": torch.randn(tokens, width), "keypoint_tokens": torch.arange(4)},
        RECORD_KEY: ContextSignature(family, model, tuple(layers), feature_upsample_res, tokens, width).record(),
        "hyper_parameters": {"num_tokens": tokens, **hparams},
    }


# ---------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 5}, path)
    before = path.read_bytes()

    def disk_full(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 10}, path)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 10}, tmp_path / "checkpoints" / "epoch=0-step=10.ckpt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no 0-byte step-10 file, no temporary
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert io.load_checkpoint(path) == {"step": 5}


def test_checkpoints_get_the_usual_file_mode(tmp_path) -> None:
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    (tmp_path / "reference").touch()
    assert (tmp_path / "a.ckpt").stat().st_mode == (tmp_path / "reference").stat().st_mode


def test_the_module_installs_the_atomic_writer_and_keeps_a_users_own(tiny_sd_path) -> None:
    from lightning.fabric.plugins import TorchCheckpointIO

    module = tiny_module(tiny_sd_path, load=False)
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    assert type(module.trainer.strategy.checkpoint_io) is TorchCheckpointIO
    module.setup("fit")
    assert type(module.trainer.strategy.checkpoint_io) is AtomicCheckpointIO

    class Own(TorchCheckpointIO):
        pass

    module.trainer = L.Trainer(accelerator="cpu", logger=False, plugins=[Own()])
    module.setup("fit")
    assert type(module.trainer.strategy.checkpoint_io) is Own


# ---------------------------------------------------------------------- reading
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_truncated_or_corrupt_checkpoint_says_so(damage, tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(fake_checkpoint(), path)
    payload = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": payload[: len(payload) // 2], "garbage": b"\x00" * 300}[damage])
    with pytest.raises(MissingFileError, match=r"last.ckpt' is truncated or corrupt .*Use an earlier checkpoint"):
        read_checkpoint(path)
    with pytest.raises(MissingFileError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(path)  # what the Trainer calls


def test_a_missing_checkpoint_is_named(tmp_path) -> None:
    with pytest.raises(MissingFileError, match="ckpt_path='.*nothing.ckpt' does not exist"):
        read_checkpoint(tmp_path / "nothing.ckpt")


# ---------------------------------------------------------------------- a checkpoint knows its model
def test_a_written_checkpoint_records_family_model_layers_and_context_shape(tiny_sd_module) -> None:
    checkpoint = {"state_dict": {"context": tiny_sd_module.context, "backbone.unet.x": torch.zeros(1)}}
    tiny_sd_module.on_save_checkpoint(checkpoint)
    assert checkpoint[RECORD_KEY] == {
        "family": "StableDiffusion",
        "model": tiny_sd_module.backbone.pretrained_model_name_or_path,
        "layers": list(SD_UP_LAYERS),
        "context_shape": [40, 32],
        "feature_upsample_res": 16,
    }
    assert set(checkpoint["state_dict"]) == {"context"}


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        (fake_checkpoint("StableDiffusionXL", tokens=40), "trained with StableDiffusionXL .*but model.backbone is StableDiffusion"),
        (fake_checkpoint("Zero123Plus", tokens=40), "trained with Zero123Plus .*but model.backbone is StableDiffusion"),
        (fake_checkpoint(tokens=50), "context of 50 tokens, but model.num_tokens=40: set --model.num_tokens 50"),
        (fake_checkpoint(tokens=40, layers=SD_UP_LAYERS[:2]), "trained on the maps of layers .*set model.backbone.init_args.layers"),
        (fake_checkpoint(tokens=40, width=1024), "context 1024 wide .*expects 32"),
        (fake_checkpoint(tokens=40, feature_upsample_res=64), "trained on 64 x 64 maps, but model.feature_upsample_res=16"),
    ],
    ids=["sdxl", "zero123plus", "num_tokens", "layers", "width", "feature_upsample_res"],
)
def test_loading_a_checkpoint_of_another_model_fails_clearly(tiny_sd_module, checkpoint, message) -> None:
    with pytest.raises(CheckpointMismatchError, match=message):
        tiny_sd_module.on_load_checkpoint(checkpoint)


def test_a_checkpoint_from_before_the_record_is_checked_by_its_context(tiny_sd_module) -> None:
    old = {"state_dict": {"context": torch.randn(50, 32)}}
    with pytest.raises(CheckpointMismatchError, match="50 tokens, but model.num_tokens=40"):
        tiny_sd_module.on_load_checkpoint(old)
    with pytest.raises(CheckpointMismatchError, match="holds no 'context'"):
        tiny_sd_module.on_load_checkpoint({"state_dict": {}})


# ---------------------------------------------------------------------- the CLI: checked before anything loads
def cli_args(cub_root, *extra: str) -> list[str]:
    # A model path that does not exist: reaching the weights would fail with a loading error instead.
    return [
        "predict", "--config", DEMO,
        "--model.backbone.init_args.pretrained_model_name_or_path", "/no/such/model",
        "--model.backbone.init_args.create_if_missing", "null",
        "--data.init_args.root", str(cub_root),
        *extra,
    ]


def test_cli_missing_checkpoint_fails_before_any_weights_load(cub_root, tmp_path) -> None:
    from run import main

    with pytest.raises(MissingFileError, match="ckpt_path='.*gone.ckpt' does not exist"):
        main(cli_args(cub_root, "--ckpt_path", str(tmp_path / "gone.ckpt")))


def test_cli_truncated_checkpoint_fails_before_any_weights_load(cub_root, tmp_path) -> None:
    from run import main

    path = tmp_path / "last.ckpt"
    torch.save(fake_checkpoint(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MissingFileError, match="truncated or corrupt"):
        main(cli_args(cub_root, "--ckpt_path", str(path)))


@pytest.mark.parametrize(
    ("checkpoint", "extra", "message"),
    [
        (fake_checkpoint(tokens=50), ["--model.num_tokens", "60"], "50 tokens, but model.num_tokens=60"),
        (fake_checkpoint(tokens=100), [], None),  # fits the demo config: passes the check, then fails to load weights
        (fake_checkpoint("StableDiffusionXL", tokens=100), [], "trained with StableDiffusionXL"),
        (fake_checkpoint("Zero123Plus", tokens=100, width=1024), [], "trained with Zero123Plus"),
        (fake_checkpoint(tokens=100, layers=SD_UP_LAYERS[1:]), [], "trained on the maps of layers"),
    ],
    ids=["num_tokens", "fits", "sdxl", "zero123plus", "layers"],
)
def test_cli_checkpoint_of_another_model_fails_before_any_weights_load(cub_root, tmp_path, checkpoint, extra, message) -> None:
    from run import main

    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    if message is None:
        with pytest.raises(OSError, match="/no/such/model"):  # the check passed: the run went on to the weights
            main(cli_args(cub_root, "--ckpt_path", str(path), *extra))
        return
    with pytest.raises(CheckpointMismatchError, match=message):
        main(cli_args(cub_root, "--ckpt_path", str(path), *extra))


def test_cli_ckpt_path_keeps_the_command_lines_settings(cub_root, tmp_path, monkeypatch) -> None:
    import run

    path = tmp_path / "last.ckpt"
    # Trained with non-default values; LightningCLI would have put these over the command line's.
    torch.save(fake_checkpoint(tokens=50, soft_argmax_window_px=None, augmentation_iterations=3,
                               extraction_chunk_size=None), path)
    monkeypatch.setattr(run.StableKeypointsCLI, "_run_subcommand", lambda self, subcommand: None)
    cli = run.main(cli_args(cub_root, "--ckpt_path", str(path), "--model.num_tokens", "50",
                            "--model.soft_argmax_window_px", "5", "--model.augmentation_iterations", "2",
                            "--model.extraction_chunk_size", "4", "--data.init_args.batch_size", "3"))
    hp = cli.model.hparams
    assert (hp.num_tokens, hp.soft_argmax_window_px, hp.augmentation_iterations, hp.extraction_chunk_size) == (50, 5, 2, 4)
    assert cli.datamodule.batch_size == 3
    saved = cli.config["predict"]["model"]  # what SaveConfigCallback writes
    assert (saved["soft_argmax_window_px"], saved["augmentation_iterations"], saved["extraction_chunk_size"]) == (5, 2, 4)


@pytest.mark.parametrize("typed", ["16-mixed", "16"])
def test_cli_fp16_refusal_names_the_value_typed(typed, cub_root) -> None:
    from run import main

    with pytest.raises(ConfigError, match=f"trainer.precision='{typed}' is refused") as error:
        main(cli_args(cub_root, "--trainer.precision", typed))
    assert "bf16-mixed" not in str(error.value)


def test_cli_checkpoint_of_another_width_fails_before_any_weights_load(tiny_sd_path, cub_root, tmp_path, monkeypatch) -> None:
    from lightning_modules.backbones.base import Backbone
    from run import main

    monkeypatch.setattr(Backbone, "load", lambda self: pytest.fail("the weights were loaded before the check"))
    # Same family, layers and token count (an SD 2.x context into an SD 1.5-shaped model): only the width differs.
    path = tmp_path / "last.ckpt"
    torch.save(fake_checkpoint(tokens=100, width=1024, model=str(tiny_sd_path)), path)
    args = cli_args(cub_root, "--ckpt_path", str(path), "--model.backbone.init_args.pretrained_model_name_or_path",
                    str(tiny_sd_path))
    with pytest.raises(CheckpointMismatchError, match="context 1024 wide .*expects 32"):
        main(args)
