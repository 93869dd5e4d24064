"""Simulator bags -> dataset build -> train --preset smoke (both models) -> resume -> export.

The whole pipeline runs for real through the CLI on a tiny simulated data set.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from cardiac_copilot_ros import cli
from cardiac_copilot_ros.model.bundle import load_bundle
from cardiac_copilot_ros.model.export import TOLERANCE, check_bundle
from cardiac_copilot_ros.training.loop import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from cardiac_copilot_ros.sim.scan import write_scans

    root = tmp_path_factory.mktemp("sim")
    write_scans(root / "bags", 4, 1, seed=0, frames_per_scan=40, image_size=64, progress=False)
    assert cli.main(["dataset", "build", str(root / "bags"), "--out", str(root / "cache"), "--size", "32",
                     "--quiet"]) == 0
    return root / "cache"


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(2)
    result = {}
    for model in ("baseline", "dreamer"):
        rc = cli.main(["train", "--data", str(cache), "--model", model, "--preset", "smoke",
                       "--out-dir", str(out), "--run-name", model])
        assert rc == 0
        result[model] = out / model
    return result


def test_run_folder_layout_and_metrics(runs):
    for model, run in runs.items():
        assert (run / "config.json").is_file() and (run / "best.pt").is_file()
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == \
            ["step_00000002.pt", "step_00000004.pt"]
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["model"] == model and cfg["preset"] == "smoke" and cfg["resolved"]["input_size"] == 32
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["step"] == 4 and len(metrics["history"]) == 2
        assert set(metrics["mean_baseline_mae"]) == {"x", "y", "z", "roll", "pitch", "yaw", "mean"}
        last = metrics["history"][-1]["val"]
        assert last["primary"] == ("refined" if model == "dreamer" else "policy")
        assert all(v >= 0 for v in last[last["primary"]].values())
        ck = load_checkpoint(run)
        assert ck["model_args"]["dreamer"] is (model == "dreamer")
        assert len(ck["action_mean"]) == 6 and ck["data_manifest_sha256"]


def test_resume_continues_exactly(runs, tmp_path):
    run = runs["baseline"]
    straight = load_checkpoint(run / "checkpoints" / "step_00000004.pt")["model"]
    rc = cli.main(["train", "--data", json.loads((run / "config.json").read_text())["data"], "--model", "baseline",
                   "--preset", "smoke", "--resume", str(run / "checkpoints" / "step_00000002.pt")])
    assert rc == 0
    resumed = load_checkpoint(run / "checkpoints" / "step_00000004.pt")["model"]
    for k, v in straight.items():
        assert torch.allclose(v.float(), resumed[k].float(), atol=1e-6), k


def test_channels_last_trains_the_same_model(runs, tmp_path):
    """The default channels-last memory format is a speed-up only: the same steps give the same weights as the
    contiguous format, up to the float rounding of the convolutions. AdamW moves every weight by about the
    learning rate per step whatever its gradient's size, so a rounding difference in a near-zero gradient can
    move a weight the other way: at most 2 x 4 steps x lr 1e-3 apart."""
    run = runs["baseline"]
    assert json.loads((run / "config.json").read_text())["channels_last"] is True
    rc = cli.main(["train", "--data", json.loads((run / "config.json").read_text())["data"], "--model", "baseline",
                   "--preset", "smoke", "--no-channels-last", "--out-dir", str(tmp_path), "--run-name", "nchw"])
    assert rc == 0 and json.loads((tmp_path / "nchw" / "config.json").read_text())["channels_last"] is False
    nhwc = load_checkpoint(run / "checkpoints" / "step_00000004.pt")["model"]
    nchw = load_checkpoint(tmp_path / "nchw" / "checkpoints" / "step_00000004.pt")["model"]
    assert nhwc.keys() == nchw.keys()
    for k, v in nhwc.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(v, nchw[k]), k
        elif ".running_" in k:   # batch statistics: the weight differences add up in the deep layers
            assert (v.float() - nchw[k].float()).norm() <= 0.1 * v.float().norm(), k
        else:
            assert (v.float() - nchw[k].float()).abs().max() <= 8e-3, k


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_export_matches_eager_in_both_modes(runs, tmp_path, fmt, capsys):
    run = runs["dreamer"]
    out = tmp_path / ("m.pt" if fmt == "torchscript" else "m.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning reaches the user
        assert cli.main(["export", str(run), "--out", str(out), "--format", fmt]) == 0
        # a torch.export archive can run code when loaded: only the exporter's own check may load it
        bundle = load_bundle(out, allow_torch_export=fmt == "export")
    assert "check vs eager model" in capsys.readouterr().out
    model = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    diffs = check_bundle(model, out, batch=4, seed=3)
    assert max(diffs.values()) <= TOLERANCE
    meta = bundle.meta
    assert meta["has_dreamer"] is True and meta["input_size"] == [32, 32] and meta["backbone"] == "resnet18"
    assert meta["data_manifest_sha256"] == json.loads((run / "config.json").read_text())["resolved"][
        "data_manifest_sha256"]
    assert meta["action_std"] == pytest.approx(model.action_std.tolist())
    # refinement actually changes the output for a Dreamer bundle
    x, p = torch.rand(2, 1, 32, 32), torch.tensor([0, 1])
    assert not torch.equal(bundle(x, p, False), bundle(x, p, True))


def test_export_baseline_and_bad_source(runs, tmp_path, capsys):
    out = tmp_path / "b.pt"
    assert cli.main(["export", str(runs["baseline"]), "--out", str(out)]) == 0
    b = load_bundle(out)
    assert not b.has_dreamer
    x, p = torch.rand(1, 1, 32, 32), torch.tensor([2])
    assert torch.equal(b(x, p, False), b(x, p, True))
    assert cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "c.pt")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_bench_train_prints_loader_and_step_rates(cache, capsys):
    assert cli.main(["bench", "train", "--data", str(cache), "--model", "dreamer", "--preset", "smoke",
                     "--steps", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "data loader alone" in out and "training step (data in memory)" in out
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["loader_samples_per_s"] > 0 and numbers["step_samples_per_s"] > 0
