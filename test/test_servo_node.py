"""servo_node over real DDS: every safety behaviour, observed from another rclpy context.

The servo node runs in-process in a context and executor thread of its own (one child
process for the shutdown tests, which signal it); a harness node publishes `guidance` and
`probe_pose`, calls `~/enable` and records the commands, status and diagnostics.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import NodeProcess

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from cardiac_copilot_ros.nodes.servo_node import ServoNode  # noqa: E402

pytestmark = pytest.mark.ros

#: Settings under which each behaviour shows within a second or two. The watchdogs are not
#: shorter than 1 s (and the guidance age check 2 s) so that a loaded CI machine, where the
#: harness and the servo share two cores, cannot trip them by accident; every test waits for
#: the condition it checks (generous timeouts) instead of sleeping a fixed time.
FAST = {
    "guidance_timeout_s": 1.0,
    "probe_pose_timeout_s": 1.0,
    "max_guidance_age_s": 2.0,
    "converge_hold_s": 0.3,
    "status_period_s": 0.2,
}
WAIT_S = 10.0
MAX_LIN = 0.02
MAX_ANG = 0.2
ACC_LIN = 0.05
ACC_ANG = 0.5


@dataclass
class Cmd:
    recv_s: float
    stamp_s: float
    frame: str
    lin: np.ndarray
    ang: np.ndarray

    @property
    def is_zero(self) -> bool:
        return not (np.any(self.lin) or np.any(self.ang))


class Harness:
    """Test-side node: publishes guidance (30 Hz) and probe pose (50 Hz), records outputs."""

    def __init__(self, servo_name: str = "copilot_servo", cmd_topic: str = "/servo_node/delta_twist_cmds"
                 ) -> None:
        self.ctx = Context()
        rclpy.init(context=self.ctx)
        self.node = Node("servo_test_harness", context=self.ctx)
        n = self.node
        self.lock = threading.Lock()
        self.cmds: list[Cmd] = []
        self.status: list[dict] = []
        self.reached: list[bool] = []
        self.diags: list[DiagnosticArray] = []
        #: (linear, angular, stamp offset [s]) published at 30 Hz while not None
        self.guidance: tuple[list[float], list[float], float] | None = None
        self.guidance_fn: Callable[[int], tuple[list[float], list[float]]] | None = None
        self.pose: list[float] | None = [0.3, 0.0, 0.4]  # position [m], identity orientation
        self.pose_frame = "panda_link0"
        self._gcount = 0
        self.gpub = n.create_publisher(TwistStamped, "guidance", 10)
        self.ppub = n.create_publisher(PoseStamped, "probe_pose", 10)
        n.create_subscription(TwistStamped, cmd_topic, self._on_cmd, 1000)
        latched = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        n.create_subscription(String, f"/{servo_name}/status", self._on_status, latched)
        n.create_subscription(Bool, f"/{servo_name}/plane_reached", self._on_reached, latched)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.enable_client = n.create_client(SetBool, f"/{servo_name}/enable")
        self.param_client = n.create_client(SetParameters, f"/{servo_name}/set_parameters")
        n.create_timer(1.0 / 30.0, self._pub_guidance)
        n.create_timer(1.0 / 50.0, self._pub_pose)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    # -------------------------------------------------------------- callbacks
    def _now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _on_cmd(self, msg: TwistStamped) -> None:
        t, a = msg.twist.linear, msg.twist.angular
        c = Cmd(time.monotonic(), msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, msg.header.frame_id,
                np.array([t.x, t.y, t.z]), np.array([a.x, a.y, a.z]))
        with self.lock:
            self.cmds.append(c)

    def _on_status(self, msg: String) -> None:
        with self.lock:
            self.status.append(json.loads(msg.data))

    def _on_reached(self, msg: Bool) -> None:
        with self.lock:
            self.reached.append(bool(msg.data))

    def _on_diag(self, msg: DiagnosticArray) -> None:
        with self.lock:
            self.diags.append(msg)

    def _pub_guidance(self) -> None:
        if self.guidance_fn is not None:
            lin, ang = self.guidance_fn(self._gcount)
            age = 0.0
        elif self.guidance is not None:
            lin, ang, age = self.guidance
        else:
            return
        self._gcount += 1
        msg = TwistStamped()
        stamp_ns = self.node.get_clock().now().nanoseconds - int(age * 1e9)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = "us_probe"
        msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in lin)
        msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(v) for v in ang)
        self.gpub.publish(msg)

    def _pub_pose(self) -> None:
        if self.pose is None:
            return
        msg = PoseStamped()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id = self.pose_frame
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in self.pose)
        msg.pose.orientation.w = 1.0
        self.ppub.publish(msg)

    # -------------------------------------------------------------- test API
    def wait_ready(self, timeout_s: float = 10.0) -> None:
        ok = wait_for(lambda: self.enable_client.service_is_ready() and self.gpub.get_subscription_count() > 0
                      and self.ppub.get_subscription_count() > 0 and bool(self.status), timeout_s)
        assert ok, "servo node not discovered"

    def enable(self, on: bool = True, timeout_s: float = WAIT_S) -> SetBool.Response:
        """Call ~/enable; while the harness publishes poses, retry until the servo has one."""
        deadline = time.monotonic() + timeout_s
        while True:
            fut = self.enable_client.call_async(SetBool.Request(data=on))
            assert wait_for(fut.done, 5.0), "~/enable did not answer"
            resp = fut.result()
            if (resp.success or not on or self.pose is None or self.pose_frame != "panda_link0"
                    or "no fresh probe pose" not in resp.message or time.monotonic() > deadline):
                return resp
            time.sleep(0.05)  # the first poses are still on their way

    def set_params(self, **params: object) -> list:
        req = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in params.items()])
        assert wait_for(self.param_client.service_is_ready, 5.0)
        fut = self.param_client.call_async(req)
        assert wait_for(fut.done, 5.0)
        return list(fut.result().results)

    def commands(self, since: float = 0.0) -> list[Cmd]:
        with self.lock:
            return [c for c in self.cmds if c.recv_s >= since]

    def last_status(self) -> dict:
        with self.lock:
            return self.status[-1]

    def wait_state(self, state: str, timeout_s: float = WAIT_S) -> bool:
        return wait_for(lambda: self.status and self.last_status()["state"] == state, timeout_s)

    def wait_cmd(self, pred: Callable[[Cmd], bool], since: float = 0.0, timeout_s: float = WAIT_S) -> bool:
        """Wait until the latest command (received after ``since``) satisfies ``pred``."""
        def ok() -> bool:
            cmds = self.commands(since)
            return bool(cmds) and pred(cmds[-1])
        return wait_for(ok, timeout_s)

    def wait_counter(self, name: str, at_least: int, timeout_s: float = WAIT_S) -> bool:
        return wait_for(lambda: self.status and self.last_status()["counters"][name] >= at_least, timeout_s)

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


def wait_for(pred: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def assert_limits(cmds: list[Cmd], max_lin: float = MAX_LIN, max_ang: float = MAX_ANG,
                  acc_lin: float = ACC_LIN, acc_ang: float = ACC_ANG, skip_final_zero: bool = False) -> None:
    """Finite, within the speed limits, and no velocity step between consecutive commands."""
    assert cmds
    for c in cmds:
        assert np.all(np.isfinite(c.lin)) and np.all(np.isfinite(c.ang))
        assert np.linalg.norm(c.lin) <= max_lin + 1e-9
        assert np.linalg.norm(c.ang) <= max_ang + 1e-9
    for a, b in zip(cmds, cmds[1:], strict=False):
        if skip_final_zero and b is cmds[-1] and b.is_zero:
            continue
        dt = b.stamp_s - a.stamp_s
        assert dt > 0
        assert np.linalg.norm(b.lin - a.lin) <= acc_lin * dt + 1e-6, (a, b)
        assert np.linalg.norm(b.ang - a.ang) <= acc_ang * dt + 1e-6, (a, b)


@contextmanager
def servo_in_process(**params: object) -> Iterator[Harness]:
    """The servo node in its own context/executor thread, plus a connected harness."""
    ctx = Context()
    rclpy.init(context=ctx)
    overrides = [Parameter(k, value=v) for k, v in {**FAST, **params}.items()]
    node = ServoNode(context=ctx, parameter_overrides=overrides)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    h = Harness()
    try:
        h.wait_ready()
        yield h
    finally:
        h.close()
        ex.shutdown()
        th.join(timeout=5.0)
        node.destroy_node()
        rclpy.shutdown(context=ctx)


@pytest.fixture
def servo() -> Iterator[Harness]:
    with servo_in_process() as h:
        yield h


# ----------------------------------------------------------------------------- tests


def at_max(c: Cmd, max_lin: float = MAX_LIN) -> bool:
    return bool(np.linalg.norm(c.lin) == pytest.approx(max_lin, rel=1e-6))


def test_disabled_at_start_then_enable_with_speed_and_accel_limits(servo: Harness) -> None:
    h = servo
    h.guidance = ([0.3, -0.4, 0.0], [0.0, 0.0, 2.0], 0.0)
    time.sleep(0.5)
    assert h.commands() == [], "commands while disabled"
    assert h.last_status()["state"] == "disabled" and not h.last_status()["enabled"]
    t0 = time.monotonic()
    resp = h.enable()
    assert resp.success, resp.message
    assert h.wait_cmd(lambda c: at_max(c) and np.linalg.norm(c.ang) == pytest.approx(MAX_ANG, rel=1e-6), t0)
    cmds = h.commands(t0)
    assert len(cmds) > 20
    assert all(c.frame == "us_probe" for c in cmds)
    assert abs(cmds[-1].stamp_s - h._now()) < 2.0           # stamped now, not the guidance stamp
    assert np.linalg.norm(cmds[0].lin) <= 2 * 0.01 * ACC_LIN + 1e-9  # starts from rest (dt capped at 2 periods)
    assert_limits(cmds)
    last = cmds[-1]
    assert np.allclose(last.lin / np.linalg.norm(last.lin), [0.6, -0.8, 0.0])
    assert h.wait_state("active")


def test_disable_sends_zero_then_silence(servo: Harness) -> None:
    h = servo
    h.guidance = ([0.1, 0.0, 0.0], [0.3, 0.0, 0.0], 0.0)
    assert h.enable().success
    assert h.wait_cmd(lambda c: not c.is_zero)
    assert h.enable(False).success
    assert h.wait_cmd(lambda c: c.is_zero)
    assert h.wait_state("disabled")
    n = len(h.commands())
    time.sleep(0.3)
    assert len(h.commands()) == n, "commands after disable"
    assert h.last_status()["state"] == "disabled"


def test_timeout_ramps_to_zero(servo: Harness) -> None:
    h = servo
    h.guidance = ([0.1, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
    assert h.enable().success
    assert h.wait_cmd(at_max)
    h.guidance = None
    t_stop = time.monotonic()
    assert h.wait_state("timeout")
    assert h.wait_cmd(lambda c: c.is_zero, t_stop)
    cmds = h.commands(t_stop)
    assert_limits(h.commands())                               # the ramp honours the accel limit
    ramp = [c for c in cmds if 0 < np.linalg.norm(c.lin) < MAX_LIN - 1e-9]
    assert len(ramp) >= 20, "stopped with a step instead of a ramp"
    assert h.wait_counter("timeouts", 1)


def test_bad_guidance_never_reaches_the_output(servo: Harness) -> None:
    h = servo
    nan, inf = float("nan"), float("inf")

    def alternating(k: int) -> tuple[list[float], list[float]]:
        return ([nan, 0.0, 0.0], [0.0, inf, 0.0]) if k % 2 else ([0.05, 0.0, 0.0], [0.0, 0.0, 0.1])

    h.guidance_fn = alternating
    assert h.enable().success
    assert h.wait_counter("rejected_nonfinite", 5)
    assert h.wait_cmd(lambda c: not c.is_zero)
    h.guidance_fn = None
    h.guidance = ([0.05, 0.0, 0.0], [0.0, 0.0, 0.0], 10.0)     # stamped 10 s ago: stale
    assert h.wait_counter("rejected_stale", 5)
    assert h.wait_state("timeout")
    assert h.wait_cmd(lambda c: c.is_zero)
    cmds = h.commands()
    assert_limits(cmds)
    assert any(not c.is_zero for c in cmds)


def test_workspace_limit_stops_until_reenabled(servo: Harness) -> None:
    h = servo
    h.guidance = ([0.1, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
    assert h.enable().success
    assert h.wait_cmd(lambda c: not c.is_zero)
    h.pose = [0.3 + 0.08, 0.0, 0.4]                           # 80 mm > max_travel_m 50 mm
    assert h.wait_state("workspace")
    assert "workspace" in h.last_status()["reason"]
    assert h.wait_cmd(lambda c: c.is_zero)
    n = len(h.commands())
    h.pose = [0.3, 0.0, 0.4]                                  # back inside: still stopped
    time.sleep(0.4)
    assert len(h.commands()) == n and h.last_status()["state"] == "workspace"
    t0 = time.monotonic()
    assert h.enable().success                                 # re-enable resumes
    assert h.wait_cmd(lambda c: not c.is_zero, t0)


def test_reenable_while_active_keeps_the_workspace_anchor(servo: Harness) -> None:
    """Issue 14: a client re-asserting ~/enable true must not move the workspace limit."""
    h = servo
    h.guidance = ([0.1, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
    assert h.enable().success
    assert h.wait_cmd(lambda c: not c.is_zero)
    h.pose = [0.3 + 0.04, 0.0, 0.4]                           # 40 mm of 50
    assert wait_for(lambda: h.last_status()["travel_m"] == pytest.approx(0.04, abs=1e-6), WAIT_S)
    resp = h.enable()                                         # re-asserted while active
    assert resp.success and "anchor kept" in resp.message
    assert h.last_status()["travel_m"] == pytest.approx(0.04, abs=1e-6)
    h.pose = [0.3 + 0.08, 0.0, 0.4]                           # 80 mm from the enable pose
    assert h.wait_state("workspace")
    assert h.last_status()["travel_m"] == pytest.approx(0.08, abs=1e-6)
    assert h.wait_cmd(lambda c: c.is_zero)


def test_pose_in_another_frame_is_rejected(servo: Harness) -> None:
    """Issue 14: probe_pose not in base_frame must neither anchor nor feed the workspace check."""
    h = servo
    h.guidance = ([0.1, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
    h.pose_frame = "world"
    assert h.wait_counter("poses_rejected", 5)
    time.sleep(1.2)                                           # > probe_pose_timeout_s: no fresh pose left
    resp = h.enable()
    assert not resp.success and "pose" in resp.message
    assert h.commands() == []
    h.pose_frame = "panda_link0"                              # right frame: enable works
    assert h.enable().success
    assert h.wait_cmd(lambda c: not c.is_zero)
    h.pose_frame = ""                                         # no frame at all: rejected -> pose watchdog
    assert h.wait_state("fault")
    assert "pose" in h.last_status()["reason"]
    assert h.wait_cmd(lambda c: c.is_zero)


def test_frame_target_estimates_are_taken_in_base_frame_only(servo: Harness) -> None:
    """frame_target_pose (guidance_node's per-frame target estimates, read by the survey with survey_gate
    frame_target): taken in base_frame, counted; in another frame or not a pose: rejected and counted."""
    h = servo
    pub = h.node.create_publisher(PoseStamped, "frame_target_pose", 10)
    assert wait_for(lambda: pub.get_subscription_count() > 0, 5.0)
    before = h.last_status()["counters"]

    def send(frame: str, w: float = 1.0) -> None:
        msg = PoseStamped()
        msg.header.stamp = h.node.get_clock().now().to_msg()
        msg.header.frame_id = frame
        msg.pose.position.x, msg.pose.position.z = 0.3, 0.4
        msg.pose.orientation.w = w
        pub.publish(msg)

    for _ in range(3):
        send("panda_link0")
    assert h.wait_counter("frame_targets", before["frame_targets"] + 3)
    send("world")
    send("panda_link0", w=0.0)   # a zero quaternion is not a rotation
    assert h.wait_counter("rejected_other", before["rejected_other"] + 2)
    assert h.last_status()["counters"]["frame_targets"] == before["frame_targets"] + 3
    h.node.destroy_publisher(pub)


def test_pose_watchdog_and_enable_without_pose(servo: Harness) -> None:
    h = servo
    h.guidance = ([0.1, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
    assert h.enable().success
    assert h.wait_cmd(lambda c: not c.is_zero)
    h.pose = None
    assert h.wait_state("fault")
    assert "pose" in h.last_status()["reason"]
    assert h.wait_cmd(lambda c: c.is_zero)
    resp = h.enable()
    assert not resp.success and "pose" in resp.message


def test_convergence_reports_plane_reached(servo: Harness) -> None:
    h = servo
    h.guidance = ([0.001, 0.0, 0.0], [0.0, 0.01, 0.0], 0.0)    # within 3 mm / 0.05 rad
    assert h.enable().success
    assert h.wait_state("converged")
    assert "plane reached" in h.last_status()["reason"]
    assert wait_for(lambda: h.reached and h.reached[-1], WAIT_S)
    assert h.wait_cmd(lambda c: c.is_zero)
    h.guidance = ([0.03, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)     # beyond the hysteresis band: resumes
    assert h.wait_state("active")
    assert wait_for(lambda: h.reached[-1] is False, WAIT_S)


def test_disable_withdraws_plane_reached(servo: Harness) -> None:
    """~/plane_reached is latched: after a disable it must not keep saying true to late joiners."""
    h = servo
    h.guidance = ([0.001, 0.0, 0.0], [0.0, 0.01, 0.0], 0.0)
    assert h.enable().success
    assert wait_for(lambda: h.reached and h.reached[-1], WAIT_S)
    assert h.enable(False).success
    assert wait_for(lambda: h.reached[-1] is False, WAIT_S)


def test_confidence_gate_pauses_motion(servo: Harness) -> None:
    h = servo
    h.guidance = ([0.05, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
    assert h.enable().success
    assert h.wait_cmd(lambda c: not c.is_zero)
    h.guidance = None
    h.guidance_fn = lambda k: ([0.05 if k % 2 else -0.05, 0.0, 0.0], [0.0, 0.0, 0.0])
    assert h.wait_state("paused")
    assert h.wait_cmd(lambda c: c.is_zero)
    assert h.last_status()["state"] == "paused"
    h.guidance_fn = None
    h.guidance = ([-0.05, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)    # consistent again: resumes
    assert h.wait_state("active")
    assert h.wait_cmd(lambda c: c.lin[0] < 0)
    assert_limits(h.commands())
    assert h.last_status()["counters"]["gate_pauses"] >= 1


def test_lowpass_filter_smooths_guidance() -> None:
    with servo_in_process(filter_tau_s=0.3, max_linear_speed_mps=0.5, max_linear_accel_mps2=5.0,
                          gate_jump_linear_m=0.0) as h:
        h.guidance = ([0.01, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
        assert h.enable().success
        assert h.wait_cmd(lambda c: c.lin[0] == pytest.approx(0.01, abs=1e-6))
        t0 = time.monotonic()
        h.guidance = ([0.03, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
        assert h.wait_cmd(lambda c: c.lin[0] == pytest.approx(0.03, abs=1e-3), t0)
        x = np.array([c.lin[0] for c in h.commands(t0)])
        assert np.all(np.diff(x) >= -1e-9)                     # monotonic approach
        between = np.count_nonzero((x > 0.012) & (x < 0.028))
        assert between >= 20, f"only {between} intermediate commands: the step was not smoothed"
        assert_limits(h.commands(), max_lin=0.5, acc_lin=5.0)


def test_parameters_validated_and_applied(servo: Harness) -> None:
    h = servo
    bad = h.set_params(max_linear_speed_mps=-0.1)
    assert not bad[0].successful
    assert not h.set_params(stop_mode="coast")[0].successful
    assert not h.set_params(control_rate_hz=50.0)[0].successful  # read-only
    assert not h.set_params(base_frame="world")[0].successful    # read-only
    assert not h.set_params(converge_release_factor=0.5)[0].successful
    assert not h.set_params(survey_gate="fused")[0].successful      # guidance | frame_target
    assert h.set_params(survey_gate="frame_target")[0].successful
    assert h.set_params(survey_gate="guidance")[0].successful
    assert h.set_params(survey_pool=True)[0].successful
    assert not h.set_params(survey_pool="yes")[0].successful      # a bool parameter
    assert h.set_params(survey_reached_m=0.0005, survey_reached_rad=0.0087)[0].successful
    assert not h.set_params(survey_reached_m=0.05)[0].successful  # beyond its 0-0.01 m range
    assert h.set_params(max_linear_speed_mps=0.01)[0].successful
    h.guidance = ([0.1, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0)
    assert h.enable().success
    assert h.wait_cmd(lambda c: at_max(c, 0.01))
    assert_limits(h.commands(), max_lin=0.01)


def test_status_and_diagnostics(servo: Harness) -> None:
    h = servo
    assert wait_for(lambda: any(s.name == "copilot_servo: servo" for d in h.diags for s in d.status), WAIT_S)
    with h.lock:
        st = next(s for d in h.diags for s in d.status if s.name == "copilot_servo: servo")
    keys = {kv.key for kv in st.values}
    assert {"state", "reason", "linear_mps", "angular_rps", "rejected_nonfinite", "commands"} <= keys
    s = h.last_status()
    assert {"state", "reason", "enabled", "counters", "travel_m"} <= set(s)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, "SIGINTx2"], ids=["SIGINT", "SIGTERM", "SIGINTx2"])
def test_shutdown_sends_zero_and_topic_is_remappable(sig: int | str, tmp_path) -> None:
    """Child process with config/servo.yaml (+ fast overrides) and the command topic remapped."""
    params_file = str(Path(__file__).resolve().parent.parent / "config" / "servo.yaml")
    proc = NodeProcess("cardiac_copilot_ros.nodes.servo_node", params=dict(FAST),
                       remaps={"servo_node/delta_twist_cmds": "/arm/twist_cmds"},
                       extra_args=["--ros-args", "--params-file", params_file],
                       log_path=tmp_path / "servo.log")
    with proc:
        h = Harness(cmd_topic="/arm/twist_cmds")
        try:
            h.wait_ready(20.0)
            h.guidance = ([0.1, 0.0, 0.0], [0.0, 0.0, 0.5], 0.0)
            assert h.enable().success
            assert wait_for(lambda: len(h.commands()) > 20, WAIT_S)
            assert not h.commands()[-1].is_zero
            if sig == "SIGINTx2":  # ros2 launch on Ctrl-C: the terminal's process group, then its forward
                proc.proc.send_signal(signal.SIGINT)
                time.sleep(0.02)
                sig = signal.SIGINT
            rc = proc.stop(sig)
            h.wait_cmd(lambda c: c.is_zero, timeout_s=5.0)    # the zero twist, if sent, is delivered
            log = (tmp_path / "servo.log").read_text()
            assert rc == 0, log
            cmds = h.commands()
            assert cmds[-1].is_zero, log
            assert not math.isnan(cmds[-1].lin[0])
            assert "zero twist sent" in log
        finally:
            h.close()


def test_oscillating_guidance_or_spread_target_is_never_reached(servo: Harness) -> None:
    """+-7 mm / +-0.12 rad alternating every message: never "plane reached", and ~/status says why;
    steady small guidance but a fused target whose frames disagree (target_pose_cov, 10 mm): not
    reached either; once target_pose_cov says 1 mm: reached."""
    from geometry_msgs.msg import PoseWithCovarianceStamped

    h = servo
    h.guidance_fn = lambda k: ([0.007 if k % 2 else -0.007, 0.0, 0.0], [0.12 if k % 2 else -0.12, 0.0, 0.0])
    assert h.enable().success
    assert wait_for(lambda: "not stable" in h.last_status()["reason"], 5.0), h.last_status()
    time.sleep(1.0)  # more than three hold times
    assert not any(h.reached) and h.last_status()["state"] != "converged"
    assert h.last_status()["guidance_spread_linear_m"] == pytest.approx(0.007, rel=0.1)

    cov_pub = h.node.create_publisher(PoseWithCovarianceStamped, "target_pose_cov", 10)
    spread = {"m": 0.010}

    def publish_cov() -> None:
        msg = PoseWithCovarianceStamped()
        msg.header.frame_id = "panda_link0"
        msg.pose.pose.orientation.w = 1.0
        var = spread["m"] ** 2 / 3.0
        msg.pose.covariance = [var if i in (0, 7, 14) else (1e-6 if i in (21, 28, 35) else 0.0) for i in range(36)]
        cov_pub.publish(msg)

    h.node.create_timer(1.0 / 30.0, publish_cov)
    h.guidance_fn = None
    h.guidance = ([0.001, 0.0, 0.0], [0.0, 0.01, 0.0], 0.0)
    assert wait_for(lambda: "fused target not stable" in h.last_status()["reason"], 5.0), h.last_status()
    time.sleep(1.0)
    assert not any(h.reached) and h.last_status()["target_spread_linear_m"] == pytest.approx(0.010, rel=1e-3)
    spread["m"] = 0.001
    assert h.wait_state("converged", 5.0), h.last_status()
    assert wait_for(lambda: h.reached and h.reached[-1], 2.0)
    assert "fused target spread 1.0 mm" in h.last_status()["reason"]
