"""What only a GPU shows: devices of every tensor in fit/test/predict, channels_last, TF32, bf16, DDP over NCCL.

Skipped without CUDA. ``benchmarks/gpu_check.sh`` runs them on a GPU; its ``--dry-run`` (a test of its
own, on this CPU) sets ``GPU_TESTS_ON_CPU=1`` so that they run on the CPU and their plumbing is checked
where no GPU is: there the device checks hold trivially, and NCCL is replaced by gloo.
"""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from callbacks.prediction_writer import KeypointWriter
from data.cub import CUBDataModule
from lightning_modules.backbones import StableDiffusion
from lightning_modules.backbones import Engine
from lightning_modules.stable_keypoints import StableKeypoints
from tests.conftest import tiny_module

pytestmark = pytest.mark.gpu

#: Device moves are explicit and meant (e.g. results copied out for writing); scalars read back are fine.
ALLOWED_OFF_DEVICE = {"aten._to_copy.default", "aten.copy_.default", "aten._local_scalar_dense.default",
                      "aten.lift_fresh.default"}


@pytest.fixture
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("GPU_TESTS_ON_CPU") == "1":
        return "cpu"
    pytest.skip("needs a CUDA GPU (benchmarks/gpu_check.sh; GPU_TESTS_ON_CPU=1 runs it on the CPU)")


def small_module(model_path, **engine) -> StableKeypoints:
    return tiny_module(model_path, backbone={"engine": Engine(**engine)}, load=False, num_indices=4, augmentation_iterations=2)


class OffDevice(TorchDispatchMode):
    """Records every op, inside a step, whose output (beyond a scalar) is not on ``device``."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device, self.found = torch.device(device).type, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = out if isinstance(out, (tuple, list)) else [out]
        if str(func) not in ALLOWED_OFF_DEVICE:
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 1 and tensor.device.type != self.device:
                    self.found.add(f"{func} -> {tensor.device}")
        return out


class DeviceProbe(L.Callback):
    """Runs each fit/test/predict step under ``OffDevice`` and checks the module's tensors and generators."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mode = OffDevice(device)
        self.steps = {"train": 0, "test": 0, "predict": 0}

    def _enter(self, pl_module) -> None:
        kind = torch.device(self.device).type
        names = [n for n, t in [*pl_module.named_parameters(), *pl_module.named_buffers()] if t.device.type != kind]
        assert names == [], f"off {self.device}: {names[:5]}"
        # A generator on another device than its tensors is an error inside the step itself.
        self.mode.__enter__()

    def _exit(self, stage: str) -> None:
        self.mode.__exit__(None, None, None)
        self.steps[stage] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._enter(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._exit("train")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._enter(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._exit("test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._enter(pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._exit("predict")
        assert outputs["keypoints"].device.type == torch.device(self.device).type


def test_fit_test_and_predict_keep_every_tensor_and_generator_on_the_device(device, tiny_sd_path, cub_root, tmp_path):
    module = small_module(tiny_sd_path)
    data = CUBDataModule(str(cub_root), subset="cub_001", image_size=64, batch_size=2, num_workers=0)
    probe = DeviceProbe(device)
    options = dict(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    L.Trainer(max_steps=2, callbacks=[probe], **options).fit(module, datamodule=data)
    L.Trainer(callbacks=[probe], **options).test(module, datamodule=data)
    writer = KeypointWriter(output_dir=str(tmp_path / "predictions"), overlays=False)
    L.Trainer(callbacks=[probe, writer], **options).predict(module, datamodule=data, return_predictions=False)
    assert probe.steps["train"] == 2 and probe.steps["test"] > 0 and probe.steps["predict"] > 0
    assert probe.mode.found == set()
    assert module.keypoint_tokens.device.type == torch.device(device).type
    assert json.loads((tmp_path / "predictions" / "keypoints.json").read_text())["images"]


def test_channels_last_unet_gives_the_same_maps(device, tiny_sd_path, images, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare fp32 convolutions with fp32 ones
    maps = {}
    for channels_last in (False, True):
        module = small_module(tiny_sd_path, channels_last=channels_last)
        module.configure_model()
        module.to(device)
        if channels_last:
            weight = module.backbone.unet.conv_in.weight
            assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        with torch.no_grad():
            maps[channels_last] = module.maps_of(images.to(device), torch.Generator(device).manual_seed(0)).cpu()
    torch.testing.assert_close(maps[True], maps[False], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("allow", [True, False])
def test_tf32_is_allowed_only_when_asked(device, tiny_sd_path, allow):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        StableDiffusion(str(tiny_sd_path), engine=Engine(allow_tf32=allow)).load()
        assert torch.backends.cuda.matmul.allow_tf32 is allow and torch.backends.cudnn.allow_tf32 is allow
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_backbone_keeps_context_maps_and_loss_in_fp32(device, tiny_sd_path, images):
    results = {}
    for dtype in ("float32", "bfloat16"):
        module = small_module(tiny_sd_path, dtype=dtype)
        module.configure_model()
        module.to(device)
        assert module.backbone.unet.dtype == getattr(torch, dtype) and module.context.dtype == torch.float32
        maps = module.maps_of(images.to(device), torch.Generator(device).manual_seed(0))
        theta = torch.eye(3, device=device).expand(len(images), 3, 3)
        loss = module.losses(maps, maps, theta)["loss"]
        loss.backward()
        assert maps.dtype == torch.float32 and loss.dtype == torch.float32
        assert module.context.grad.dtype == torch.float32 and torch.isfinite(module.context.grad).all()
        results[dtype] = maps.detach().cpu()
    torch.testing.assert_close(results["bfloat16"], results["float32"], atol=2e-3, rtol=0)


@pytest.mark.slow
def test_ddp_on_one_device_uses_nccl_and_syncs_only_the_context(device, tiny_sd_path, cub_root, tmp_path):
    from tests.test_cli import DEMO, run_cli

    probe = tmp_path / "probe"
    run_cli("fit", "--config", DEMO, "--model.backbone.init_args.pretrained_model_name_or_path", str(tiny_sd_path),
            "--data.init_args.root", str(cub_root), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--trainer.max_steps", "2", "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
            "--trainer.devices", "1", "--trainer.strategy", "ddp", "--data.init_args.image_size", "64",
            "--data.init_args.subset", "cub_001", "--model.feature_upsample_res", "16", "--model.num_indices", "4",
            "--trainer.callbacks+=tests.ddp_probe.RecordDDPSync", f"--trainer.callbacks.directory={probe}")
    record = json.loads((probe / "ddp_rank0.json").read_text())
    assert record["backend"] == ("nccl" if device == "cuda" else "gloo")
    assert record["synced_parameters"] == ["context"] and record["synced_buffers"] == []
