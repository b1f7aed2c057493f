"""benchmarks/gpu_check.sh: its --dry-run (CPU, tiny models) runs every part and prints the one table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_check(*args: str, tmp_path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_the_gpu_tests_and_both_benchmarks_and_prints_one_table(tmp_path):
    result = run_check("--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| part | item | value | target | verdict |"
    tests = {line.split(" | ")[1]: line.split(" | ")[-1] for line in table if line.startswith("| test |")}
    assert {"test_fit_test_and_predict_keep_every_tensor_and_generator_on_the_device",
            "test_channels_last_unet_gives_the_same_maps", "test_bf16_backbone_keeps_context_maps_and_loss_in_fp32",
            "test_ddp_on_one_device_uses_nccl_and_syncs_only_the_context"} <= set(tests)
    assert set(tests.values()) == {"passed |"}
    benches = [line for line in table if line.startswith("| bench |")]
    for label, modes in (("SD 1.5 b4 512 px", ("optimized", "naive", "bf16")), ("SDXL b4 1024 px", ("optimized", "bf16"))):
        for mode in modes:
            rows = [line for line in benches if label in line and f" {mode} |" in line]
            assert [row.split(" | ")[2].split(" ", 1)[1] for row in rows] == [
                "s/step", "GiB peak (training)", "images/s extraction"]
    step = next(line for line in benches if "SD 1.5" in line and "optimized |" in line and "s/step" in line)
    assert "<= 0.3" in step and "n/a (dry run, tiny model)" in step
    for name in ("gpu_tests.xml", "bench_sd15.json", "bench_sdxl.json"):
        assert (tmp_path / name).is_file()


def test_without_dry_run_it_needs_the_carried_wheels(tmp_path):
    result = run_check(tmp_path=tmp_path, timeout=60)
    if (REPO / ".whl").is_dir():
        pytest.skip("a .whl folder is present here")
    assert result.returncode == 2
    assert "No wheels in .whl/" in result.stderr and "benchmarks/gpu_wheels.sh" in result.stderr


def test_report_fails_when_a_test_failed_or_a_benchmark_did_not_finish(tmp_path):
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase name="test_a" time="1.0"/>'
        '<testcase name="test_b" time="2.0"><failure message="x"/></testcase></testsuite></testsuites>')
    (tmp_path / "bench_sd15.log").write_text("Traceback: CUDA out of memory\n")
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "| test | test_a | 1.0 s | - | passed |" in result.stdout
    assert "| test | test_b | 2.0 s | - | FAILED |" in result.stdout
    assert "| bench | SD 1.5 b4 512 px | - | - | FAILED: did not finish, see bench_sd15.log |" in result.stdout
    assert "CUDA out of memory" in result.stdout


def test_report_checks_the_targets_on_a_real_run(tmp_path):
    import json

    (tmp_path / "gpu_tests.xml").write_text('<testsuites><testsuite><testcase name="t" time="0"/></testsuite></testsuites>')
    row = {"step_s": 0.25, "train_peak_gib": 20.0, "extract_img_per_s": 8.0}
    args = {"model": "sd15", "batch_size": 4, "image_size": 512, "device": "cuda"}
    (tmp_path / "bench_sd15.json").write_text(json.dumps(
        {"args": args, "rows": [{"mode": m, **row} for m in ("optimized", "naive", "bf16")]}))
    (tmp_path / "bench_sdxl.json").write_text(json.dumps(
        {"args": args, "rows": [{"mode": m, **row} for m in ("optimized", "bf16")]}))
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "| bench | SD 1.5 b4 512 px optimized | 0.250 s/step | <= 0.3 | met |" in result.stdout
    assert "| bench | SD 1.5 b4 512 px optimized | 8.000 images/s extraction | >= 10 | MISSED |" in result.stdout
    assert "| bench | SDXL b4 1024 px bf16 | 0.250 s/step | - | measured |" in result.stdout
