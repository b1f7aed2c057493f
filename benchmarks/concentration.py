"""Attention concentration of every model family after a short demo fit (docs/method.md section 7).

Trains the demo settings on tiny random models of SD 1.5, SDXL and zero123plus (weights only,
reference attention, and the naive Stable123Keypoints variant) and prints the logged
``train/concentration`` (mass within 3 sigma of the argmax) and ``train/spatial_entropy`` at the
first and last steps. With real weights (``--model`` paths or hub ids) it is the measurement of the
zero123plus question.

    python -m benchmarks.concentration --steps 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.opt_in_modes import fit_demo  # noqa: E402
from data.demo import DEMO_SIZE, ensure_synthetic_cub  # noqa: E402
from data.demo_models import write_tiny  # noqa: E402
from lightning_modules.backbones import StableDiffusion, StableDiffusionXL, Zero123Plus  # noqa: E402

RUNS = {
    "sd15": (StableDiffusion, {}),
    "sdxl": (StableDiffusionXL, {}),
    "zero123plus weights_only": (Zero123Plus, {}),
    "zero123plus reference_attention": (Zero123Plus, {"mode": "reference_attention"}),
    "zero123plus naive": (Zero123Plus, {"naive": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = ensure_synthetic_cub(Path(tmp) / "CUB_200_2011", **DEMO_SIZE)
        for name, (cls, options) in RUNS.items():
            model = Path(tmp) / cls.__name__
            if not model.exists():
                write_tiny(cls.__name__, model)
            _, _, history, _ = fit_demo(cls(str(model), **options), args.steps, data, tmp)
            rows.append((name, history))
    print(f"demo data, tiny random models, {args.steps} steps (first -> last step)")
    print("| family | loss | concentration | spatial entropy |")
    print("|---|---|---|---|")
    for name, h in rows:
        cells = [f"{h[key][0]:.3f} -> {h[key][-1]:.3f}" for key in ("train/loss", "train/concentration", "train/spatial_entropy")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
