"""``cardiac-copilot export``'s reload check fails where it must: a model whose outputs are NaN or
inf (a NaN difference compares False with any tolerance, so it used to pass)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cardiac_copilot_ros import cli
from cardiac_copilot_ros.model.export import TOLERANCE, check_bundle
from cardiac_copilot_ros.model.policy import GuidanceModel

ARGS = {"backbone": "resnet18", "dreamer": True, "dreamer_dim": 32, "dreamer_depth": 1, "dreamer_heads": 2}


def _checkpoint(path: Path, poison: float | None) -> Path:
    """A training checkpoint (the format `train` writes) of a small untrained model; ``poison``
    overwrites the output layer's bias with that value."""
    torch.manual_seed(0)
    model = GuidanceModel(**ARGS).eval()
    if poison is not None:
        with torch.no_grad():
            model.head.fc[-1].bias.fill_(poison)
    torch.save({"format": "cardiac_copilot_checkpoint", "format_version": 1, "model": model.state_dict(),
                "model_args": ARGS, "input_size": [32, 32], "config": {}, "step": 0,
                "data_manifest_sha256": None, "action_mean": [0.0] * 6, "action_std": [1.0] * 6}, path)
    return path


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_export_check_fails_for_nan_or_inf_outputs(tmp_path: Path, poison: float, capsys) -> None:
    ck = _checkpoint(tmp_path / "bad.pt", poison)
    rc = cli.main(["export", str(ck), "--out", str(tmp_path / "m.pt")])
    out, err = capsys.readouterr()
    assert "check vs eager model" in out
    assert rc == 1, (out, err)
    assert "differ from the model" in err and "NaN/inf" in err


def test_export_check_passes_and_detects_a_different_model(tmp_path: Path, capsys) -> None:
    ck = _checkpoint(tmp_path / "good.pt", None)
    out = tmp_path / "m.pt"
    assert cli.main(["export", str(ck), "--out", str(out)]) == 0
    torch.manual_seed(0)
    model = GuidanceModel(**ARGS).eval()
    assert max(check_bundle(model, out).values()) <= TOLERANCE  # same weights: passes
    with torch.no_grad():
        model.head.fc[-1].bias.add_(0.01)
    assert min(check_bundle(model, out).values()) > TOLERANCE  # another model: the check sees it
