"""benchmarks/paper_table.py: the paper's table from fit + test of conf/paper configs, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import paper_table
from benchmarks.paper_table import PUBLISHED, Row


def test_table_puts_this_project_beside_the_published_number() -> None:
    rows = [
        Row("cub_aligned", "normalized_keypoint_error", 6.125, False, "done"),
        Row("deepfashion", "percentage_correct_keypoints", None, None, "fit failed: see x/fit.log"),
    ]
    assert paper_table.markdown(rows).splitlines() == [
        "| config | metric | this project | published | difference | better | source | status |",
        "|---|---|---|---|---|---|---|---|",
        "| cub_aligned | normalized_keypoint_error | 6.12 | 5.06 | +1.07 | lower | secondary source (docs/method.md section 7) | done |",
        "| deepfashion | percentage_correct_keypoints |  | 70.00 |  |  | paperswithcode (from the paper) | fit failed: see x/fit.log |",
    ]
    assert paper_table.csv_text(rows).splitlines()[:2] == [
        "config,metric,this project,published,difference,better,source,status",
        "cub_aligned,normalized_keypoint_error,6.12,5.06,+1.07,lower,secondary source (docs/method.md section 7),done",
    ]


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
def test_paper_table_fits_tests_and_resumes_end_to_end(tiny_sd_path: Path, cub_root: Path, tmp_path: Path) -> None:
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
    command = ["--configs", "cub_001", "cub_aligned", "--output", str(out), *tiny]
    assert paper_table.main(command) == 0
    results = {name: json.loads((out / name / "result.json").read_text()) for name in ("cub_001", "cub_aligned")}
    for name, result in results.items():
        assert result["metric"] == "normalized_keypoint_error" and result["num_regression_images"] == {"cub_001": 8, "cub_aligned": 24}[name]
        assert Path(result["checkpoint"]).is_file() and Path(result["checkpoint"]).is_relative_to(out / name)
    lines = (out / "paper_table.md").read_text().splitlines()
    assert lines[2].startswith(f"| cub_001 | normalized_keypoint_error | {results['cub_001']['value']:.2f} | 10.50 |")
    assert lines[3].startswith(f"| cub_aligned | normalized_keypoint_error | {results['cub_aligned']['value']:.2f} | 5.06 |")
    assert (out / "paper_table.csv").read_text().splitlines()[1].startswith("cub_001,normalized_keypoint_error,")

    # Finished configs are not run again.
    logs = {p: p.stat().st_mtime for p in out.rglob("*.log")}
    assert paper_table.main(command) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("*.log")} == logs
    assert "done (earlier run)" in (out / "paper_table.md").read_text()

    # An interrupted config continues from its last.ckpt instead of starting over.
    checkpoint = Path(results["cub_001"]["checkpoint"])
    (out / "cub_001" / "result.json").unlink()
    (out / "cub_001" / "fit.json").unlink()
    assert paper_table.main(command) == 0
    assert f"Restoring states from the checkpoint path at {checkpoint}" in (out / "cub_001" / "fit.log").read_text()
    rerun = json.loads((out / "cub_001" / "result.json").read_text())
    assert rerun["checkpoint"] == str(checkpoint) and rerun["keypoint_tokens"] == results["cub_001"]["keypoint_tokens"]
