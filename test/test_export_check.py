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


def test_fp16_bundle_is_half_the_size_and_runs_in_float32(tmp_path: Path, capsys) -> None:
    from cardiac_copilot_ros.model.bundle import load_bundle
    from cardiac_copilot_ros.runtime import GuidanceRuntime

    ck = _checkpoint(tmp_path / "good.pt", None)
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    assert cli.main(["export", str(ck), "--out", str(full)]) == 0
    assert cli.main(["export", str(ck), "--out", str(half), "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "fp16 weights: outputs differ" in out
    assert half.stat().st_size < 0.6 * full.stat().st_size
    b16, b32 = load_bundle(half), load_bundle(full)
    assert b16.meta["weights_dtype"] == "float16" and b16.meta["format_version"] == 2
    assert "weights_dtype" not in b32.meta and b32.meta["format_version"] == 1   # readable by older code
    assert all(p.dtype == torch.float32 for p in b16.module.parameters())
    x = torch.rand(2, 1, 32, 32)
    plane = torch.tensor([0, 1])
    with torch.no_grad():
        diff = (b16(x, plane, True) - b32(x, plane, True)).abs().max().item()
    assert 0 < diff < 0.05   # rounded weights, float32 arithmetic
    frame = (torch.rand(48, 48) * 255).to(torch.uint8).numpy()
    a16 = GuidanceRuntime(half, device="cpu", warmup=1, engine="torch").predict(frame).action
    a32 = GuidanceRuntime(full, device="cpu", warmup=1, engine="torch").predict(frame).action
    assert abs(a16 - a32).max() < 0.05
    # fp16 is for TorchScript files only
    assert cli.main(["export", str(ck), "--out", str(tmp_path / "m.onnx"), "--fp16"]) == 2
    assert cli.main(["export", str(ck), "--out", str(tmp_path / "m.pt2"), "--fp16"]) == 2
    assert "TorchScript" in capsys.readouterr().err
