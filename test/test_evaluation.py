"""cardiac-copilot evaluate: JSON layout, numbers against a direct computation, outputs, helpers.

Real bundles (untrained, the real architecture at 32 px) on a real simulator cache.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cardiac_copilot_ros import cli, evaluation
from cardiac_copilot_ros.model.bundle import load_bundle, make_untrained_bundle
from cardiac_copilot_ros.planes import PLANE_NAMES


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from cardiac_copilot_ros.sim.scan import write_scans

    torch.set_num_threads(1)  # 2 shared cores: one thread is much faster than two under load
    root = tmp_path_factory.mktemp("evalsim")
    write_scans(root / "bags", 4, 1, seed=0, frames_per_scan=30, image_size=48, progress=False)
    assert cli.main(["dataset", "build", str(root / "bags"), "--out", str(root / "cache"), "--size", "32",
                     "--quiet"]) == 0
    return root / "cache"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {"base": make_untrained_bundle(root / "base.pt", input_size=(32, 32), dreamer=False, seed=1),
            "dream": make_untrained_bundle(root / "dream.pt", input_size=(32, 32), dreamer=True, seed=2)}


@pytest.fixture(scope="module")
def evaluated(cache, bundles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    rc = cli.main(["evaluate", str(bundles["base"]), str(bundles["dream"]), "--data", str(cache),
                   "--json", str(out / "table1.json"), "--no-progress", "--batch-size", "16",
                   "--fig-min-count", "2"])
    assert rc == 0
    return out


def _direct(bundle_path: Path, cache: Path, refine: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bundle outputs on the test split, item by item through FrameDataset: (pred, gt, plane)."""
    from cardiac_copilot_ros.data.dataset import FrameDataset

    ds = FrameDataset(cache, "test")
    bundle = load_bundle(bundle_path)
    items = [ds[k] for k in range(len(ds))]
    x = torch.stack([it["image"] for it in items]).float() / 255.0
    plane = torch.stack([it["plane"] for it in items])
    pred = bundle(x, plane, refine).numpy().astype(np.float64)
    gt = torch.stack([it["action"] for it in items]).numpy().astype(np.float64)
    return pred, gt, plane.numpy()


