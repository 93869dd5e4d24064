"""Coarse to fine: the stage selector (core) and guidance_node with a fine model over real DDS.

The node runs two untrained bundles of different seeds (coarse and fine), so whichever model
answered is visible in the guidance: the test checks it against reference runtimes of both files
and a :class:`TargetFusion` fed with the same estimates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cardiac_copilot_ros import pose as pose_alg
from cardiac_copilot_ros.coarse_to_fine import StageConfig, StageSelector
from cardiac_copilot_ros.target_fusion import FusionConfig, TargetFusion

T0 = pose_alg.action_to_matrix(np.array([100.0, -50.0, 300.0, 10.0, 20.0, -30.0]))


def _fused_at(offset: np.ndarray, n: int = 3) -> tuple[TargetFusion, np.ndarray]:
    """A fusion with ``n`` identical estimates of the target T0 @ U(offset) (probe at T0)."""
    fusion = TargetFusion(FusionConfig())
    for k in range(n):
        fusion.add(0.1 * k, T0, pose_alg.action_to_matrix(offset))
    return fusion, T0 @ pose_alg.action_to_matrix(offset)


def test_enters_fine_only_when_the_coarse_target_is_known_and_near() -> None:
    sel = StageSelector(StageConfig(enter_mm=10.0, enter_deg=10.0, exit_mm=25.0, exit_deg=25.0))
    far, _ = _fused_at(np.array([20.0, 0, 0, 0, 0, 0]))
    assert sel.after_coarse(T0, far.fused) is None and sel.stage == "coarse"
    rotated, _ = _fused_at(np.array([2.0, 0, 0, 0, 12.0, 0]))   # near in mm, not in deg
    assert sel.after_coarse(T0, rotated.fused) is None
    unknown, _ = _fused_at(np.array([2.0, 0, 0, 0, 0, 0]), n=2)  # spread not known yet
    assert not unknown.fused.known and sel.after_coarse(T0, unknown.fused) is None
    near, T_near = _fused_at(np.array([6.0, -3.0, 1.0, 4.0, -3.0, 2.0]))
    why = sel.after_coarse(T0, near.fused)
    assert why and why.startswith("fine") and sel.stage == "fine" and sel.counters.to_fine == 1
    np.testing.assert_allclose(sel.anchor, T_near)


def test_leaves_fine_when_the_probe_or_the_fine_target_leaves_the_anchor() -> None:
    cfg = StageConfig(enter_mm=10.0, enter_deg=10.0, exit_mm=25.0, exit_deg=25.0)
    for moved in ("probe", "target"):
        sel = StageSelector(cfg)
        near, T_anchor = _fused_at(np.array([5.0, 0, 0, 0, 0, 0]))
        assert sel.after_coarse(T0, near.fused)
        fine_near, _ = _fused_at(np.array([3.0, 1.0, 0, 0, 2.0, 0]))
        assert sel.after_fine(T0, fine_near.fused) is None and sel.stage == "fine"
        if moved == "probe":   # the probe went 30 mm away from the anchor (the servo followed something else)
            T_probe = T_anchor @ pose_alg.action_to_matrix(np.array([30.0, 0, 0, 0, 0, 0]))
            why = sel.after_fine(T_probe, fine_near.fused)
            assert why and "probe" in why
        else:                  # the fine model puts the target 30 deg from the coarse one
            fine_far, _ = _fused_at(np.array([5.0, 0, 0, 30.0, 0, 0]))
            why = sel.after_fine(T0, fine_far.fused)
            assert why and "fine target" in why
        assert sel.stage == "coarse" and sel.anchor is None and sel.counters.to_coarse == 1


def test_stage_config_is_validated() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        StageConfig(enter_mm=20.0, exit_mm=10.0).validate()
    with pytest.raises(ValueError, match="enter_deg"):
        StageConfig(enter_deg=float("nan")).validate()
    with pytest.raises(ValueError, match="unknown"):
        StageConfig().updated(enter_cm=1.0)
    sel = StageSelector()
    sel.reset("requested")
    assert sel.stage == "coarse" and sel.counters.to_coarse == 0   # already coarse: not a switch


# ------------------------------------------------------------------------------------------
# guidance_node with a fine model
# ------------------------------------------------------------------------------------------

NS = "/c2ftest"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("torch")
    from cardiac_copilot_ros.model.bundle import make_untrained_bundle

    base = tmp_path_factory.getbasetemp()
    coarse, fine = base / "c2f_coarse.pt", base / "c2f_fine.pt"
    if not coarse.exists():
        make_untrained_bundle(coarse, backbone="resnet18", input_size=(64, 64), dreamer=False, seed=1)
    if not fine.exists():
        make_untrained_bundle(fine, backbone="resnet18", input_size=(64, 64), dreamer=False, seed=2)
    return coarse, fine


@pytest.fixture(scope="module")
def node_and_probe(bundles: tuple[Path, Path]):
    pytest.importorskip("rclpy")
    from rclpy.parameter import Parameter
    from ros_helpers import ros_node, spinning_node
    from test_guidance_fusion import Probe

    from cardiac_copilot_ros.nodes.guidance_node import GuidanceNode

    params = {"model_path": str(bundles[0]), "fine_model_path": str(bundles[1]), "device": "cpu",
              "num_threads": 1, "max_pose_age_s": 0.5, "diagnostics_period_s": 0.2, "pose_guidance_rate_hz": 0.0,
              "publish_tf": False, "fine_enter_mm": 999.0, "fine_enter_deg": 179.0,
              "fine_exit_mm": 1000.0, "fine_exit_deg": 180.0}
    with spinning_node(lambda ctx: GuidanceNode(context=ctx, namespace=NS, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])) as node, ros_node("c2f_test_probe") as pnode:
        probe = Probe(pnode, NS)
        probe.wait_connected()
        yield node, probe


@pytest.mark.ros
def test_node_hands_over_to_the_fine_model_and_back(node_and_probe, bundles: tuple[Path, Path]) -> None:
    from test_guidance_fusion import _frame, _pose, _twist_action, _values

    from cardiac_copilot_ros.runtime import GuidanceRuntime

    node, probe = node_and_probe
    coarse_ref = GuidanceRuntime(bundles[0], device="cpu", warmup=0)
    fine_ref = GuidanceRuntime(bundles[1], device="cpu", warmup=0)
    assert node.fine_runtime is not None
    probe.call_reset()
    coarse, fine = TargetFusion(FusionConfig()), TargetFusion(FusionConfig())
    for k in range(6):
        frame, T = _frame(700 + k), _pose(k)
        stamp = probe.frame_at(frame, T)
        # frames 0-2: the coarse model (its target known after 3: hand-over); frames 3-5: the fine model
        ref, fusion = (coarse_ref, coarse) if k < 3 else (fine_ref, fine)
        a = ref.predict(frame, "PLAX").action
        fused = fusion.add(stamp * 1e-9, T, pose_alg.action_to_matrix(a), key=("PLAX", False)).fused
        np.testing.assert_allclose(_twist_action(probe.guidance[stamp]), pose_alg.relative_action(T, fused.T_mm),
                                   atol=1e-3)
    values = _values(probe.diag_after(lambda d: _values(d).get("stage") == "fine"))
    assert int(values["stage_to_fine"]) == 1 and int(values["stage_fine_frames"]) >= 3
    assert values["fine_model"].endswith("c2f_fine.pt")

    # a tight exit: the fine target is farther than 0.5 mm from the anchor -> back to coarse
    probe.set_params(fine_enter_mm=0.5, fine_exit_mm=0.5)
    try:
        probe.frame_at(_frame(710), _pose(5))
        values = _values(probe.diag_after(lambda d: _values(d).get("stage") == "coarse"))
        assert int(values["stage_to_coarse"]) == 1 and "exit" in values["stage_last_change"]
        # coarse again: the next frame is the coarse model's own (its estimate restarted)
        frame, T = _frame(711), _pose(4)
        stamp = probe.frame_at(frame, T)
        np.testing.assert_allclose(_twist_action(probe.guidance[stamp]), coarse_ref.predict(frame, "PLAX").action,
                                   atol=1e-3)
    finally:
        probe.set_params(fine_exit_mm=1000.0, fine_enter_mm=999.0)  # one by one: keep exit >= enter
    # a hysteresis-breaking set is refused as a whole
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    future = probe.params.call_async(SetParameters.Request(
        parameters=[Parameter("fine_exit_mm", value=5.0).to_parameter_msg()]))
    assert probe.spin_until(future.done, 10.0)
    assert not future.result().results[0].successful and "hysteresis" in future.result().results[0].reason
