"""guidance_node in guidance_mode fused (the default) over real DDS.

The node runs in this process (own context, executor on a thread) with an untrained 64 x 64
bundle; a probe node publishes frames and probe poses and checks the outputs against the core:
a :class:`TargetFusion` fed with the same per-frame estimates (the reference runtime's actions
at the same probe poses) must give the same fused target, guidance, covariance and resets.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import ros_node, spin_until, spinning_node

torch = pytest.importorskip("torch")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped, TwistStamped  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from cardiac_copilot_ros import pose as pose_alg  # noqa: E402
from cardiac_copilot_ros.model.bundle import make_untrained_bundle  # noqa: E402
from cardiac_copilot_ros.nodes import conversions as conv  # noqa: E402
from cardiac_copilot_ros.nodes.guidance_node import GuidanceNode  # noqa: E402
from cardiac_copilot_ros.runtime import GuidanceRuntime  # noqa: E402
from cardiac_copilot_ros.target_fusion import FusionConfig, TargetFusion  # noqa: E402

pytestmark = pytest.mark.ros
NS = "/ftest"
T0 = pose_alg.action_to_matrix(np.array([100.0, -50.0, 300.0, 10.0, 20.0, -30.0]))


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "fusion_r18_64.pt"
    if not path.exists():
        make_untrained_bundle(path, backbone="resnet18", input_size=(64, 64))
    return path


@pytest.fixture(scope="module")
def reference(bundle_path: Path) -> GuidanceRuntime:
    return GuidanceRuntime(bundle_path, device="cpu", warmup=1)


@pytest.fixture(scope="module")
def guidance(bundle_path: Path):
    params = {"model_path": str(bundle_path), "device": "cpu", "num_threads": 1, "max_pose_age_s": 0.5,
              "diagnostics_period_s": 0.2, "pose_guidance_rate_hz": 0.0, "publish_tf": False}
    with spinning_node(lambda ctx: GuidanceNode(context=ctx, namespace=NS, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])) as node:
        yield node


class Probe:
    def __init__(self, node, ns: str = NS) -> None:
        self.node = node
        self.pub_image = node.create_publisher(Image, f"{ns}/image", qos_profile_sensor_data)
        self.pub_pose = node.create_publisher(PoseStamped, f"{ns}/probe_pose", qos_profile_sensor_data)
        self.guidance: dict[int, TwistStamped] = {}
        self.target: dict[int, PoseStamped] = {}
        self.cov: dict[int, PoseWithCovarianceStamped] = {}
        self.frame_target: dict[int, PoseStamped] = {}
        self.markers: dict[int, MarkerArray] = {}
        self.diag: list[DiagnosticStatus] = []
        key = lambda m: conv.stamp_to_ns(m.header.stamp)  # noqa: E731
        node.create_subscription(TwistStamped, f"{ns}/guidance", lambda m: self.guidance.__setitem__(key(m), m), 100)
        node.create_subscription(PoseStamped, f"{ns}/target_pose", lambda m: self.target.__setitem__(key(m), m), 100)
        node.create_subscription(PoseStamped, f"{ns}/frame_target_pose",
                                 lambda m: self.frame_target.__setitem__(key(m), m), 100)
        node.create_subscription(PoseWithCovarianceStamped, f"{ns}/target_pose_cov",
                                 lambda m: self.cov.__setitem__(key(m), m), 100)
        node.create_subscription(MarkerArray, f"{ns}/guidance_markers",
                                 lambda m: self.markers.__setitem__(key(m.markers[0]), m) if m.markers else None, 100)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.params = node.create_client(SetParameters, f"{ns}/guidance_node/set_parameters")
        self.reset = node.create_client(Trigger, f"{ns}/guidance_node/reset_target")
        self._stamp = time.time_ns()

    def _on_diag(self, msg: DiagnosticArray) -> None:
        self.diag += [st for st in msg.status if st.name.endswith("guidance_node: guidance")]

    def spin_until(self, pred, timeout_s: float = 10.0) -> bool:
        return spin_until(self.node, pred, timeout_s)

    def wait_connected(self) -> None:
        assert self.spin_until(lambda: self.pub_image.get_subscription_count() > 0
                               and self.pub_pose.get_subscription_count() > 0
                               and self.params.service_is_ready() and self.reset.service_is_ready(), 15.0)

    def next_stamp(self) -> int:
        self._stamp = max(self._stamp + 1_000_000, time.time_ns())
        return self._stamp

    def frame_at(self, frame: np.ndarray, T: np.ndarray | None, timeout_s: float = 15.0,
                 stamp_offset_ns: int = 0) -> int:
        """Publish the probe pose T and a frame at the same stamp until guidance for it arrives."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stamp = self.next_stamp() + stamp_offset_ns
            if T is not None:
                self.pub_pose.publish(conv.matrix_to_pose_stamped(T, stamp, "panda_link0"))
                self.spin_until(lambda: False, 0.03)
            self.pub_image.publish(conv.gray_to_image_msg(frame, stamp, "us_image"))
            if self.spin_until(lambda s=stamp: s in self.guidance, 2.0):
                return stamp
        raise AssertionError("no guidance for a good frame")

    def set_params(self, **values: object) -> None:
        msgs = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        future = self.params.call_async(SetParameters.Request(parameters=msgs))
        assert self.spin_until(future.done, 10.0)
        assert all(r.successful for r in future.result().results), future.result().results

    def call_reset(self) -> None:
        future = self.reset.call_async(Trigger.Request())
        assert self.spin_until(future.done, 10.0) and future.result().success

    def diag_after(self, pred, since: int | None = None) -> DiagnosticStatus:
        """The first diagnostic status matching ``pred`` received after index ``since`` (default: from now)."""
        n = len(self.diag) if since is None else since
        assert self.spin_until(lambda: any(pred(d) for d in self.diag[n:]), 10.0)
        return next(d for d in self.diag[n:] if pred(d))