def _wrapped_abs(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    err = np.abs(pred - gt)
    # angle difference via the unit circle (independent of evaluate's remainder arithmetic)
    err[:, 3:] = np.rad2deg(np.abs(np.angle(np.exp(1j * np.deg2rad(pred[:, 3:] - gt[:, 3:])))))
    return err


def test_json_layout_is_exact(evaluated, cache):
    data = json.loads((evaluated / "table1.json").read_text())
    assert data == json.loads((evaluated / "results.json").read_text())
    assert list(data) == ["base", "dream/policy", "dream/dreamer"]
    manifest = json.loads((cache / "manifest.json").read_text())
    for planes in data.values():
        assert list(planes) == list(PLANE_NAMES)
        for st in planes.values():
            assert set(st) == {"mae", "std", "n"}
            assert len(st["mae"]) == 6 and len(st["std"]) == 6
            assert all(v >= 0 for v in st["mae"] + st["std"])
    assert sum(st["n"] for st in data["base"].values()) == manifest["split_frames"]["test"]


@pytest.mark.parametrize(("entry", "name", "refine"), [("base", "base", False), ("dream/policy", "dream", False),
                                                       ("dream/dreamer", "dream", True)])
def test_mae_matches_direct_numpy(evaluated, cache, bundles, entry, name, refine):
    data = json.loads((evaluated / "results.json").read_text())
    pred, gt, plane = _direct(bundles[name], cache, refine)
    err = _wrapped_abs(pred, gt)
    for i, p in enumerate(PLANE_NAMES):
        e = err[plane == i]
        assert data[entry][p]["n"] == len(e)
        np.testing.assert_allclose(data[entry][p]["mae"], e.mean(0), rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(data[entry][p]["std"], e.std(0), rtol=1e-3, atol=2e-3)


def test_refined_differs_from_policy(evaluated):
    data = json.loads((evaluated / "results.json").read_text())
    assert data["dream/policy"]["PLAX"]["mae"] != data["dream/dreamer"]["PLAX"]["mae"]


def test_details_table_csv_and_figure(evaluated, cache):
    d = json.loads((evaluated / "details.json").read_text())
    res = json.loads((evaluated / "results.json").read_text())
    assert d["baseline"] == "base" and d["split"] == "test"
    assert d["split_subjects"] == json.loads((cache / "manifest.json").read_text())["splits"]["test"]
    for entry in ("dream/policy", "dream/dreamer"):
        for p in PLANE_NAMES:
            want = [(m - b) / b * 100 for m, b in zip(res[entry][p]["mae"], res["base"][p]["mae"], strict=True)]
            np.testing.assert_allclose(d["relative_change_pct"][entry][p], want, atol=0.02)
    # the train-mean predictor, from the manifest's action statistics
    stats = json.loads((cache / "manifest.json").read_text())["action_stats"]
    np.testing.assert_allclose(d["train_mean"]["action"], stats["mean"], atol=1e-3)
    assert set(d["train_mean"]["per_plane"]) == set(PLANE_NAMES)
    # held-out check: untrained bundles carry no training data -> a recorded warning, not a refusal
    assert {c["status"] for c in d["held_out"]} == {"unknown"}
    # Fig. 3 data: per plane, translation and rotation, every entry and the train mean
    for p in PLANE_NAMES:
        for part in ("translation", "rotation"):
            curves = d["fig3"]["planes"][p][part]["curves"]
            assert set(curves) == {"base", "dream/policy", "dream/dreamer", evaluation.MEAN_ENTRY}
            assert any(c["center"] for c in curves.values())
    png = (evaluated / "fig3.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (evaluated / "table.md").read_text()
    assert md.startswith("| plane | model | n | x (mm) |") and "**dream/dreamer**" in md and " %" in md
    rows = list(csv.DictReader(open(evaluated / "table.csv")))
    assert {r["metric"] for r in rows} == {"mae", "std", "rel_change_pct"}
    row = next(r for r in rows if r["plane"] == "PLAX" and r["model"] == "base" and r["metric"] == "mae")
    assert [float(row[a]) for a in ("x", "y", "z", "roll", "pitch", "yaw")] == res["base"]["PLAX"]["mae"]


def test_baseline_option_and_names(cache, bundles, tmp_path, capsys):
    rc = cli.main(["evaluate", str(bundles["dream"]), "--data", str(cache), "--out", str(tmp_path / "o"),
                   "--names", "W", "--no-progress", "--baseline", "W/policy"])
    assert rc == 0
    assert list(json.loads((tmp_path / "o" / "results.json").read_text())) == ["W/policy", "W/dreamer"]
    d = json.loads((tmp_path / "o" / "details.json").read_text())
    assert d["baseline"] == "W/policy" and list(d["relative_change_pct"]) == ["W/dreamer"]
    assert "train mean" in capsys.readouterr().out
    assert cli.main(["evaluate", str(bundles["dream"]), "--data", str(cache), "--out", str(tmp_path / "p"),
                     "--no-progress", "--baseline", "nope"]) == 2
    assert "--baseline 'nope'" in capsys.readouterr().err
    assert cli.main(["evaluate", str(bundles["dream"]), "--data", str(cache), "--names", "a", "b"]) == 2


def test_bad_inputs_give_clear_errors(cache, bundles, tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "missing.pt"), "--data", str(cache)]) == 2
    assert "missing.pt" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    assert cli.main(["evaluate", str(junk), "--data", str(cache)]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert cli.main(["evaluate", str(bundles["base"]), "--data", str(tmp_path)]) == 2
    assert "not a training cache" in capsys.readouterr().err


def test_abs_errors_wrap_angles():
    pred = np.array([[1.0, -2.0, 0.0, 179.0, -170.0, 90.0]])
    gt = np.array([[0.0, 2.0, 0.5, -179.0, 170.0, -90.0]])
    np.testing.assert_allclose(evaluation.abs_errors(pred, gt), [[1.0, 4.0, 0.5, 2.0, 20.0, 180.0]])


def test_relative_change_and_binning():
    rel = evaluation.relative_change({"PLAX": {"mae": [1, 2, 3, 0, 5, 6]}},
                                     {"PLAX": {"mae": [2, 2, 2, 0, 10, 3]}, "PSAX-AV": {"mae": [1] * 6}})
    assert rel == {"PLAX": [-50.0, 0.0, 50.0, None, -50.0, 100.0]}
    x = np.array([0.5, 0.6, 1.5, 2.5, 2.6, 2.7])
    y = np.array([1.0, 3.0, 5.0, 2.0, 4.0, 6.0])
    cur = evaluation.binned_curve(x, y, np.array([0.0, 1.0, 2.0, 3.0]), min_count=2)
    assert cur["center"] == [0.5, 2.5] and cur["mean"] == [2.0, 4.0] and cur["n"] == [2, 3]
    assert cur["std"][0] == pytest.approx(1.0)
    dist, ang = evaluation.motion_size(np.array([[3.0, 4.0, 0.0, 0.0, 0.0, 30.0], [0, 0, 0, 10.0, 0, 0]]))
    np.testing.assert_allclose(dist, [5.0, 0.0])
    np.testing.assert_allclose(ang, [30.0, 10.0], atol=1e-9)
