"""StableKeypoints' results table, reproduced: fit and test ``conf/paper/base.yaml`` with
``conf/paper/<name>.yaml``, then print this project's numbers beside the published one for every
chosen dataset, under both evaluation protocols.

    python -m benchmarks.paper_table --configs cub_001 celeba_aligned --output outputs/paper_table
    python -m benchmarks.paper_table --configs cub_all --output outputs/paper_table \\
        -- --data.init_args.cmr_cachedir datasets/CUB_200_2011/cachedir/cub

Each config runs the real command line in its own folder ``<output>/<name>/`` (the config's
``trainer.default_root_dir`` and logger ``save_dir`` are pointed there): ``python run.py fit``, then
``python run.py test --ckpt_path <its last.ckpt> --data.init_args.protocol <p>`` for each protocol
of ``--protocols`` (``default``: this project's evaluation; ``stablekeypoints``: StableKeypoints'
exactly, ``data/protocol.py``), with their output in ``fit.log`` and ``test-<p>.log``. Arguments
after ``--`` are passed to every run (weights, dataset roots, step counts).

While a command runs, a line every ``--progress_every_s`` seconds says its progress (steps or test
batches done of total, elapsed, time left: ``benchmarks.monitor``). Each command's wall time and
peak memory (resident memory; GPU memory where ``nvidia-smi`` answers) go to ``<name>/runs.jsonl``;
the table shows each config's total wall time and its peak.

It resumes: a protocol whose test finished (``<name>/result-<p>.json``) is not run again; a fit
that finished (``fit.json``) is not run again; an interrupted fit continues from its newest
``last.ckpt``. A failed run is reported in the table and the others still run. The table is
printed and written to ``<output>/paper_table.md`` and ``<output>/paper_table.csv`` (rewritten
on every call: they hold what the folders hold).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.monitor import duration, run_monitored
from lightning_modules.app import files
from lightning_modules.app.errors import run_for_user

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = REPO / "conf" / "paper"
#: What every paper config shares; given before ``<name>.yaml``, which holds only what differs.
PAPER_BASE = PAPER_CONFIGS / "base.yaml"
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
PROTOCOLS = ("default", "stablekeypoints")
COLUMNS = ("config", "metric", "published", "default", "difference (default)", "stablekeypoints",
           "difference (stablekeypoints)", "better", "wall time", "peak memory", "source", "status")
#: One line per command run for a config (fit, test per protocol): what it cost (``monitor.Measured``).
COSTS_FILE = "runs.jsonl"


def result_file(protocol: str) -> str:
    """The file a config's test under ``protocol`` leaves: its ``metrics.json`` and where it came from."""
    return f"result-{protocol}.json"


@dataclass
class Row:
    """One config's line: its metric, the value under each protocol run (None: not run or failed), whether
    higher is better, what its commands cost in all (wall seconds, peak memory in bytes) and its status."""

    config: str
    metric: str
    values: dict[str, float | None]
    higher_is_better: bool | None
    status: str
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None

    def cells(self) -> dict[str, str]:
        published = PUBLISHED[self.config]
        better = "" if self.higher_is_better is None else ("higher" if self.higher_is_better else "lower")
        cells = {"config": self.config, "metric": self.metric, "published": f"{published.value:.2f}", "better": better,
                 "source": published.source, "status": self.status}
        for protocol in PROTOCOLS:
            value = self.values.get(protocol)
            cells[protocol] = "" if value is None else f"{value:.2f}"
            comparable = value is not None and self.metric == published.metric
            cells[f"difference ({protocol})"] = f"{value - published.value:+.2f}" if comparable else ""
        cells["wall time"] = "" if self.wall_s is None else duration(self.wall_s)
        if self.peak_gpu_bytes:
            cells["peak memory"] = f"GPU {self.peak_gpu_bytes / 2**30:.1f} GiB"
        else:
            cells["peak memory"] = "" if self.peak_rss_bytes is None else f"RAM {self.peak_rss_bytes / 2**30:.1f} GiB"
        return cells


def _write_json(path: Path, content: dict) -> None:
    """Atomically: a reader (or a resumed call) never sees half a file."""
    files.write_text(path, json.dumps(content, indent=2) + "\n")


