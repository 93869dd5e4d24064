"""Training config presets and validation."""

from __future__ import annotations

import pytest

from cardiac_copilot_ros.training.config import PRESETS, TrainConfig, make_config


def test_presets_resolve_and_paper_matches_the_paper():
    for name in PRESETS:
        cfg = make_config(name, data="x", model="baseline")
        assert cfg.preset == name
    paper = make_config("paper")
    assert (paper.backbone, paper.input_size, paper.epochs, paper.lr) == ("resnet34", 224, 300, 1e-4)
    cpu = make_config("cpu")
    assert cpu.backbone == "resnet18" and cpu.input_size <= 128


def test_overrides_and_errors():
    cfg = make_config("smoke", lr=0.5, batch_size=None)
    assert cfg.lr == 0.5 and cfg.batch_size == PRESETS["smoke"]["batch_size"]
    assert TrainConfig.from_dict({**cfg.__dict__, "unknown_key": 1}).lr == 0.5
    with pytest.raises(ValueError, match="preset"):
        make_config("gpu-please")
    with pytest.raises(ValueError, match="model"):
        make_config("smoke", model="transformer")
    with pytest.raises(ValueError, match="input_size"):
        make_config("smoke", input_size=8)
    with pytest.raises(ValueError, match="unknown config key"):
        make_config("smoke", nonsense=1)
