"""The same benchmark on two checkouts, run alternately, so that drift hits both alike.

This machine's speed drifts by +-25 % within minutes: a ratio means something only between runs
interleaved in one session. Each run benchmarks ``--mode`` only; its process peak (``process_peak_gib``,
load included) is measured from outside, the same way for both checkouts. Runs ``benchmarks.bench`` in ``--baseline`` (e.g. a git worktree of
the previous main) and ``--candidate`` (this checkout) in the order A B B A A B ..., each in its
own process, and prints every run, the medians and the candidate / baseline ratios.

    git worktree add ../old-main <commit>
    python -m benchmarks.interleaved --baseline ../old-main --rounds 2 -- \\
        --model sd15 --image-size 512 --steps 2 --warmup 1 --modes optimized --iterations 4 --extract-batch 1 --extract-reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What is compared, and whether lower is better.
METRICS = {"step_s": True, "process_peak_gib": True, "train_peak_gib": True, "extract_img_per_s": False,
           "extract_1_per_call_img_per_s": False}

#: Runs a command and writes the peak resident memory of its largest process (the whole process tree's
#: largest member, load included: what /usr/bin/time -v reports) to argv[1]. Measured from outside, so
#: any checkout's benchmark gets the same measure, whatever its own columns.
_PEAK_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:]).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def run_bench(tree: Path, bench_args: list[str], mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, peak = Path(tmp) / "bench.json", Path(tmp) / "peak_kib"
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, "-m", "benchmarks.bench", *bench_args, "--modes", mode, "--json", str(out)]
        done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, str(peak), *command], cwd=tree, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"benchmarks.bench failed in {tree}:\n{done.stderr[-3000:]}")
        rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
        row = rows[mode]
        row["process_peak_gib"] = int(peak.read_text()) / 2**20  # KiB on Linux
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--candidate", type=Path, default=REPO, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each checkout")
    parser.add_argument("--mode", default="optimized", help="the bench mode whose row is compared")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the arguments of benchmarks.bench")
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    trees = {"baseline": args.baseline.resolve(), "candidate": args.candidate.resolve()}
    results = {name: [] for name in trees}
    order = []
    for round_ in range(args.rounds):
        order += ["baseline", "candidate"] if round_ % 2 == 0 else ["candidate", "baseline"]
    print("| run | checkout | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
    for i, name in enumerate(order):
        row = run_bench(trees[name], bench_args, args.mode)
        results[name].append(row)
        print(f"| {i + 1} | {name} | " + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |", flush=True)
    print(f"\nmedians over {args.rounds} runs each, and candidate / baseline:")
    print("| metric | baseline | candidate | ratio |\n|---|---|---|---|")
    for metric, lower_is_better in METRICS.items():
        base = statistics.median(r[metric] for r in results["baseline"])
        cand = statistics.median(r[metric] for r in results["candidate"])
        better = "lower is better" if lower_is_better else "higher is better"
        print(f"| {metric} ({better}) | {base:.3f} | {cand:.3f} | x{cand / base:.2f} |")
    print(f"\nbaseline {trees['baseline']} ({_commit(trees['baseline'])}), candidate {trees['candidate']} "
          f"({_commit(trees['candidate'])}); bench arguments: {' '.join(bench_args)}")


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
