"""StableKeypoints' results table, reproduced: fit and test ``conf/paper/base.yaml`` with
``conf/paper/<name>.yaml``, then print this project's number beside the published one for every
chosen dataset.

    python -m benchmarks.paper_table --configs cub_001 celeba_aligned --output outputs/paper_table
    python -m benchmarks.paper_table --configs cub_all --output outputs/paper_table \\
        -- --data.init_args.cmr_cachedir datasets/CUB_200_2011/cachedir/cub

Each config runs the real command line in its own folder ``<output>/<name>/`` (the config's
``trainer.default_root_dir`` and logger ``save_dir`` are pointed there): ``python run.py fit``, then
``python run.py test --ckpt_path <its last.ckpt>``, with their output in ``fit.log`` and
``test.log``. Arguments after ``--`` are passed to every run (weights, dataset roots, step counts).

It resumes: a config whose test finished (``<output>/<name>/result.json``) is not run again; one
whose fit finished (``fit.json``) goes straight to test; an interrupted fit continues from its
newest ``last.ckpt``. A failed run is reported in the table and the others still run. The table is
printed and written to ``<output>/paper_table.md`` and ``<output>/paper_table.csv`` (rewritten
on every call: they hold what the folders hold).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lightning_modules.app import files
from lightning_modules.app.errors import run_for_user

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = REPO / "conf" / "paper"
#: What every paper config shares; given before ``<name>.yaml``, which holds only what differs.
PAPER_BASE = PAPER_CONFIGS / "base.yaml"
RESULT_FILE = "result.json"
FIT_FILE = "fit.json"


@dataclass(frozen=True)
class Published:
    """A number of StableKeypoints' paper: the metric (``test/<metric>``), its value and where it is quoted."""

    metric: str
    value: float
    source: str


_SECONDARY = "secondary source (docs/method.md section 7)"
_PWC = "paperswithcode (from the paper)"
PUBLISHED: dict[str, Published] = {
    "cub_aligned": Published("normalized_keypoint_error", 5.06, _SECONDARY),
    "cub_all": Published("normalized_keypoint_error", 5.4, _SECONDARY),
    "cub_001": Published("normalized_keypoint_error", 10.5, f"{_SECONDARY}, approximate"),
    "cub_002": Published("normalized_keypoint_error", 10.5, f"{_SECONDARY}, approximate"),
    "cub_003": Published("normalized_keypoint_error", 10.5, f"{_SECONDARY}, approximate"),
    "celeba_aligned": Published("inter_ocular_error", 3.60, f"{_SECONDARY}, K = 10"),
    "celeba_wild": Published("inter_ocular_error", 4.35, f"{_SECONDARY}, K = 8"),
    "taichi": Published("summed_keypoint_error", 234.89, _PWC),
    "deepfashion": Published("percentage_correct_keypoints", 70.0, _PWC),
    "human36m": Published("orientation_invariant_error", 4.45, _PWC),
}
COLUMNS = ("config", "metric", "this project", "published", "difference", "better", "source", "status")


@dataclass
class Row:
    config: str
    metric: str
    value: float | None
    higher_is_better: bool | None
    status: str

    def cells(self) -> dict[str, str]:
        published = PUBLISHED[self.config]
        have = self.value is not None
        better = "" if self.higher_is_better is None else ("higher" if self.higher_is_better else "lower")
        return {
            "config": self.config,
            "metric": self.metric,
            "this project": f"{self.value:.2f}" if have else "",
            "published": f"{published.value:.2f}",
            "difference": f"{self.value - published.value:+.2f}" if have and self.metric == published.metric else "",
            "better": better,
            "source": published.source,
            "status": self.status,
        }


def _write_json(path: Path, content: dict) -> None:
    """Atomically: a reader (or a resumed call) never sees half a file."""
    files.write_text(path, json.dumps(content, indent=2) + "\n")


def _newest(folder: Path, pattern: str, since: float = 0.0) -> Path | None:
    found = [p for p in folder.rglob(pattern) if p.is_file() and p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_cli(arguments: list[str], log: Path) -> int:
    """``python run.py <arguments>`` in the repository, output to ``log``; -> its exit status."""
    with log.open("w") as out:
        return subprocess.run([sys.executable, str(REPO / "run.py"), *arguments], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, check=False).returncode


def run_config(name: str, config: Path, output: Path, extra: list[str]) -> Row:
    """Fit and test one paper config in ``output/name`` (resuming), -> its table row."""
    folder = output / name
    files.make_folder(folder)
    expected = PUBLISHED[name].metric
    result_file = folder / RESULT_FILE
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        return Row(name, result["metric"], result["value"], result["higher_is_better"], "done (earlier run)")
    common = ["--config", str(PAPER_BASE), "--config", str(config), "--trainer.default_root_dir", str(folder),
              "--trainer.logger.init_args.save_dir", str(folder), *extra]
    fit_file = folder / FIT_FILE
    if fit_file.is_file():
        checkpoint = Path(json.loads(fit_file.read_text())["checkpoint"])
    else:
        interrupted = _newest(folder, "last*.ckpt")
        resume = ["--ckpt_path", str(interrupted)] if interrupted else []
        if run_cli(["fit", *common, *resume], folder / "fit.log") != 0:
            return Row(name, expected, None, None, f"fit failed: see {folder / 'fit.log'}")
        checkpoint = _newest(folder, "last*.ckpt")
        if checkpoint is None:
            return Row(name, expected, None, None, f"fit wrote no last.ckpt under {folder}")
        _write_json(fit_file, {"checkpoint": str(checkpoint)})
    started = time.time()
    if run_cli(["test", *common, "--ckpt_path", str(checkpoint)], folder / "test.log") != 0:
        return Row(name, expected, None, None, f"test failed: see {folder / 'test.log'}")
    metrics_file = _newest(folder, "metrics.json", since=started)
    if metrics_file is None:
        return Row(name, expected, None, None, f"test wrote no metrics.json under {folder}")
    metrics = json.loads(metrics_file.read_text())
    _write_json(result_file, {**metrics, "config": str(config), "checkpoint": str(checkpoint), "metrics_file": str(metrics_file)})
    return Row(name, metrics["metric"], metrics["value"], metrics["higher_is_better"], "done")


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()[column] for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(row.cells() for row in rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 when a config has no number; a mistake is one ``error:``
    line and exit status 2, ``lightning_modules.app.errors.run_for_user``)."""
    return run_for_user(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help=f"conf/paper/<name>.yaml, each on top of base.yaml: {', '.join(PUBLISHED)}")
    parser.add_argument("--output", required=True, type=Path, help="folder of the runs and the table")
    args = parser.parse_args(own)
    unknown = [name for name in args.configs if name not in PUBLISHED]
    if unknown:
        parser.error(f"no published number for {unknown}: choose among {', '.join(PUBLISHED)}.")
    files.make_folder(args.output)
    rows = []
    for name in args.configs:
        print(f"[paper_table] {name}: running (logs in {args.output / name})", flush=True)
        rows.append(run_config(name, PAPER_CONFIGS / f"{name}.yaml", args.output, extra))
        print(f"[paper_table] {name}: {rows[-1].status}", flush=True)
    table = markdown(rows)
    files.write_text(args.output / "paper_table.md", table)
    files.write_text(args.output / "paper_table.csv", csv_text(rows))
    print(table, end="")
    print(f"written to {args.output / 'paper_table.md'} and {args.output / 'paper_table.csv'}")
    return 0 if all(row.value is not None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
