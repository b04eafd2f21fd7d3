"""Every YAML in configs/ parses against the CLI without its data or model files being present."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recyclegpt.core import RecycleConfig, module_parameter_ratio
from recyclegpt.train.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_four_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tinystories.yaml", "smollm2.yaml", "paper-1.3b.yaml"}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["recyclegpt-train"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_prints(config, workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["regime"] in ("joint", "frozen_base")
    assert printed["checkpoint"]["save_last"] is True
    assert printed["trainer"]["logger"]["class_path"] == "recyclegpt.train.tracking.MLflowLogger"


def test_config_keys_are_all_commented():
    for config in CONFIGS:
        for number, line in enumerate(config.read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                assert "#" in line, f"{config.name}:{number} has no comment: {line!r}"


def test_paper_config_is_1_3b_with_a_15_percent_module():
    model = yaml.safe_load((CONFIGS[0].parent / "paper-1.3b.yaml").read_text())["model"]
    config = RecycleConfig(vocab_size=32000, **model["config"])
    assert config.num_layers == 24
    assert 0.13 <= module_parameter_ratio(config) <= 0.17
    printed = yaml.safe_load((CONFIGS[0].parent / "paper-1.3b.yaml").read_text())["trainer"]
    assert printed["precision"] == "auto"  # bf16-mixed on the GPUs it is meant for
    assert printed["strategy"]["class_path"].endswith("FSDPStrategy")


def test_command_line_overrides_win(workdir, capsys):
    demo = CONFIGS[0].parent / "demo.yaml"
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(demo),
                "--trainer.max_steps",
                "7",
                "--model.feature_weight",
                "0.5",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7
    assert printed["model"]["feature_weight"] == 0.5
