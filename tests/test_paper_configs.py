"""conf/paper/: StableKeypoints' published settings (base.yaml + one file per benchmark), each parsed by the
real CLI for fit and test."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO

PAPER = REPO / "conf" / "paper"
BASE = PAPER / "base.yaml"

# name: (DataModule, dataset variant, K, max_steps); the rest is shared (SK main.py's defaults, in base.yaml).
EXPECTED = {
    "cub_aligned": ("data.cub.CUBDataModule", "cub_aligned", 10, 10000),
    "cub_all": ("data.cub.CUBDataModule", "cub_all", 10, 10000),
    "cub_001": ("data.cub.CUBDataModule", "cub_001", 10, 10000),
    "cub_002": ("data.cub.CUBDataModule", "cub_002", 10, 10000),
    "cub_003": ("data.cub.CUBDataModule", "cub_003", 10, 10000),
    "celeba_aligned": ("data.celeba.CelebADataModule", "aligned", 10, 500),
    "celeba_wild": ("data.celeba.CelebADataModule", "wild", 8, 500),
    "taichi": ("data.taichi.TaiChiDataModule", None, 10, 500),
    "deepfashion": ("data.deepfashion.DeepFashionDataModule", None, 10, 500),
    "human36m": ("data.human36m.Human36MDataModule", None, 10, 500),
}


def test_every_paper_config_is_listed() -> None:
    assert sorted(p.stem for p in PAPER.glob("*.yaml") if p != BASE) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_config_parses_for_fit_and_test_with_sk_settings(name: str, capsys: pytest.CaptureFixture) -> None:
    from run import main

    data_class, variant, top_k, max_steps = EXPECTED[name]
    for subcommand in ("fit", "test"):
        with pytest.raises(SystemExit) as exit_:
            main([subcommand, "--config", str(BASE), "--config", str(PAPER / f"{name}.yaml"), "--print_config"])
        assert exit_.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        model, data = config["model"], config["data"]
        assert data["class_path"] == data_class
        if variant is not None:
            assert data["init_args"].get("subset", data["init_args"].get("variant")) == variant
        assert (model["top_k"], config["trainer"]["max_steps"]) == (top_k, max_steps)
        # SK main.py's defaults, shared by every dataset.
        assert (model["num_tokens"], model["feature_upsample_res"], model["furthest_point_num_samples"]) == (500, 128, 25)
        assert (model["sigma_px"], model["num_indices"], model["augmentation_iterations"]) == (2.0, 100, 10)
        assert (model["fps_maps"], model["selection"], model["equivariance_mask"]) == ("transformed", "gaussian", False)
        assert (data["init_args"]["image_size"], data["init_args"]["batch_size"]) == (512, 4)
        assert model["optimizer"]["init_args"]["lr"] == 0.005
        assert config["trainer"]["default_root_dir"] == f"outputs/paper/{name}"
    text = (PAPER / f"{name}.yaml").read_text()
    assert "SK main.py" in text and "Published:" in text  # each setting cites its source
    assert "SK main.py" in BASE.read_text()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_benchmark_file_holds_only_what_differs_from_the_base(name: str) -> None:
    config = yaml.safe_load((PAPER / f"{name}.yaml").read_text())
    assert set(config) <= {"trainer", "model", "data"}
    assert set(config.get("model", {})) <= {"top_k"}
    assert set(config["trainer"]) <= {"max_steps", "default_root_dir", "logger", "callbacks"}
