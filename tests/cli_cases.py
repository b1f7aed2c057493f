"""Runs many command lines of the project's entry points as a user would, importing them once.

``python tests/cli_cases.py <cases.json> <results.json>``: each case runs in its own forked child of
this process (its own process, environment, folder and file descriptors, as ``python run.py ...``
would: ``sys.argv`` set, the entry point's ``__main__`` function called, an uncaught exception
printed with its traceback and exit status 1), with stdout and stderr in one file. Importing torch,
Lightning and diffusers once instead of once per case is what keeps dozens of cases in seconds.

A case: ``{"entry": "run.py" | "detector" | "cub_preprocess" | "paper_table", "args": [...],
"output": <file>, "cwd": <folder>, "env": {...}, "fault": null | "enospc_png" | "erofs:<folder>"}``.
Faults stand in for a disk a test cannot make: ``enospc_png`` makes every PNG write fail as a full
disk does, ``erofs:<folder>`` makes creating anything under ``<folder>`` fail as a read-only disk does.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback


def _apply_fault(fault: str | None) -> None:
    if fault == "enospc_png":
        from PIL import Image

        def full_disk(self, fp, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        Image.Image.save = full_disk
    elif fault and fault.startswith("erofs:"):
        folder, make = fault[len("erofs:"):], os.mkdir

        def read_only(path, *args, **kwargs):
            if os.fspath(path).startswith(folder):
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
            return make(path, *args, **kwargs)

        os.mkdir = read_only


def _entries() -> dict:
    import run
    from benchmarks import paper_table
    from data import cub_preprocess
    from lightning_modules import detector

    return {"run.py": run.run, "detector": detector.main, "cub_preprocess": cub_preprocess.main,
            "paper_table": paper_table.main}


def _child(case: dict, entry) -> int:
    descriptor = os.open(case["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.environ.update(case.get("env", {}))
    os.chdir(case.get("cwd", os.getcwd()))
    sys.argv = [case["entry"], *case["args"]]
    _apply_fault(case.get("fault"))
    try:
        result = entry()
        code = result if isinstance(result, int) else 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as Python does with an uncaught exception: its traceback, status 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main(cases_file: str, results_file: str) -> None:
    with open(cases_file) as file:
        cases = json.load(file)
    entries = _entries()
    results = {}
    for name, case in cases.items():
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(_child(case, entries[case["entry"]]))
        _, status = os.waitpid(pid, 0)
        results[name] = os.waitstatus_to_exitcode(status)
    with open(results_file, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