def _newest(folder: Path, pattern: str, since: float = 0.0) -> Path | None:
    found = [p for p in folder.rglob(pattern) if p.is_file() and p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _say(message: str) -> None:
    print(f"[paper_table] {message}", flush=True)


class ConfigRun:
    """Fits and tests one paper config in ``output/name`` (resuming), recording what each command cost."""

    def __init__(self, name: str, output: Path, extra: list[str], progress_every_s: float) -> None:
        self.name, self.folder, self.progress_every_s = name, output / name, progress_every_s
        files.make_folder(self.folder)
        config = PAPER_CONFIGS / f"{name}.yaml"
        self.common = ["--config", str(PAPER_BASE), "--config", str(config), "--trainer.default_root_dir", str(self.folder),
                       "--trainer.logger.init_args.save_dir", str(self.folder), *extra]
        self.config = config

    def command(self, arguments: list[str], log: str, label: str) -> int:
        """``python run.py <arguments>`` with its output in ``log``, its progress said, its cost appended to ``runs.jsonl``."""
        measured = run_monitored([sys.executable, str(REPO / "run.py"), *arguments], self.folder / log, REPO, _say,
                                 f"{self.name} {label}", self.progress_every_s)
        with (self.folder / COSTS_FILE).open("a") as costs:
            costs.write(json.dumps({"command": label, **measured.as_dict()}) + "\n")
        return measured.returncode

    def costs(self) -> tuple[float | None, int | None, int | None]:
        """Total wall seconds, peak RAM and peak GPU bytes over every command run for this config."""
        path = self.folder / COSTS_FILE
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        if not lines:
            return None, None, None
        gpu = [line["peak_gpu_bytes"] for line in lines if line["peak_gpu_bytes"] is not None]
        return sum(line["wall_s"] for line in lines), max(line["peak_rss_bytes"] for line in lines), max(gpu) if gpu else None

    def fit(self) -> tuple[Path | None, str]:
        """-> (the fitted checkpoint, "") or (None, why not)."""
        fit_file = self.folder / FIT_FILE
        if fit_file.is_file():
            return Path(json.loads(fit_file.read_text())["checkpoint"]), ""
        interrupted = _newest(self.folder, "last*.ckpt")
        resume = ["--ckpt_path", str(interrupted)] if interrupted else []
        if self.command(["fit", *self.common, *resume], "fit.log", "fit") != 0:
            return None, f"fit failed: see {self.folder / 'fit.log'}"
        checkpoint = _newest(self.folder, "last*.ckpt")
        if checkpoint is None:
            return None, f"fit wrote no last.ckpt under {self.folder}"
        _write_json(fit_file, {"checkpoint": str(checkpoint)})
        return checkpoint, ""

    def test(self, checkpoint: Path, protocol: str) -> tuple[dict | None, str]:
        """-> (this protocol's result, "") or (None, why not); a result of an earlier call is reused."""
        path = self.folder / result_file(protocol)
        if path.is_file():
            return json.loads(path.read_text()), ""
        started = time.time()
        log = f"test-{protocol}.log"
        arguments = ["test", *self.common, "--data.init_args.protocol", protocol, "--ckpt_path", str(checkpoint)]
        if self.command(arguments, log, f"test ({protocol})") != 0:
            return None, f"test ({protocol}) failed: see {self.folder / log}"
        metrics_file = _newest(self.folder, "metrics.json", since=started)
        if metrics_file is None:
            return None, f"test ({protocol}) wrote no metrics.json under {self.folder}"
        result = {**json.loads(metrics_file.read_text()), "config": str(self.config), "checkpoint": str(checkpoint),
                  "metrics_file": str(metrics_file)}
        _write_json(path, result)
        return result, ""

    def run(self, protocols: tuple[str, ...]) -> Row:
        expected = PUBLISHED[self.name].metric
        ran_before = {p for p in protocols if (self.folder / result_file(p)).is_file()}
        checkpoint, why = (None, "") if len(ran_before) == len(protocols) else self.fit()
        values: dict[str, float | None] = {}
        metric, higher, problems = expected, None, [why] if why else []
        for protocol in protocols:
            if protocol not in ran_before and checkpoint is None:
                continue
            result, why = self.test(checkpoint, protocol)
            if result is None:
                problems.append(why)
                continue
            values[protocol], metric, higher = result["value"], result["metric"], result["higher_is_better"]
        status = "; ".join(problems) or ("done (earlier run)" if len(ran_before) == len(protocols) else "done")
        return Row(self.name, metric, values, higher, status, *self.costs())


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
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                        help="the evaluation protocols to test each fit with (data.protocol; default: both)")
    parser.add_argument("--progress_every_s", type=float, default=60.0, help="seconds between progress lines")
    args = parser.parse_args(own)
    unknown = [name for name in args.configs if name not in PUBLISHED]
    if unknown:
        parser.error(f"no published number for {unknown}: choose among {', '.join(PUBLISHED)}.")
    files.make_folder(args.output)
    rows = []
    for name in args.configs:
        _say(f"{name}: running (logs in {args.output / name})")
        rows.append(ConfigRun(name, args.output, extra, args.progress_every_s).run(tuple(args.protocols)))
        row = rows[-1]
        cost = f" in {duration(row.wall_s)}, peak {row.cells()['peak memory']}" if row.wall_s is not None else ""
        _say(f"{name}: {row.status}{cost}")
    table = markdown(rows)
    files.write_text(args.output / "paper_table.md", table)
    files.write_text(args.output / "paper_table.csv", csv_text(rows))
    print(table, end="")
    print(f"written to {args.output / 'paper_table.md'} and {args.output / 'paper_table.csv'}")
    return 0 if all(len(row.values) == len(args.protocols) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
