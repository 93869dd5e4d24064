"""Views are data (issue 15, item 1): A4C from the simulator through build, training, export
and the runtime; the dataset and bundle carry their views; the default model rejects A4C."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cardiac_copilot_ros import cli
from cardiac_copilot_ros.model.bundle import load_bundle
from cardiac_copilot_ros.runtime import GuidanceRuntime, default_model_path
from cardiac_copilot_ros.sim.phantom import Label, make_subject
from cardiac_copilot_ros.sim.render import Renderer


def test_sim_a4c_target_shows_four_chambers_and_no_aorta():
    for seed in (0, 5):
        s = make_subject(seed)
        lab = Renderer(s, size=96).labels(s.target_pose("A4C"))
        counts = {k: int((lab == k).sum()) for k in (Label.LV, Label.RV, Label.LA, Label.RA, Label.AORTA)}
        assert min(counts[k] for k in (Label.LV, Label.RV, Label.LA, Label.RA)) >= 10, counts
        assert counts[Label.AORTA] == 0, counts
        # apical window: the probe sits beyond the LV apex, looking back along the long axis (heart frame)
        T = s.target_pose_heart("A4C")
        assert T[0, 3] > float(s.anatomy["lv_center"][0] + s.anatomy["lv_radii"][0])
        assert T[:3, 2] @ np.array([-1.0, 0.0, 0.0]) > 0.9
        # the other planes are unchanged by adding A4C (same subject, same seeds)
        assert s.target_pose("apical 4 chamber").tolist() == s.target_pose("A4C").tolist()


def test_sim_rejects_views_it_does_not_simulate(tmp_path):
    with pytest.raises(ValueError, match="simulated views: PLAX, PSAX-AV, PSAX-MV, A4C"):
        make_subject(0).target_pose("A2C")
    assert cli.main(["simulate", "--plane", "A2C", "--out", str(tmp_path / "x"), "--no-progress"]) == 2


@pytest.fixture(scope="module")
def a4c_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a4c")
    assert cli.main(["simulate", "--plane", "A4C", "PLAX", "--subjects", "3", "--frames-per-scan", "30",
                     "--image-size", "48", "--out", str(root / "bags"), "--no-progress"]) == 0
    assert cli.main(["dataset", "build", str(root / "bags"), "--out", str(root / "cache"), "--size", "32",
                     "--quiet"]) == 0
    return root / "cache"


def test_dataset_records_the_views_found(a4c_cache):
    manifest = json.loads((a4c_cache / "manifest.json").read_text())
    assert manifest["planes"] == ["PLAX", "A4C"]          # registry order, only the views present
    plane = np.load(a4c_cache / "plane.npy")
    assert set(np.unique(plane).tolist()) == {0, 1}
    assert set(manifest["plane_frames"]) == {"PLAX", "A4C"} and min(manifest["plane_frames"].values()) > 0
    for d in manifest["demos"]:
        assert manifest["planes"][d["plane"]] in d["label"]  # labels are the sim's annotation text


def test_a4c_model_trains_exports_and_runs(a4c_cache, tmp_path):
    torch.set_num_threads(2)
    assert cli.main(["train", "--data", str(a4c_cache), "--model", "baseline", "--preset", "smoke",
                     "--out-dir", str(tmp_path), "--run-name", "a4c"]) == 0
    bundle_path = tmp_path / "a4c.pt"
    assert cli.main(["export", str(tmp_path / "a4c"), "--out", str(bundle_path)]) == 0
    bundle = load_bundle(bundle_path)
    assert tuple(bundle.planes) == ("PLAX", "A4C")
    assert bundle.meta["plane_indices"] == {"PLAX": 0, "A4C": 1}
    rt = GuidanceRuntime(bundle_path, device="cpu", warmup=0)
    s = make_subject(9001)
    frame = Renderer(s, size=48).render(s.target_pose("A4C"))
    pa = rt.predict(frame, "apical four chamber")
    pp = rt.predict(frame, "PLAX")
    assert np.all(np.isfinite(pa.action)) and not np.allclose(pa.action, pp.action)  # the query differs
    assert rt.plane_name("ap4") == "A4C" and rt.plane_name(1) == "A4C"
    with pytest.raises(ValueError, match="valid planes: PLAX, A4C"):
        rt.plane_name("PSAX-AV")


def test_default_model_rejects_a4c_naming_its_views():
    rt = GuidanceRuntime(default_model_path(), device="cpu", warmup=0)
    with pytest.raises(ValueError) as err:
        rt.plane_name("A4C")
    assert "A4C" in str(err.value) and "valid planes: PLAX, PSAX-AV, PSAX-MV" in str(err.value)


def test_evaluation_matches_views_by_name(a4c_cache):
    from cardiac_copilot_ros.evaluation import EvalModel, EvaluationError, evaluate, load_model, model_planes

    m = EvalModel(name="m", source=Path("m.pt"), kind="bundle", has_dreamer=False, input_size=(32, 32),
                  forward=None, planes=("A4C", "PSAX-AV", "PLAX"))
    column = np.array([0, 1, 1, 0])                       # cache views: PLAX, A4C
    assert model_planes(m, ("PLAX", "A4C"), column, column).tolist() == [2, 0, 0, 2]
    assert model_planes(m, ("A4C", "PSAX-AV", "PLAX"), column, column) is column
    with pytest.raises(EvaluationError, match="trained on the views A4C, PSAX-AV, PLAX.*also show PSAX-MV"):
        model_planes(m, ("PLAX", "PSAX-MV"), column, column)
    default = load_model(default_model_path())
    assert default.planes == ("PLAX", "PSAX-AV", "PSAX-MV")
    with pytest.raises(EvaluationError, match="also show A4C"):
        evaluate([default], a4c_cache, split="all", allow_overlap=True, progress=False, log=lambda s: None)
