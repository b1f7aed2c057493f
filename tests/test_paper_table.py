"""benchmarks/paper_table.py: the paper's table from fit + test of conf/paper configs, resumable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import paper_table
from benchmarks.paper_table import PUBLISHED, Row


def test_table_puts_both_protocols_beside_the_published_number_with_time_and_memory() -> None:
    rows = [
        Row("cub_aligned", "normalized_keypoint_error", {"default": 6.125, "stablekeypoints": 5.5}, False, "done",
            wall_s=3725.2, peak_rss_bytes=3 * 2**30, peak_gpu_bytes=int(12.34 * 2**30)),
        Row("deepfashion", "percentage_correct_keypoints", {}, None, "fit failed: see x/fit.log",
            wall_s=61.0, peak_rss_bytes=int(1.5 * 2**30)),
    ]
    assert paper_table.markdown(rows).splitlines() == [
        "| config | metric | published | default | difference (default) | stablekeypoints | difference (stablekeypoints) "
        "| better | wall time | peak memory | source | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| cub_aligned | normalized_keypoint_error | 5.06 | 6.12 | +1.07 | 5.50 | +0.44 | lower | 1:02:05 | GPU 12.3 GiB "
        "| secondary source (docs/method.md section 7) | done |",
        "| deepfashion | percentage_correct_keypoints | 70.00 |  |  |  |  |  | 0:01:01 | RAM 1.5 GiB "
        "| paperswithcode (from the paper) | fit failed: see x/fit.log |",
    ]
    assert paper_table.csv_text(rows).splitlines()[:2] == [
        "config,metric,published,default,difference (default),stablekeypoints,difference (stablekeypoints),better,"
        "wall time,peak memory,source,status",
        "cub_aligned,normalized_keypoint_error,5.06,6.12,+1.07,5.50,+0.44,lower,1:02:05,GPU 12.3 GiB,"
        "secondary source (docs/method.md section 7),done",
    ]


def test_progress_is_read_from_the_last_bar_in_the_log(tmp_path: Path) -> None:
    from benchmarks.monitor import last_progress, progress_line

    log = tmp_path / "fit.log"
    log.write_text("Steps:   0%|          | 0/40 [00:00<?, ?step/s]\rSteps:  45%|████▌     | 18/40 [00:09<00:11]")
    assert last_progress(log) == ("Steps", 18, 40)
    log.write_text("Regression split (fitting the regressor): 100%|██████████| 30/30 [02:11<00:00]\n"
                   "Test split (scored):  25%|██▌       | 4/16 [00:16<00:49]")
    assert last_progress(log) == ("Test split (scored)", 4, 16)
    assert progress_line("Steps", 1200, 10000, 723.0, 1200 / 723.0) == "Steps 1200/10000, 0:12:03 elapsed, about 1:28:22 left"
    assert progress_line("Steps", 0, 40, 5.0, None) == "Steps 0/40, 0:00:05 elapsed"


def test_every_paper_config_has_a_published_number_and_metric() -> None:
    assert sorted(PUBLISHED) == sorted(p.stem for p in paper_table.PAPER_CONFIGS.glob("*.yaml") if p != paper_table.PAPER_BASE)
    assert {p.metric for p in PUBLISHED.values()} == {
        "normalized_keypoint_error", "inter_ocular_error", "summed_keypoint_error",
        "percentage_correct_keypoints", "orientation_invariant_error",
    }  # fmt: skip


def test_unknown_config_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        paper_table.main(["--configs", "cub_004", "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "cub_004" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_paper_table_fits_tests_both_protocols_and_resumes_end_to_end(tiny_sd_path: Path, cub_root: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "table"
    tiny = [
        "--", "--model.backbone.init_args.pretrained_model_name_or_path", str(tiny_sd_path),
        "--model.num_tokens", "40", "--model.feature_upsample_res", "16", "--model.top_k", "4",
        "--model.furthest_point_num_samples", "8", "--model.sigma_px", "1.0", "--model.num_indices", "4",
        "--model.augmentation_iterations", "2", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
        "--trainer.logger", "false",  # W&B start-up would double the time; the table does not read the logger
        "--data.init_args.root", str(cub_root), "--data.init_args.download", "false",
        "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
    ]  # fmt: skip
    command = ["--configs", "cub_001", "--output", str(out), "--progress_every_s", "0.5", *tiny]
    assert paper_table.main(command) == 0
    said = capsys.readouterr().out
    assert re.search(r"\[paper_table\] cub_001 fit: Steps \d/2, 0:00:\d\d elapsed", said)
    assert re.search(r"\[paper_table\] cub_001 test \(stablekeypoints\): (Regression split \(fitting the regressor\)|Test split \(scored\)) \d+/\d+", said)
    assert re.search(r"\[paper_table\] cub_001: done in 0:\d\d:\d\d, peak (RAM|GPU) \d+\.\d GiB", said)
    folder = out / "cub_001"
    results = {p: json.loads((folder / f"result-{p}.json").read_text()) for p in ("default", "stablekeypoints")}
    for protocol, result in results.items():
        assert result["metric"] == "normalized_keypoint_error" and result["protocol"] == protocol
        assert result["num_regression_images"] == 8 and result["num_test_images"] == 4
        assert Path(result["checkpoint"]).is_file() and Path(result["checkpoint"]).is_relative_to(folder)
    costs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert [c["command"] for c in costs] == ["fit", "test (default)", "test (stablekeypoints)"]
    assert all(c["returncode"] == 0 and c["wall_s"] > 0 and c["peak_rss_bytes"] > 100 * 2**20 for c in costs)
    line = (out / "paper_table.md").read_text().splitlines()[2]
    assert line.startswith(f"| cub_001 | normalized_keypoint_error | 10.50 | {results['default']['value']:.2f} | ")
    assert f" | {results['stablekeypoints']['value']:.2f} | " in line
    assert (out / "paper_table.csv").read_text().splitlines()[1].startswith("cub_001,normalized_keypoint_error,10.50,")

    # Finished configs are not run again.
    logs = {p: p.stat().st_mtime for p in out.rglob("*.log")}
    assert paper_table.main(command) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("*.log")} == logs
    assert "done (earlier run)" in (out / "paper_table.md").read_text()

    # An interrupted config continues from its last.ckpt instead of starting over.
    checkpoint = Path(results["default"]["checkpoint"])
    (folder / "result-default.json").unlink()
    (folder / "fit.json").unlink()
    assert paper_table.main([*command[:4], "--protocols", "default", *command[4:]]) == 0
    assert f"Restoring states from the checkpoint path at {checkpoint}" in (folder / "fit.log").read_text()
    rerun = json.loads((folder / "result-default.json").read_text())
    assert rerun["checkpoint"] == str(checkpoint) and rerun["keypoint_tokens"] == results["default"]["keypoint_tokens"]