@pytest.fixture(scope="module")
def probe(guidance):
    with ros_node("fusion_test_probe") as node:
        p = Probe(node)
        p.wait_connected()
        yield p


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(96, 128), dtype=np.uint8)


def _pose(k: int) -> np.ndarray:
    return T0 @ pose_alg.action_to_matrix(np.array([2.0 * k, -1.0 * k, 0.5 * k, 1.0 * k, -0.5 * k, 0.8 * k]))


def _values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def _twist_action(msg: TwistStamped) -> np.ndarray:
    return conv.twist_msg_to_action(msg)


def test_fused_target_guidance_covariance_and_markers(guidance, probe: Probe, reference: GuidanceRuntime) -> None:
    probe.call_reset()
    core = TargetFusion(FusionConfig())
    stamps = []
    for k in range(6):
        frame, T = _frame(100 + k), _pose(k)
        stamp = probe.frame_at(frame, T)
        stamps.append(stamp)
        a = reference.predict(frame, "PLAX", True).action
        fused = core.add(stamp * 1e-9, T, pose_alg.action_to_matrix(a), key=("PLAX", True)).fused
        # guidance = the fused target relative to the probe pose at the image stamp
        np.testing.assert_allclose(_twist_action(probe.guidance[stamp]), pose_alg.relative_action(T, fused.T_mm),
                                   atol=1e-3)
        assert probe.spin_until(lambda s=stamp: s in probe.target and s in probe.markers, 5.0)
        _, T_target = conv.pose_stamped_to_matrix(probe.target[stamp])
        np.testing.assert_allclose(T_target, fused.T_mm, atol=1e-3)
        # frame_target_pose: this frame's own estimate, before fusion (what the servo's survey judges by)
        assert probe.spin_until(lambda s=stamp: s in probe.frame_target, 5.0)
        assert probe.frame_target[stamp].header.frame_id == "panda_link0"
        _, T_frame = conv.pose_stamped_to_matrix(probe.frame_target[stamp])
        np.testing.assert_allclose(T_frame, T @ pose_alg.action_to_matrix(a), atol=1e-3)
        markers = {m.id: m for m in probe.markers[stamp].markers}
        assert markers[5].type == Marker.SPHERE and "fused" in markers[4].text
        if k < 2:  # spread unknown: no covariance yet, the uncertainty marker is deleted
            assert markers[5].action == Marker.DELETE
        else:
            assert probe.spin_until(lambda s=stamp: s in probe.cov, 5.0)
            cov = np.array(probe.cov[stamp].pose.covariance).reshape(6, 6)
            np.testing.assert_allclose(cov, fused.covariance, rtol=1e-6, atol=1e-12)
            assert probe.cov[stamp].header.frame_id == "panda_link0"
            assert markers[5].action == Marker.ADD and markers[5].scale.x > 0
    assert not any(s in probe.cov for s in stamps[:2])
    # the per-frame answer differs from the fused one (the frames disagree a little)
    last = reference.predict(_frame(105), "PLAX", True).action
    assert not np.allclose(_twist_action(probe.guidance[stamps[-1]]), last, atol=1e-3)
    values = _values(probe.diag_after(lambda d: "fused_spread_mm" in _values(d)))
    assert values["guidance_mode"] == "fused" and int(values["fused_frames_in_window"]) >= 6


