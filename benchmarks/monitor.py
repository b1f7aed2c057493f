"""One command line run to its end with what a long benchmark needs: progress, wall time, peak memory.

``run_monitored`` starts the command with its output in a log file, and while it runs prints, every
``progress_every_s`` seconds, the progress its progress bar last wrote to that log (``Steps``, or the
test stage's ``Regression split`` / ``Test split`` bars: done of total, elapsed, time left). It
measures the command's wall time, its peak resident memory (``wait4``'s ``ru_maxrss``: the process
and the children it waited for) and, where ``nvidia-smi`` answers, the peak GPU memory its processes
held (sampled every ``sample_every_s`` seconds, so a shorter peak can be missed).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

#: The bars of ``callbacks.progress.StepProgressBar`` as they appear in a log: ``<name>: 45%|...| 18/40 [``.
BAR = re.compile(r"(Steps|Regression split \(fitting the regressor\)|Test split \(scored\)):\s+\d+%\|[^|\n\r]*\|\s*(\d+)/(\d+)")


@dataclass
class Measured:
    """What one command cost: ``returncode``, ``wall_s``, ``peak_rss_bytes``, ``peak_gpu_bytes`` (None: no GPU seen)."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def duration(seconds: float) -> str:
    """``3725.2`` -> ``1:02:05``."""
    return str(datetime.timedelta(seconds=int(round(seconds))))


def last_progress(log: Path) -> tuple[str, int, int] | None:
    """(bar name, done, total) of the last progress bar state written to ``log``; None before any."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 8192))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    found = BAR.findall(tail)
    return (found[-1][0], int(found[-1][1]), int(found[-1][2])) if found else None


def progress_line(name: str, done: int, total: int, elapsed_s: float, rate_per_s: float | None) -> str:
    """``Steps 1200/10000, 0:12:03 elapsed, about 1:28:10 left`` (no estimate before a rate is known)."""
    left = f", about {duration((total - done) / rate_per_s)} left" if rate_per_s else ""
    return f"{name} {done}/{total}, {duration(elapsed_s)} elapsed{left}"


def _descendants(pid: int) -> set[int]:
    """``pid`` and the processes under it (Linux ``/proc``; just ``pid`` elsewhere)."""
    found, todo = {pid}, [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def gpu_bytes(pids: set[int]) -> int | None:
    """GPU memory ``nvidia-smi`` reports for ``pids`` together; None without nvidia-smi or an answer."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0
    for line in out.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[0]) in pids:
            used += int(fields[1]) * 2**20  # MiB
    return used


def run_monitored(
    command: list[str],
    log: Path,
    cwd: Path,
    say: Callable[[str], None],
    label: str,
    progress_every_s: float = 60.0,
    sample_every_s: float = 2.0,
) -> Measured:
    """Runs ``command`` (output to ``log``) to its end, saying ``<label>: <progress>`` every ``progress_every_s``."""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    gpu_seen = gpu_bytes({process.pid})
    peak_gpu = gpu_seen
    next_report = started + progress_every_s
    first: tuple[str, int, float] | None = None  # (bar, done, when) first seen: the rate excludes a resume's start
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(min(sample_every_s, progress_every_s))
        if peak_gpu is not None:
            now_gpu = gpu_bytes(_descendants(process.pid))
            peak_gpu = max(peak_gpu, now_gpu or 0)
        now = time.monotonic()
        seen = last_progress(log)
        if seen is not None and (first is None or first[0] != seen[0] or seen[1] < first[1]):
            first = (seen[0], seen[1], now)
        if now >= next_report and seen is not None:
            rate = (seen[1] - first[1]) / (now - first[2]) if first and now > first[2] and seen[1] > first[1] else None
            say(f"{label}: {progress_line(seen[0], seen[1], seen[2], now - started, rate)}")
            next_report = now + progress_every_s
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return Measured(process.returncode, time.monotonic() - started, usage.ru_maxrss * 1024, peak_gpu)
