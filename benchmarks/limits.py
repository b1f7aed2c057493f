"""What the machine can do, and how close each phase of a step comes to it.

``MatrixFlops`` counts, with ``FlopCounterMode``'s own formulas, the matrix FLOPs (convolutions, matmuls, attention) an operation
sequence runs, by kind. ``attainable`` measures, on the same device and in the same process, the
throughput of a convolution and a matmul shaped like those that dominate a Stable Diffusion step
(the VAE's full-resolution 3x3 convolutions, the UNet's 64x64 ones, its projections), in fp32 and
bf16. A phase's floor is the time its FLOPs would take at those rates; ``% of attainable`` is that
floor over the measured time. Element-wise work (norms, activations, softmax) counts no FLOPs, so
a phase dominated by it shows a low percentage: that is memory traffic, not arithmetic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

#: The kinds FLOPs are counted in: convolutions, and everything matmul-shaped (linear layers,
#: bmm, attention) which the matmul probe stands for.
CONV, MATMUL = "conv", "matmul"


class MatrixFlops(TorchDispatchMode):
    """Counts matrix FLOPs by kind with ``torch.utils.flop_counter``'s formulas (its ``flop_registry``).

    Not ``FlopCounterMode`` itself: that one also tracks modules with autograd hooks, which fail
    ("Expected gradient function to be set") on the UNet's expanded context; only totals are needed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts = {CONV: 0, MATMUL: 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.counts[CONV if "conv" in func._overloadpacket.__name__ else MATMUL] += int(
                formula(*args, **kwargs, out_val=out))
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Phases:
    """Wall-clock seconds and, with ``count_flops``, matrix FLOPs per named phase.

    Phases may nest (the maps inside the UNet forward): an inner phase is also part of the outer
    one's time and FLOPs; ``exclusive`` subtracts it.
    """

    device: torch.device
    count_flops: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, dict[str, int]] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        counter = MatrixFlops() if self.count_flops else None
        sync(self.device)
        start = time.perf_counter()
        if counter is None:
            yield
        else:
            with counter:
                yield
        sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if counter is not None:
            totals = self.flops.setdefault(name, {CONV: 0, MATMUL: 0})
            for kind, n in counter.counts.items():
                totals[kind] += n

    def exclusive(self, outer: str, inner: str, name: str) -> None:
        """Renames ``outer`` to ``name`` with ``inner``'s time and FLOPs taken out."""
        self.seconds[name] = self.seconds.pop(outer, 0.0) - self.seconds.get(inner, 0.0)
        if outer in self.flops:
            outer_flops, inner_flops = self.flops.pop(outer), self.flops.get(inner, {})
            self.flops[name] = {kind: n - inner_flops.get(kind, 0) for kind, n in outer_flops.items()}


def _best_seconds(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.5) -> float:
    """The fastest of repeated calls (after one warm-up), for at least ``min_seconds`` and 3 calls."""
    fn()
    sync(device)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 3 or spent < min_seconds:
        start = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best


def probe_shapes(image_size: int) -> list[tuple[str, str, dict]]:
    """(kind, label, shape) of the probes: the dominant conv and matmul shapes of an SD step at ``image_size``."""
    latent = image_size // 8
    return [
        (CONV, f"3x3 conv 128ch {image_size}px (VAE)", dict(channels=128, side=image_size, batch=1)),
        (CONV, f"3x3 conv 320ch {latent}px (UNet)", dict(channels=320, side=latent, batch=2)),
        (MATMUL, f"({2 * latent * latent}x320) @ (320x1280) (UNet feed-forward)", dict(m=2 * latent * latent, k=320, n=1280)),
        (MATMUL, "(2048x2048) @ (2048x2048)", dict(m=2048, k=2048, n=2048)),
    ]


def attainable(device: torch.device, image_size: int, dtypes=(torch.float32, torch.bfloat16),
               channels_last: bool = True) -> list[dict]:
    """Measured FLOP/s of each probe in each dtype -> rows {kind, label, dtype, layout, flop_per_s}."""
    rows = []
    for dtype in dtypes:
        for kind, label, shape in probe_shapes(image_size):
            if kind == CONV:
                c, s, b = shape["channels"], shape["side"], shape["batch"]
                layouts = (torch.contiguous_format, torch.channels_last) if channels_last else (torch.contiguous_format,)
                for layout in layouts:
                    x = torch.randn(b, c, s, s, device=device, dtype=dtype).contiguous(memory_format=layout)
                    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(memory_format=layout)
                    seconds = _best_seconds(lambda: F.conv2d(x, w, padding=1), device)
                    rows.append(dict(kind=kind, label=label, dtype=str(dtype).removeprefix("torch."),
                                     layout="channels_last" if layout is torch.channels_last else "NCHW",
                                     flop_per_s=2 * b * c * c * 9 * s * s / seconds))
            else:
                a = torch.randn(shape["m"], shape["k"], device=device, dtype=dtype)
                w = torch.randn(shape["k"], shape["n"], device=device, dtype=dtype)
                seconds = _best_seconds(lambda: a @ w, device)
                rows.append(dict(kind=kind, label=label, dtype=str(dtype).removeprefix("torch."), layout="-",
                                 flop_per_s=2 * shape["m"] * shape["k"] * shape["n"] / seconds))
    return rows


def peak_rates(probes: list[dict], dtype: str) -> dict[str, float]:
    """-> {"conv": best conv FLOP/s, "matmul": best matmul FLOP/s} among the probes of ``dtype``."""
    return {kind: max(r["flop_per_s"] for r in probes if r["kind"] == kind and r["dtype"] == dtype)
            for kind in (CONV, MATMUL)}


def floor_seconds(flops: dict[str, int], rates: dict[str, float]) -> float:
    """Seconds ``flops`` would take at ``rates``: the phase's arithmetic floor on this machine."""
    return sum(n / rates[kind] for kind, n in flops.items())