def test_plane_switch_and_reset_service_restart_the_estimate(guidance, probe: Probe,
                                                             reference: GuidanceRuntime) -> None:
    for k in range(3):
        probe.frame_at(_frame(200 + k), _pose(k))
    resets = int(_values(probe.diag_after(lambda d: "fusion_resets" in _values(d)))["fusion_resets"])
    try:
        probe.set_params(target_plane="PSAX-AV")
        frame, T = _frame(210), _pose(1)
        stamp = probe.frame_at(frame, T)
        single = pose_alg.apply_action(T, reference.predict(frame, "PSAX-AV", True).action)
        assert probe.spin_until(lambda: stamp in probe.target, 5.0)
        np.testing.assert_allclose(conv.pose_stamped_to_matrix(probe.target[stamp])[1], single, atol=1e-3)
        assert int(_values(probe.diag_after(lambda d: int(_values(d).get("fusion_resets", 0)) > resets))
                   ["fused_frames_in_window"]) >= 1
    finally:
        probe.set_params(target_plane="PLAX")
    for k in range(3):
        probe.frame_at(_frame(220 + k), _pose(k))
    probe.call_reset()
    frame, T = _frame(230), _pose(4)
    stamp = probe.frame_at(frame, T)
    single = pose_alg.apply_action(T, reference.predict(frame, "PLAX", True).action)
    assert probe.spin_until(lambda: stamp in probe.target, 5.0)
    np.testing.assert_allclose(conv.pose_stamped_to_matrix(probe.target[stamp])[1], single, atol=1e-3)


def test_pose_rate_guidance_relates_the_fused_target_to_the_newest_pose(guidance, probe: Probe) -> None:
    probe.call_reset()
    for k in range(3):
        stamp = probe.frame_at(_frame(300 + k), _pose(k))
    assert probe.spin_until(lambda: stamp in probe.target, 5.0)
    T_fused = conv.pose_stamped_to_matrix(probe.target[stamp])[1]
    try:
        probe.set_params(pose_guidance_rate_hz=50.0)
        T_new = _pose(7)
        for _ in range(20):  # best effort: a pose may be lost or rate-limited
            pose_stamp = probe.next_stamp()
            probe.pub_pose.publish(conv.matrix_to_pose_stamped(T_new, pose_stamp, "panda_link0"))
            if probe.spin_until(lambda s=pose_stamp: s in probe.guidance, 0.5):
                break
        msg = probe.guidance[pose_stamp]   # stamped with the pose's stamp
        np.testing.assert_allclose(_twist_action(msg), pose_alg.relative_action(T_new, T_fused), atol=1e-3)
    finally:
        probe.set_params(pose_guidance_rate_hz=0.0)


def test_without_a_fresh_pose_fused_mode_falls_back_to_per_frame(guidance, probe: Probe,
                                                                  reference: GuidanceRuntime) -> None:
    frame = _frame(400)
    # the fallback shows in the one diagnostics message after the frame, which may arrive while frame_at
    # still waits for the guidance: look from before the frame was sent
    since = len(probe.diag)
    stamp = probe.frame_at(frame, None, stamp_offset_ns=30_000_000_000)  # 30 s away from every pose
    np.testing.assert_allclose(_twist_action(probe.guidance[stamp]), reference.predict(frame, "PLAX", True).action,
                               atol=1e-3)
    status = probe.diag_after(lambda d: _values(d).get("fused_fallback_active") == "True", since=since)
    assert status.level == DiagnosticStatus.WARN and "per-frame guidance" in status.message
    assert int(_values(status)["fused_fallbacks"]) >= 1


def test_per_frame_mode_is_todays_behaviour(guidance, probe: Probe, reference: GuidanceRuntime) -> None:
    try:
        probe.set_params(guidance_mode="per_frame")
        frame, T = _frame(500), _pose(2)
        stamp = probe.frame_at(frame, T)
        a = reference.predict(frame, "PLAX", True).action
        np.testing.assert_allclose(_twist_action(probe.guidance[stamp]), a, atol=1e-3)
        assert probe.spin_until(lambda: stamp in probe.target, 5.0)
        np.testing.assert_allclose(conv.pose_stamped_to_matrix(probe.target[stamp])[1],
                                   pose_alg.apply_action(T, a), atol=1e-3)
        assert stamp not in probe.cov
    finally:
        probe.set_params(guidance_mode="fused")
    future = probe.params.call_async(SetParameters.Request(
        parameters=[Parameter("guidance_mode", value="average").to_parameter_msg()]))
    assert probe.spin_until(future.done, 10.0)
    assert not future.result().results[0].successful
