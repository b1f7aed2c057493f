"""conf/demo/*.yaml: the overlays the README gives after conf/demo.yaml or a paper config, parsed by the real CLI."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO

CONF = REPO / "conf"


def resolved(capsys: pytest.CaptureFixture, *configs: str) -> dict:
    from run import main

    arguments = ["fit"]
    for config in configs:
        arguments += ["--config", str(CONF / config)]
    with pytest.raises(SystemExit) as exit_:
        main([*arguments, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "overlay, family, folder, writer",
    [("sdxl.yaml", "StableDiffusionXL", "sdxl-tiny", "tiny_sdxl"),
     ("zero123plus.yaml", "Zero123Plus", "zero123plus-tiny", "tiny_zero123plus"),
     ("sd35.yaml", "StableDiffusion3", "sd35-tiny", "tiny_sd35")],
)
def test_a_family_overlay_switches_the_demo_to_that_family_tiny_model(overlay, family, folder, writer, capsys) -> None:
    backbone = resolved(capsys, "demo.yaml", f"demo/{overlay}")["model"]["backbone"]
    assert backbone["class_path"] == f"lightning_modules.backbones.{family}"
    assert backbone["init_args"]["pretrained_model_name_or_path"] == f".demo/models/{folder}"
    assert backbone["init_args"]["create_if_missing"] == f"data.demo_models.{writer}"


def test_the_paper_table_overlay_puts_a_cub_paper_config_on_the_demo_model_and_data(capsys) -> None:
    config = resolved(capsys, "paper/base.yaml", "paper/cub_001.yaml", "demo/paper_table.yaml")
    assert config["model"]["backbone"]["init_args"]["pretrained_model_name_or_path"] == ".demo/models/sd15-tiny"
    assert config["model"]["backbone"]["init_args"]["create_if_missing"] == "data.demo_models.tiny_sd15"
    assert config["data"]["class_path"] == "data.cub.CUBDataModule"
    assert (config["data"]["init_args"]["root"], config["data"]["init_args"]["subset"]) == (".demo/CUB_200_2011", "cub_001")
    assert (config["data"]["init_args"]["generate_synthetic"], config["data"]["init_args"]["download"]) == (True, False)
    assert config["trainer"]["max_steps"] == 2 and config["trainer"]["default_root_dir"] == "outputs/paper/cub_001"
