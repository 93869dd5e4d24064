"""The shipped default bundle loads, describes itself, and guides on a simulator frame."""

from __future__ import annotations

import numpy as np
import pytest

from cardiac_copilot_ros.model.bundle import load_bundle
from cardiac_copilot_ros.planes import PLANE_NAMES
from cardiac_copilot_ros.pose import action_to_matrix, pose_error, relative_action
from cardiac_copilot_ros.runtime import GuidanceRuntime, default_model_path
from cardiac_copilot_ros.sim.phantom import make_subject
from cardiac_copilot_ros.sim.render import Renderer

HELD_OUT_SEED = 9001  # the default model was trained on subject seeds 20000-20399 (models/default.md)


@pytest.fixture(scope="module")
def default_runtime() -> GuidanceRuntime:
    path = default_model_path()
    if not path.is_file():
        pytest.fail(f"the default bundle is missing: {path}")
    return GuidanceRuntime(path, device="cpu", num_threads=1)


def test_default_bundle_metadata():
    bundle = load_bundle(default_model_path())
    assert tuple(bundle.planes) == PLANE_NAMES
    assert bundle.has_uncertainty and not bundle.has_dreamer    # the Dreamer did not earn its place (models/default.md)
    assert bundle.meta["weights_dtype"] == "float16"
    assert tuple(bundle.input_size) == (64, 64)
    assert "sim9001" not in bundle.meta["training"]["sim_subjects"]["train"]
    assert bundle.meta["euler_axes"] == "sxyz"


def test_default_bundle_guides_on_a_held_out_simulator_frame(default_runtime: GuidanceRuntime):
    subject = make_subject(HELD_OUT_SEED)
    renderer = Renderer(subject, size=224)
    target = subject.target_pose("PSAX-AV")
    start_offset = np.array([0.0, 0.0, 0.0, 0.0, 25.0, 0.0])  # tilted 25 deg in pitch off the plane
    probe = target @ np.linalg.inv(action_to_matrix(start_offset))
    truth = relative_action(probe, target)
    for refine in (False, True):
        pred = default_runtime.predict(renderer.render(probe), "PSAX-AV", refine=refine)
        assert pred.action.shape == (6,) and np.all(np.isfinite(pred.action))
        assert pred.action_scale is not None and np.all(pred.action_scale > 0)
        # the model is weak on translation and yaw (models/default.md) but reads the tilt: its pitch
        # matches the true 25 deg, and applying its guidance turns the probe toward the plane
        assert abs(pred.action[4] - truth[4]) < 5.0, (truth, pred.action)
        _, before_deg = pose_error(probe, target)
        _, after_deg = pose_error(probe @ action_to_matrix(pred.action), target)
        assert after_deg < before_deg, (truth, pred.action)


def test_fine_bundle_is_paired_with_the_default_and_guides_near_the_target():
    """models/fine.pt (coarse-to-fine's fine stage, preset fine) beside the default: same views and input,
    trained on training subjects only, and near the target its guidance brings the probe closer."""
    from cardiac_copilot_ros.runtime import default_fine_model_path

    path = default_fine_model_path()
    assert path is not None and path.name == "fine.pt"
    fine = load_bundle(path)
    coarse = load_bundle(default_model_path())
    assert fine.planes == coarse.planes and fine.input_size == coarse.input_size and fine.has_uncertainty
    assert fine.meta["training"]["preset"] == "fine"
    assert "sim9001" not in fine.meta["training"]["sim_subjects"]["train"]
    runtime = GuidanceRuntime(path, device="cpu", num_threads=1)
    subject = make_subject(HELD_OUT_SEED)
    renderer = Renderer(subject, size=224)
    target = subject.target_pose("PLAX")
    probe = target @ np.linalg.inv(action_to_matrix(np.array([8.0, -6.0, 1.0, 5.0, -6.0, 4.0])))
    pred = runtime.predict(renderer.render(probe), "PLAX")
    before_mm, before_deg = pose_error(probe, target)
    after_mm, after_deg = pose_error(probe @ action_to_matrix(pred.action), target)
    assert after_mm < before_mm and after_deg < before_deg, (relative_action(probe, target), pred.action)
