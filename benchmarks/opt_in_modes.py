"""Do the opt-in modes change what training computes? A measured comparison against fp32 on the demo.

Trains the demo (tiny random SD 1.5-shaped model, synthetic CUB) once per mode with the same seeds,
then compares each run with the fp32 one: the loss curve, the chosen keypoint tokens and the
keypoints extracted on test images. Modes: ``bf16`` (frozen UNet/VAE in bfloat16; context, maps,
targets and losses fp32), ``checkpointing`` (gradient checkpointing), ``compile`` (torch.compile of
the UNet's blocks).

    python -m benchmarks.opt_in_modes --steps 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.cub import CUBDataModule  # noqa: E402
from data.demo import DEMO_SIZE, ensure_synthetic_cub  # noqa: E402
from data.demo_models import write_tiny  # noqa: E402
from lightning_modules.backbones import Engine, StableDiffusion  # noqa: E402
from lightning_modules.stable_keypoints import StableKeypoints  # noqa: E402

MODES = {
    "fp32": Engine(),
    "bf16": Engine(dtype="bfloat16"),
    "checkpointing": Engine(gradient_checkpointing=True),
    "compile": Engine(compile_unet=True),
}


class Recorder(L.Callback):
    """The logged training scalars of every step."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, value in trainer.callback_metrics.items():
            self.history.setdefault(name, []).append(float(value))


def fit_demo(backbone, steps: int, data: Path, out: str) -> tuple[StableKeypoints, CUBDataModule, dict, float]:
    """Trains the demo's settings on ``backbone`` -> (module, datamodule, logged history, seconds)."""
    L.seed_everything(0, verbose=False)
    module = StableKeypoints(backbone, num_tokens=100, feature_upsample_res=32, sigma_px=1.0)
    datamodule = CUBDataModule(str(data), image_size=128, batch_size=2, num_workers=0)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        default_root_dir=out, log_every_n_steps=1)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    return module, datamodule, recorder.history, time.perf_counter() - start


def run(mode: str, args, model: Path, data: Path) -> dict:
    module, datamodule, history, seconds = fit_demo(StableDiffusion(str(model), engine=MODES[mode]), args.steps, data, args.out)
    images = torch.cat([b["image"] for _, b in zip(range(args.test_batches), datamodule.test_dataloader()[1])])
    keypoints = module.keypoints(images, torch.Generator().manual_seed(0))
    return {"losses": torch.tensor(history["train/loss"]), "tokens": module.keypoint_tokens.tolist(),
            "keypoints": keypoints, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--test-batches", type=int, default=8, help="test batches (of 2 images) to extract keypoints on")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.out = tmp
        model, data = Path(tmp) / "sd15-tiny", Path(tmp) / "CUB_200_2011"
        write_tiny("StableDiffusion", model)
        ensure_synthetic_cub(data, **DEMO_SIZE)
        results = {mode: run(mode, args, model, data) for mode in ["fp32", *[m for m in args.modes if m != "fp32"]]}
    base = results["fp32"]
    print(f"demo, {args.steps} steps, tiny SD 1.5-shaped model at 128 px; differences against fp32")
    print("| mode | fit s | final loss | max |loss - fp32| | max relative | keypoint tokens shared | mean keypoint shift (px at 128) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        diff = (r["losses"] - base["losses"]).abs()
        relative = (diff / base["losses"].abs().clamp_min(1e-12)).max().item()
        shared = len(set(r["tokens"]) & set(base["tokens"]))
        shift = ((r["keypoints"] - base["keypoints"]).norm(dim=-1) * 128).mean().item()
        print(f"| {mode} | {r['seconds']:.1f} | {r['losses'][-1]:.4f} | {diff.max():.2e} | {relative:.2e} | "
              f"{shared}/{len(base['tokens'])} | {shift:.2f} |")


if __name__ == "__main__":
    main()
