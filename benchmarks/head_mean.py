"""The captured layers' maps alone: forward + backward of ``head_mean_attention`` per block size.

One call per captured layer of SD 1.5 at 512 px (B 2: an image and its augmented copy, H 8,
T 500 tokens, R 128, the loss reading 20 tokens), with the queries in the layout the UNet gives
them (a transposed view). Prints seconds per block size (``attention._BLOCK_BYTES``), min and
median of ``--repeats`` interleaved runs, and the difference from the plain autograd result.

    python -m benchmarks.head_mean
    python -m benchmarks.head_mean --blocks 8 16 32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.engine import attention  # noqa: E402

#: (name, head dim, side of the layer's grid) of SD 1.5's default layers at 512 px.
LAYERS = (("up_blocks.1 (16x16, d 160)", 160, 16), ("up_blocks.2 (32x32, d 80)", 80, 32))


def inputs(dim: int, side: int, batch: int, heads: int, tokens: int, resolution: int, read: int):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, side * side, heads * dim, generator=gen).view(batch, -1, heads, dim).transpose(1, 2)
    k = torch.randn(batch, tokens, heads * dim, generator=gen).view(batch, -1, heads, dim).transpose(1, 2)
    grad = torch.zeros(batch, resolution**2, tokens)
    grad[..., torch.randperm(tokens, generator=gen)[:read]] = torch.randn(batch, resolution**2, read, generator=gen)
    return q, k, attention.bicubic_weights(side, resolution).float(), grad


def forward_backward(q, k, weights, grad, memory_efficient: bool = True):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    start = time.perf_counter()
    out = attention.head_mean_attention(q, k, q.shape[-1] ** -0.5, memory_efficient, weights)
    out.backward(grad)
    return time.perf_counter() - start, (out.detach(), q.grad, k.grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="block sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--res", type=int, default=128)
    args = parser.parse_args()
    default = attention._BLOCK_BYTES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default block {default >> 20} MiB\n")
    print("| layer | block MiB | fwd+bwd s (min) | median | max abs diff vs autograd |")
    print("|---|---|---|---|---|")
    for name, dim, side in LAYERS:
        q, k, weights, grad = inputs(dim, side, 2, 8, args.tokens, args.res, read=20)
        _, reference = forward_backward(q, k, weights, grad, memory_efficient=False)
        seconds: dict[int, list[float]] = {mib: [] for mib in args.blocks}
        diffs: dict[int, float] = {}
        try:
            for repeat in range(args.repeats):
                order = args.blocks if repeat % 2 == 0 else args.blocks[::-1]
                for mib in order:
                    attention._BLOCK_BYTES = mib << 20
                    elapsed, result = forward_backward(q, k, weights, grad)
                    seconds[mib].append(elapsed)
                    diffs[mib] = max((a - b).abs().max().item() for a, b in zip(result, reference))
        finally:
            attention._BLOCK_BYTES = default
        for mib in args.blocks:
            times = seconds[mib]
            print(f"| {name} | {mib} | {min(times):.3f} | {statistics.median(times):.3f} | {diffs[mib]:.1e} |")


if __name__ == "__main__":
    main()
