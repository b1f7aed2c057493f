"""Training-step and keypoint-extraction benchmark through the project's own code path.

Builds a model with random weights from a config (no download): ``tiny`` (the test model),
``small`` (SD 1.5 block layout, 8.4 M parameters, 768-wide context), ``sd15``, ``sdxl``, ``sd35m``
and ``sd35l`` (the real architectures; SD 3.5 medium and large). The weights are written once to a
diffusers folder (``~/.cache/stable_keypoints/bench/<model>``) and loaded from it as a run loads a
model, so that the memory is what a user's process holds (``from_pretrained`` memory-maps the weight
files). Every mode runs in its own subprocess, so each peak-memory figure is its own, and prints one
table row; the parent prints the table and the ratios against ``optimized``.

Memory columns: ``process_peak_gib`` is the peak resident memory of the mode's whole process, load
included, as ``/usr/bin/time -v`` reports it (on a GPU: ``cuda_allocated_gib`` and
``cuda_reserved_gib``, PyTorch's peak allocated and reserved GPU memory); ``train_peak_gib`` is the
same peak taken after the training steps, before extraction.

Modes:
- ``optimized``: the defaults: one VAE and one UNet call for an image and its augmented copy,
  forward stopped after the last captured layer, queries projected before upsampling, head-averaged
  maps computed in cache-sized blocks and recomputed in backward, all augmentations of an image
  extracted in one batch.
- ``naive``: the reference's way: separate calls for the image and its copy, the full UNet forward,
  features upsampled before ``to_q``, per-head maps kept for backward, one augmentation at a time in
  extraction.
- ``bf16``, ``checkpointing``, ``compile``: opt-in modes on top of ``optimized``.

``optimized`` and ``naive`` must give the same maps and losses (checked to 1e-5 on the first
step's inputs); the opt-in modes report their difference instead.

Each mode also runs one step and one extraction under ``FlopCounterMode`` and probes the machine's
attainable conv and matmul throughput in the same process (``benchmarks/limits.py``); the second
table gives each phase's FLOPs, achieved FLOP/s and % of attainable (VAE, UNet forward, maps,
selection and losses, backward, extraction).

``--model-dir`` runs on any diffusers folder (``unet/`` or ``transformer/``, ``vae/``, ``scheduler/``)
instead of random weights, so other implementations can be timed on identical weights.

    python -m benchmarks.bench --model small --image-size 512 --steps 5
    python -m benchmarks.bench --model sd15 --image-size 512 --steps 2 --modes optimized naive
    python -m benchmarks.bench --model sd15 --model-dir /path/to/stable-diffusion-v1-5 --modes optimized
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from benchmarks import limits  # noqa: E402
from benchmarks.limits import Phases, sync  # noqa: E402
from lightning_modules.capture import CaptureProcessor  # noqa: E402
from lightning_modules.augmentation import warp  # noqa: E402
from data.demo_models import TINY_VAE, sd_scheduler, tiny_sd_unet  # noqa: E402
from lightning_modules.backbones import Engine, StableDiffusion, StableDiffusion3, StableDiffusionXL  # noqa: E402
from benchmarks.real_models import SD15_UNET, SD_VAE  # noqa: E402
from benchmarks.real_models import SD3_SCHEDULER, SD3_VAE, SD35L_TRANSFORMER, SD35M_TRANSFORMER, SDXL_UNET  # noqa: E402
from lightning_modules.app import files  # noqa: E402
from lightning_modules.engine import release_freed_host_memory  # noqa: E402
from lightning_modules.stable_keypoints import StableKeypoints  # noqa: E402

MODES = ("optimized", "naive", "bf16", "checkpointing", "compile")
#: The family of each --model (of --model-dir's folder too).
FAMILIES = {"tiny": StableDiffusion, "small": StableDiffusion, "sd15": StableDiffusion, "sdxl": StableDiffusionXL,
            "sd35m": StableDiffusion3, "sd35l": StableDiffusion3}
SD35_TRANSFORMERS = {"sd35m": SD35M_TRANSFORMER, "sd35l": SD35L_TRANSFORMER}


def build_components(model: str, device: torch.device):
    """-> (backbone class, unet, vae, scheduler) with random weights, initialized on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        if model == "tiny":
            return StableDiffusion, tiny_sd_unet(), AutoencoderKL(**TINY_VAE), sd_scheduler()
        if model == "small":
            unet = tiny_sd_unet(cross_attention_dim=768, block_out_channels=(32, 64, 96, 128), attention_head_dim=8)
            return StableDiffusion, unet, AutoencoderKL(**TINY_VAE), sd_scheduler()
        if model == "sd15":
            return StableDiffusion, UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD_VAE), sd_scheduler()
        if model == "sdxl":
            vae = AutoencoderKL(**SD_VAE, scaling_factor=0.13025, force_upcast=True)
            scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
            return StableDiffusionXL, UNet2DConditionModel(**SDXL_UNET), vae, scheduler
        if model in SD35_TRANSFORMERS:
            return (StableDiffusion3, SD3Transformer2DModel(**SD35_TRANSFORMERS[model]), AutoencoderKL(**SD3_VAE),
                    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))
    raise ValueError(f"--model {model!r}: use one of {sorted(FAMILIES)}.")


