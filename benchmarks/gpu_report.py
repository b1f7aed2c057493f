"""The one table of ``benchmarks/gpu_check.sh``: GPU-marked tests, then the benchmark rows against the targets.

    python -m benchmarks.gpu_report <folder of gpu_tests.xml, bench_sd15.json, bench_sdxl.json> [--dry-run]

Exit status 1 when a test failed or a benchmark did not finish (a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: (benchmark file, label, modes) in the order gpu_check.sh runs them.
BENCHES = (("bench_sd15", "SD 1.5 b4 512 px", ("optimized", "naive", "bf16")),
           ("bench_sdxl", "SDXL b4 1024 px", ("optimized", "bf16")))
#: Targets for SD 1.5 batch 4 at 512 px, optimized mode.
STEP_TARGET_S = 0.3
EXTRACTION_TARGET_IMG_S = 10.0


def test_rows(junit: Path) -> tuple[list[list[str]], bool]:
    """-> table rows (one per test) and whether every test passed or was skipped."""
    if not junit.is_file():
        return [["tests", "(none ran)", "-", "-", "FAILED: no report, see gpu_tests.log"]], False
    rows, ok = [], True
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            verdict, ok = "FAILED", False
        elif case.find("skipped") is not None:
            verdict = "skipped"
        else:
            verdict = "passed"
        rows.append(["test", name, f"{float(case.get('time', 0)):.1f} s", "-", verdict])
    return rows or [["tests", "(none collected)", "-", "-", "FAILED"]], ok and bool(rows)


def bench_rows(folder: Path, dry_run: bool) -> tuple[list[list[str]], bool]:
    rows, ok = [], True
    for stem, label, modes in BENCHES:
        path = folder / f"{stem}.json"
        if not path.is_file():
            rows.append(["bench", label, "-", "-", f"FAILED: did not finish, see {stem}.log"])
            ok = False
            continue
        result = json.loads(path.read_text())
        run = result["args"]
        if dry_run:  # say what really ran
            label = f"{label} (ran: {run['model']}, b{run['batch_size']}, {run['image_size']} px, {run['device']})"
        by_mode = {row["mode"]: row for row in result["rows"]}
        for mode in modes:
            row = by_mode.get(mode)
            if row is None:
                rows.append(["bench", f"{label} {mode}", "-", "-", "FAILED: no row"])
                ok = False
                continue
            targeted = stem == "bench_sd15" and mode == "optimized"
            for key, unit, target, good in (
                ("step_s", "s/step", STEP_TARGET_S, lambda v: v <= STEP_TARGET_S),
                ("train_peak_gib", "GiB peak (training)", None, None),
                ("extract_img_per_s", "images/s extraction", EXTRACTION_TARGET_IMG_S, lambda v: v >= EXTRACTION_TARGET_IMG_S),
            ):
                value = row[key]
                if not targeted or target is None:
                    verdict, target_text = "measured", "-"
                else:
                    target_text = f"{'<=' if key == 'step_s' else '>='} {target:g}"
                    verdict = "n/a (dry run, tiny model)" if dry_run else ("met" if good(value) else "MISSED")
                rows.append(["bench", f"{label} {mode}", f"{value:.3f} {unit}", target_text, verdict])
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="the benchmarks ran tiny models on the CPU")
    args = parser.parse_args()
    tests, tests_ok = test_rows(args.folder / "gpu_tests.xml")
    benches, benches_ok = bench_rows(args.folder, args.dry_run)
    print(f"\nGPU check{' (DRY RUN: CPU, tiny models)' if args.dry_run else ''}")
    print("| part | item | value | target | verdict |")
    print("|---|---|---|---|---|")
    for row in tests + benches:
        print("| " + " | ".join(row) + " |")
    for stem in ("gpu_tests", *(stem for stem, _, _ in BENCHES)):
        log = args.folder / f"{stem}.log"
        failed = any(stem in row[-1] for row in tests + benches) or (stem == "gpu_tests" and not tests_ok)
        if failed and log.is_file():
            print(f"\n--- last lines of {log}")
            print("\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return 0 if tests_ok and benches_ok else 1


if __name__ == "__main__":
    sys.exit(main())
