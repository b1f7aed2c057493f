"""Two of the engine's parts against the plain modules they replace, at SD 1.5's sizes (512 px, an image pair).

- the VAE encoder's second convolution summed into the residual (``encoder.add_conv_into``) against
  the convolution then the sum (``conv(x).add_(residual)``), per stage of the encoder;
- ``frozen.FrozenGEGLU`` (forward + backward) against diffusers' ``GEGLU`` under autograd, plain and
  under ``torch.utils.checkpoint`` (which the engine used before), at the UNet's 64 x 64, 32 x 32
  and 16 x 16 feed-forward layers, with the bytes each keeps for backward.

The sides run alternately, ``--repeats`` times each after one warm-up; the table gives the median
seconds of each and checks that the results are equal bit for bit. CPU, fp32 (on a GPU the
convolution takes the plain path, and the GEGLU replays its projection at every size).

    python -m benchmarks.engine_parts
    python -m benchmarks.engine_parts --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory_model import kept_for_backward  # noqa: E402
from lightning_modules.engine.encoder import add_conv_into  # noqa: E402
from lightning_modules.engine.frozen import FrozenGEGLU  # noqa: E402

#: (stage, channels, side) of SD's VAE encoder at 512 px.
VAE_STAGES = (("VAE 512x512, 128 ch", 128, 512), ("VAE 256x256, 256 ch", 256, 256), ("VAE 128x128, 512 ch", 512, 128))
#: (layer, width, side) of SD 1.5's UNet feed-forwards at 512 px (the projection is 8x the width).
GEGLU_LAYERS = (("GEGLU 64x64, 320 wide", 320, 64), ("GEGLU 32x32, 640 wide", 640, 32), ("GEGLU 16x16, 1280 wide", 1280, 16))


def _alternate(sides: dict, repeats: int, prepare=lambda: None) -> tuple[dict[str, float], bool]:
    """sides: name -> function, the last one the engine's -> (median s per side, all results equal to the
    first side's). One warm-up call each; ``prepare`` runs untimed before each call."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    results = {}
    for run in range(repeats + 1):
        for name, fn in sides.items():
            prepare()
            start = time.perf_counter()
            results[name] = fn()
            if run:
                times[name].append(time.perf_counter() - start)
    first = next(iter(results.values()))
    equal = all(torch.equal(a, b) for result in results.values() for a, b in zip(first, result))
    return {name: statistics.median(t) for name, t in times.items()}, equal


def _kept_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward of ``module(x)``, the module's weights excluded."""
    with kept_for_backward(module) as kept:
        module(x.clone().requires_grad_())
    return sum(kept.values())


def vae_rows(repeats: int):
    for name, channels, side in VAE_STAGES:
        gen = torch.Generator().manual_seed(0)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
        x = torch.randn(2, channels, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
        residual = torch.randn(2, channels, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
        target = residual.clone()  # in the encoder the residual exists already: refilled untimed
        sides = {"plain": lambda: (conv(x).add_(residual),), "engine": lambda: (add_conv_into(target, conv, x),)}
        with torch.no_grad():
            seconds, equal = _alternate(sides, repeats, prepare=lambda: target.copy_(residual))
        yield name, seconds["plain"], None, seconds["engine"], equal, None


def geglu_rows(repeats: int):
    for name, width, side in GEGLU_LAYERS:
        gen = torch.Generator().manual_seed(0)
        plain_module = GEGLU(width, 4 * width).requires_grad_(False)
        lean_module = FrozenGEGLU.of(plain_module)
        x = torch.randn(2, side * side, width, generator=gen)
        upstream = torch.randn(2, side * side, 4 * width, generator=gen)

        def run(module, replay=False):
            leaf = x.clone().requires_grad_()
            out = checkpoint(module, leaf, use_reentrant=False) if replay else module(leaf)
            out.backward(upstream)
            return out.detach(), leaf.grad

        sides = {"plain": lambda: run(plain_module), "checkpointed": lambda: run(plain_module, replay=True),
                 "engine": lambda: run(lean_module)}
        seconds, equal = _alternate(sides, repeats)
        kept = {"plain": _kept_bytes(plain_module, x) / 2**20, "engine": _kept_bytes(lean_module, x) / 2**20}
        yield name, seconds["plain"], seconds["checkpointed"], seconds["engine"], equal, kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} alternating runs")
    print("| part | plain s | checkpointed s | engine s | engine / plain | kept MiB plain -> engine | equal bit for bit |")
    print("|---|---|---|---|---|---|---|")
    for name, plain, replayed, engine, equal, kept in [*vae_rows(args.repeats), *geglu_rows(args.repeats)]:
        replayed = "-" if replayed is None else f"{replayed:.3f}"
        kept = "-" if kept is None else f"{kept['plain']:.0f} -> {kept['engine']:.0f}"
        print(f"| {name} | {plain:.3f} | {replayed} | {engine:.3f} | x{engine / plain:.2f} | {kept} | "
              f"{'yes' if equal else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