def model_folder(model: str) -> Path:
    """A diffusers folder with ``model``'s random weights (seed 0), written once and then reused."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stable_keypoints" / "bench" / model
    if not folder.exists():
        cls, denoiser, vae, scheduler = build_components(model, torch.device("cpu"))
        with files.atomic_folder(folder) as tmp:
            denoiser.save_pretrained(tmp / cls.denoiser_subfolder)
            vae.save_pretrained(tmp / "vae")
            scheduler.save_pretrained(tmp / "scheduler")
    return folder


def build_module(args, mode: str, device: torch.device) -> StableKeypoints:
    engine = Engine(
        dtype="bfloat16" if mode == "bf16" else "float32",
        stop_early=mode != "naive",
        memory_efficient_maps=mode != "naive",
        upsample_queries=mode != "naive",
        gradient_checkpointing=mode == "checkpointing",
        compile_unet=mode == "compile",
        channels_last=mode != "naive",  # the reference ran NCHW
    )
    # The weights of a diffusers folder (--model-dir, or the model's random weights), loaded as a run loads them.
    cls = FAMILIES[args.model]
    backbone = cls(str(args.model_dir or model_folder(args.model)), local_files_only=True, engine=engine)
    backbone.load()
    module = StableKeypoints(backbone, num_tokens=args.tokens, feature_upsample_res=args.res,
                             augmentation_iterations=args.iterations)
    module.context = torch.nn.Parameter(torch.randn(args.tokens, backbone.context_dim, generator=torch.Generator().manual_seed(0)))
    return module.to(device)


@contextmanager
def maps_phase(phases: Phases):
    """Times (and counts) the maps of every captured layer as the nested phase ``maps`` of the UNet forward."""
    original = CaptureProcessor._maps

    def timed(self, *args, **kwargs):
        with phases("maps"):
            return original(self, *args, **kwargs)

    CaptureProcessor._maps = timed  # a benchmark-only wrapper; the library has no timing hooks
    try:
        yield
    finally:
        CaptureProcessor._maps = original


def training_step(module: StableKeypoints, images: torch.Tensor, theta: torch.Tensor, noise_seed: int, naive: bool, phases: Phases):
    """One optimizer step as ``StableKeypoints.training_step`` does it (or the naive way); -> (maps, losses)."""
    backbone, res = module.backbone, module.hparams.feature_upsample_res
    batch = images.shape[0]
    both = torch.cat([images, warp(images, theta)])
    with phases("vae"):
        if naive:  # two VAE calls and two UNet calls, as the reference did
            latents = [backbone.encode(x) for x in both.split(batch)]
        else:
            latents = [backbone.encode(both)]
    noise = backbone.sample_noise({"latents": torch.cat([z["latents"] for z in latents])},
                                  torch.Generator(device=images.device).manual_seed(noise_seed))
    noise = [{"latents": n} for n in noise["latents"].split(latents[0]["latents"].shape[0])]
    with phases("unet+maps"), maps_phase(phases):
        maps = torch.cat([backbone.attention_maps(z, n, module.context, res) for z, n in zip(latents, noise)])
    with phases("select+loss"):
        losses = module.losses(*maps.split(batch), theta)  # as StableKeypoints.training_step splits
    with phases("backward"):
        losses["loss"].backward()
    phases.exclusive("unet+maps", "maps", "unet")
    module.context.grad = None
    maps, losses = maps.detach(), {k: v.detach() for k, v in losses.items()}
    if images.device.type == "cpu":
        release_freed_host_memory()  # as StableKeypoints.on_train_batch_end does
    return maps, losses


#: The phases of the limits table, in step order; ``unet`` is the forward without the maps.
PHASES = ("vae", "unet", "maps", "select+loss", "backward", "extraction")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return process_peak_gib()


def process_peak_gib() -> float:
    """The peak resident memory of this process since it started (load included), as /usr/bin/time -v reports it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_mode(args) -> dict:
    device = torch.device(args.device)
    mode = args.mode
    module = build_module(args, mode, device)  # the engine allows TF32 on CUDA (Engine.allow_tf32)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    theta = module.augmentation.sample(args.batch_size, gen).to(device)
    naive = mode == "naive"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times, phase_totals = [], {}
    for step in range(args.warmup + args.steps):
        phases = Phases(device)
        start = time.perf_counter()
        maps, losses = training_step(module, images, theta, noise_seed=step, naive=naive, phases=phases)
        sync(device)
        if step == 0:
            torch.save({"maps": maps.float().cpu(), "losses": {k: v.cpu() for k, v in losses.items()}}, args.check_file)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            for name, seconds in phases.seconds.items():
                phase_totals[name] = phase_totals.get(name, 0.0) + seconds / args.steps
    train_peak = peak_memory_gib(device)
    counted = Phases(device, count_flops=True)  # one more step, for its FLOPs (the counter slows it)
    training_step(module, images, theta, noise_seed=0, naive=naive, phases=counted)

    module.keypoint_tokens = torch.arange(module.hparams.top_k, device=device)
    extract_images = images[: args.extract_batch].expand(args.extract_batch, -1, -1, -1).contiguous()

    def extraction_rate(chunk_size: int | None) -> float:
        """Images per second of ``module.keypoints``; ``chunk_size`` warped images per UNet call."""
        module.hparams.extraction_chunk_size = chunk_size
        rates = []
        for rep in range(1 + args.extract_reps):
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                module.keypoints(extract_images, [rep * len(extract_images) + i for i in range(len(extract_images))])
            sync(device)
            if rep:
                rates.append(len(extract_images) / (time.perf_counter() - start))
        return statistics.median(rates)

    one_per_call = extraction_rate(1)
    batched = one_per_call if naive else extraction_rate(None)  # the reference extracted one at a time
    module.hparams.extraction_chunk_size = 1 if naive else None
    with torch.no_grad(), counted("extraction"):
        module.keypoints(extract_images, list(range(len(extract_images))))
    probes = limits.attainable(device, args.image_size) if args.probe else []
    return {
        "mode": mode,
        "step_s": statistics.median(step_times),
        **{f"{k}_s": v for k, v in phase_totals.items()},
        "train_peak_gib": train_peak,
        "extract_img_per_s": batched,
        "extract_1_per_call_img_per_s": one_per_call,
        "peak_gib": peak_memory_gib(device),
        "process_peak_gib": process_peak_gib(),
        **({"cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "cuda_reserved_gib": torch.cuda.max_memory_reserved() / 2**30} if device.type == "cuda" else {}),
        # extraction: the timed runs' seconds for that many images
        "phase_s": {**phase_totals, "extraction": len(extract_images) / batched},
        "phase_flops": counted.flops,
        "probes": probes,
        "dtype": "bfloat16" if mode == "bf16" else "float32",
    }


def compare(reference: dict, other: dict) -> tuple[float, float]:
    """-> (max |maps difference|, max |loss-term difference|) between two modes' first steps."""
    maps = (reference["maps"] - other["maps"]).abs().max().item()
    keys = ("loss", "loss_loc", "loss_equiv")
    losses = max(abs(reference["losses"][k].item() - other["losses"][k].item()) for k in keys)
    return maps, losses


def print_limits(rows: list[dict]) -> None:
    """The probe table, then per mode and phase: seconds, GFLOP, achieved GFLOP/s, % of attainable."""
    probes = next((row["probes"] for row in rows if row.get("probes")), [])
    if probes:
        print("\nattainable throughput (same process as the first mode):")
        print("| probe | dtype | layout | GFLOP/s |\n|---|---|---|---|")
        for p in probes:
            print(f"| {p['label']} | {p['dtype']} | {p['layout']} | {p['flop_per_s'] / 1e9:.0f} |")
    print("\nper phase (matrix FLOPs: convolutions + matmuls, forward and backward; extraction: all its images):")
    print("| mode | phase | s | conv GFLOP | matmul GFLOP | achieved GFLOP/s | % of attainable |\n|---|---|---|---|---|---|---|")
    for row in rows:
        rates = limits.peak_rates(row["probes"], row["dtype"]) if row.get("probes") else None
        for name in PHASES:
            seconds, flops = row["phase_s"].get(name, 0.0), row["phase_flops"].get(name, {})
            total = sum(flops.values())
            share = f"{100 * limits.floor_seconds(flops, rates) / seconds:.0f}" if rates and seconds > 0 else "-"
            achieved = f"{total / seconds / 1e9:.0f}" if seconds > 0 else "-"
            print(f"| {row['mode']} | {name} | {seconds:.3f} | {flops.get('conv', 0) / 1e9:.1f} | "
                  f"{flops.get('matmul', 0) / 1e9:.1f} | {achieved} | {share} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=list(FAMILIES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--res", type=int, default=128, help="feature_upsample_res")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=10, help="augmentations per image in extraction")
    parser.add_argument("--extract-batch", type=int, default=2, help="images per extraction call")
    parser.add_argument("--extract-reps", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["optimized", "naive"], choices=MODES)
    parser.add_argument("--model-dir", help="a diffusers folder (unet/ or transformer/, vae/, scheduler/) instead of "
                        "the model's random weights; --model then names its family (sd15, sdxl, sd35m or sd35l)")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="skip the attainable-throughput probe (and the %% of attainable column)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--check-file", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    if args.mode:  # child process: one mode
        print(json.dumps(run_mode(args)))
        return

    rows, checks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            check = Path(tmp) / f"{mode}.pt"
            child = [sys.executable, "-m", "benchmarks.bench", *sys.argv[1:], "--mode", mode, "--check-file", str(check)]
            done = subprocess.run(child, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"mode {mode} failed")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            checks[mode] = torch.load(check)

    header = f"model={args.model} device={args.device} image={args.image_size}px batch={args.batch_size} tokens={args.tokens} R={args.res}"
    print(header)
    columns = ["mode", "step_s", "vae_s", "unet_s", "maps_s", "select+loss_s", "backward_s", "train_peak_gib",
               "process_peak_gib", *(["cuda_allocated_gib", "cuda_reserved_gib"] if args.device.startswith("cuda") else []),
               "extract_img_per_s", "extract_1_per_call_img_per_s"]
    print("| " + " | ".join(columns) + " | max |maps diff| | max |loss diff| |")
    print("|" + "---|" * (len(columns) + 2))
    base = checks.get("optimized")
    for row in rows:
        diff = compare(base, checks[row["mode"]]) if base is not None else (float("nan"), float("nan"))
        cells = [row["mode"]] + [f"{row.get(c, float('nan')):.3f}" for c in columns[1:]]
        print("| " + " | ".join(cells) + f" | {diff[0]:.2e} | {diff[1]:.2e} |")
    by_mode = {row["mode"]: row for row in rows}
    if "optimized" in by_mode and "naive" in by_mode:
        opt, naive = by_mode["optimized"], by_mode["naive"]
        print(f"\nnaive / optimized: step time x{naive['step_s'] / opt['step_s']:.2f}, "
              f"training peak memory x{naive['train_peak_gib'] / opt['train_peak_gib']:.2f}, "
              f"extraction x{opt['extract_img_per_s'] / naive['extract_img_per_s']:.2f}")
        maps_diff, loss_diff = compare(checks["optimized"], checks["naive"])
        status = "OK" if maps_diff <= 1e-5 and loss_diff <= 1e-5 else "MISMATCH"
        print(f"same maps and losses (tolerance 1e-5): {status} (maps {maps_diff:.2e}, losses {loss_diff:.2e})")
    if "optimized" in by_mode:
        opt = by_mode["optimized"]
        print(f"extraction, all {args.iterations} augmentations of {args.extract_batch} images in one UNet call vs one "
              f"per call (same process): x{opt['extract_img_per_s'] / opt['extract_1_per_call_img_per_s']:.2f}")
    print_limits(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
