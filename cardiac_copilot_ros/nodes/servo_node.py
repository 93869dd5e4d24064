"""servo_node: closes the loop from `guidance` to MoveIt Servo velocity commands, with safety.

Run as ``ros2 run cardiac_copilot_ros servo_node`` (node name ``copilot_servo``: MoveIt Servo's
own node is called ``servo_node``). Interfaces (see docs/SERVO.md):

* in  ``guidance`` geometry_msgs/TwistStamped (target position [m] and rotation vector [rad]
  in the probe frame, stamp = the image's stamp);
* in  ``probe_pose`` geometry_msgs/PoseStamped (workspace limit and pose watchdog);
* in  ``target_pose_cov`` geometry_msgs/PoseWithCovarianceStamped (optional: the guidance node's
  fused target and its spread; "plane reached" then also needs that spread within tolerance);
* in  ``frame_target_pose`` geometry_msgs/PoseStamped (optional: the guidance node's per-frame target
  estimates, read by the final-approach survey with ``survey_gate`` frame_target);
* out ``servo_node/delta_twist_cmds`` geometry_msgs/TwistStamped: m/s and rad/s in
  ``probe_frame``, stamped now (MoveIt Servo's ``~/delta_twist_cmds``, ``speed_units``);
* out ``~/status`` std_msgs/String (JSON), ``~/plane_reached`` std_msgs/Bool (latched),
  ``/diagnostics`` diagnostic_msgs/DiagnosticArray;
* service ``~/enable`` std_srvs/SetBool (disabled at start).

The control law and every safety behaviour live in :mod:`cardiac_copilot_ros.servo`; this
node only adapts messages, parameters, timers and signals.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from dataclasses import fields
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped, TwistStamped, Vector3
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from std_msgs.msg import Bool, String
from std_srvs.srv import SetBool

from ..final_approach import SURVEY_READS
from ..servo import (
    STOP_MODES,
    Guidance,
    ProbePose,
    ServoCommand,
    ServoConfig,
    ServoController,
    ServoState,
)
from .conversions import MessageError, ns_to_stamp, pose_stamped_to_matrix, stamp_to_ns
from .lifecycle import spin_node

NODE_NAME = "copilot_servo"
#: Default command topic: relative, so it resolves to /<ns>/servo_node/delta_twist_cmds.
COMMAND_TOPIC = "servo_node/delta_twist_cmds"

# name -> (description, range (lo, hi) or None). Units are in the names and descriptions.
_PARAMS: dict[str, tuple[str, tuple[float, float] | None]] = {
    "gain_linear": ("Linear gain [1/s]: linear command [m/s] = gain * filtered target position [m].",
                    (0.0, 10.0)),
    "gain_angular": ("Angular gain [1/s]: angular command [rad/s] = gain * filtered rotation vector [rad].",
                     (0.0, 10.0)),
    "max_linear_speed_mps": ("Linear speed limit [m/s] (the vector is scaled, its direction kept).",
                             (0.0, 0.5)),
    "max_angular_speed_rps": ("Angular speed limit [rad/s].", (0.0, 3.0)),
    "max_linear_accel_mps2": ("Linear acceleration limit [m/s^2]: bound on the change between "
                              "consecutive commands divided by the control period.", (0.0, 5.0)),
    "max_angular_accel_rps2": ("Angular acceleration limit [rad/s^2].", (0.0, 30.0)),
    "control_rate_hz": ("Command publishing rate [Hz], independent of the guidance rate (read-only).",
                        (1.0, 1000.0)),
    "filter_tau_s": ("Time constant [s] of the first-order low-pass on the guidance; 0 = off.", (0.0, 10.0)),
    "guidance_timeout_s": ("No guidance received for this long [s] -> ramp to zero.", (0.0, 10.0)),
    "max_guidance_age_s": ("Reject guidance whose header stamp differs from now by more than this [s]; "
                           "0 = no check.", (0.0, 10.0)),
    "stop_mode": ("On disable and on latched stops (workspace, pose watchdog): 'immediate' zero twist "
                  "or 'ramp' down within the acceleration limits, then zero.", None),
    "max_travel_m": ("Workspace limit: largest distance [m] from the probe position at enable time.",
                     (0.0, 1.0)),
    "max_rotation_rad": ("Workspace limit: largest rotation [rad] from the probe orientation at enable time.",
                         (0.0, math.pi)),
    "require_probe_pose": ("Require a fresh probe_pose to enable and while enabled (pose watchdog).", None),
    "probe_pose_timeout_s": ("Pose watchdog: no probe_pose for this long [s] while enabled -> fault stop.",
                             (0.0, 10.0)),
    "converge_linear_m": ("Convergence tolerance on the target distance [m].", (0.0, 0.1)),
    "converge_angular_rad": ("Convergence tolerance on the target rotation angle [rad].", (0.0, 1.0)),
    "converge_hold_s": ("Within tolerance for this long [s] -> stop, 'plane reached'.", (0.0, 60.0)),
    "converge_release_factor": ("Hysteresis: leave 'plane reached' when the guidance exceeds this factor "
                                "times the tolerance.", (1.0, 10.0)),
    "converge_latch": ("Stay stopped after 'plane reached' until re-enabled (ignores the hysteresis).", None),
    "gate_jump_linear_m": ("Confidence gate: a jump [m] of the target position between consecutive "
                           "guidance messages beyond this pauses motion; 0 = off.", (0.0, 1.0)),
    "gate_jump_angular_rad": ("Confidence gate: a jump [rad] of the rotation vector between consecutive "
                              "guidance messages beyond this pauses motion; 0 = off.", (0.0, math.pi)),
    "gate_settle_frames": ("Consecutive consistent guidance messages that reopen the gate.", (1, 100)),
    "converge_spread_linear_m": ("'Plane reached' also needs stable guidance: spread (std, all axes) of the raw "
                                 "guidance target position [m] over the hold below this; 0 = no check.", (0.0, 0.1)),
    "converge_spread_angular_rad": ("Stable guidance: spread of the raw guidance rotation vector [rad] over the "
                                    "hold below this; 0 = no check.", (0.0, 1.0)),
    "converge_min_samples": ("Guidance messages needed within the hold for the stability check.", (2, 10000)),
    "converge_target_spread_m": ("'Plane reached' also needs the fused target's spread [m] (from target_pose_cov, "
                                 "when published) below this; 0 = no check.", (0.0, 0.1)),
    "converge_target_spread_rad": ("Fused target spread [rad] (from target_pose_cov) below this; 0 = no check.",
                                   (0.0, 1.0)),
    "verify_step_m": ("Final-approach check before the first 'plane reached': step this far [m] sideways (probe x) "
                      "and check that the target the guidance implies stands still; 0 = off.", (0.0, 0.05)),
    "verify_tolerance_m": ("Final-approach check: largest move [m] of the implied target over the step.",
                           (0.0, 0.05)),
    "verify_tolerance_rad": ("Final-approach check: largest rotation [rad] of the implied target over the step.",
                             (0.0, 1.0)),
    "verify_settle_s": ("Final-approach check: hold still this long [s] after the step before reading the "
                        "guidance.", (0.0, 10.0)),
    "verify_attempts": ("Final-approach checks per enable; after this many failures: not reached.", (1, 100)),
    "survey_poses": ("Final-approach survey before 'plane reached' (replaces the check above): read the target "
                     "the guidance implies at this many poses around the resting pose (0 = off, or 4, 8, 12), then "
                     "servo to their robust mean and hold it.", (0, 12)),
    "survey_step_m": ("Survey: offset [m] of each pose along probe x and y (z: a third of it).", (0.0, 0.02)),
    "survey_step_rad": ("Survey: offset [rad] of each pose about each probe axis.", (0.0, 0.35)),
    "survey_settle_s": ("Survey: hold still this long [s] at each pose before reading the guidance.", (0.0, 10.0)),
    "survey_read_s": ("Survey: read the guidance this long [s] at each pose.", (0.0, 10.0)),
    "survey_gain": ("Survey: gain [1/s] of the moves between poses and to the surveyed target (speed limits "
                    "apply).", (0.0, 10.0)),
    "survey_arrive_m": ("Survey: a pose counts as reached within this [m] of it (the guidance is read at the "
                        "pose actually reached).", (0.0001, 0.01)),
    "survey_arrive_rad": ("Survey: ... and within this [rad].", (0.001, 0.2)),
    "survey_tolerance_m": ("Survey: 'plane reached' only if the per-pose target estimates scatter less than "
                           "this [m] (root mean square about their mean).", (0.0, 0.05)),
    "survey_tolerance_rad": ("Survey: ... and less than this [rad].", (0.0, 1.0)),
    "survey_gate": ("Survey: whose scatter decides 'plane reached': 'guidance' (the targets the guidance implies "
                    "at the poses) or 'frame_target' (guidance_node's per-frame estimates on frame_target_pose, "
                    "before fusion: they disagree where the model is wrong).", None),
    "survey_attempts": ("Surveys per enable (each around the last surveyed target); then hold there, "
                        "not reached.", (1, 100)),
    "survey_reached_m": ("Survey: after a passed survey, 'plane reached' once the probe is within this [m] of the "
                         "surveyed target (0 = converge_linear_m).", (0.0, 0.01)),
    "survey_reached_rad": ("Survey: ... and within this [rad] (0 = converge_angular_rad).", (0.0, 0.2)),
    "survey_pool": ("Survey: a repeated survey is judged, and its target taken, over the estimates of all the "
                    "surveys since convergence (the first survey's and its own), not its own only.", None),
    "survey_release_m": ("While holding the surveyed target: the guidance's target farther than this [m] from "
                         "it (the patient or the plane moved) -> follow the guidance again.", (0.0, 0.1)),
    "survey_release_rad": ("... or rotated more than this [rad] from it.", (0.0, math.pi)),
}
_READ_ONLY = {"control_rate_hz", "status_period_s", "probe_frame", "base_frame"}


def _vec(v: Any) -> np.ndarray:
    return np.array([v.x, v.y, v.z], dtype=np.float64)


def _to_vector3(v: np.ndarray) -> Vector3:
    return Vector3(x=float(v[0]), y=float(v[1]), z=float(v[2]))


class ServoNode(Node):
    """Guidance -> MoveIt Servo twist commands behind an enable switch, limits and watchdogs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        defaults = ServoConfig()
        for f in fields(ServoConfig):
            desc, rng = _PARAMS[f.name]
            value = getattr(defaults, f.name)
            d = ParameterDescriptor(description=desc, read_only=f.name in _READ_ONLY)
            if f.name == "stop_mode":
                d.additional_constraints = f"one of {', '.join(STOP_MODES)}"
            elif f.name == "survey_gate":
                d.additional_constraints = f"one of {', '.join(SURVEY_READS)}"
            elif rng is not None and isinstance(value, int) and not isinstance(value, bool):
                d.integer_range = [IntegerRange(from_value=int(rng[0]), to_value=int(rng[1]), step=1)]
            elif rng is not None:
                d.floating_point_range = [FloatingPointRange(from_value=float(rng[0]),
                                                             to_value=float(rng[1]), step=0.0)]
            self.declare_parameter(f.name, value, d)
        self.declare_parameter("probe_frame", "us_probe", ParameterDescriptor(
            description="Frame of the guidance and of the commands (the probe frame).", read_only=True))
        self.declare_parameter("base_frame", "panda_link0", ParameterDescriptor(
            description="Frame of probe_pose (robot base / tracker); poses in any other frame, or with "
                        "no frame_id, are rejected (counted in poses_rejected; the pose watchdog applies).",
            read_only=True))
        self.declare_parameter("status_period_s", 1.0, ParameterDescriptor(
            description="Period [s] of the status and /diagnostics messages (also sent on each change).",
            read_only=True, floating_point_range=[FloatingPointRange(from_value=0.05, to_value=60.0)]))

        config = ServoConfig(**{f.name: self.get_parameter(f.name).value for f in fields(ServoConfig)})
        self._ctl = ServoController(config)  # raises ValueError with the bad field's name
        self._probe_frame = str(self.get_parameter("probe_frame").value)
        self._base_frame = str(self.get_parameter("base_frame").value)
        self._lock = threading.Lock()
        self._last_status_key: tuple[str, bool] | None = None
        self._sent_nonzero = False
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._cmd_pub = self.create_publisher(TwistStamped, COMMAND_TOPIC, 10)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._status_pub = self.create_publisher(
            String, "~/status", QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self._reached_pub = self.create_publisher(Bool, "~/plane_reached", latched)
        self._reached_published = False   # the latched value last published on ~/plane_reached
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(TwistStamped, "guidance", self._on_guidance, qos_profile_sensor_data)
        self.create_subscription(PoseStamped, "probe_pose", self._on_pose, qos_profile_sensor_data)
        self.create_subscription(PoseWithCovarianceStamped, "target_pose_cov", self._on_target_cov, 10)
        self.create_subscription(PoseStamped, "frame_target_pose", self._on_frame_target, qos_profile_sensor_data)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self._timer = self.create_timer(config.control_period_s, self._on_timer)
        self._status_timer = self.create_timer(float(self.get_parameter("status_period_s").value),
                                               self._on_status_timer)
        self._reached_pub.publish(Bool(data=False))
        self._publish_status()
        self.get_logger().info(
            f"servo ready, DISABLED (call {self.resolve_service_name('~/enable')}); commands on "
            f"{self._cmd_pub.topic_name} at {config.control_rate_hz:g} Hz, limits "
            f"{config.max_linear_speed_mps:g} m/s, {config.max_angular_speed_rps:g} rad/s")

    # ------------------------------------------------------------------ time and parameters
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _now_s(self) -> float:
        return self._now_ns() * 1e-9

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        names = {f.name for f in fields(ServoConfig)}
        changes = {p.name: p.value for p in params if p.name in names}
        if not changes:
            return SetParametersResult(successful=True)
        try:
            with self._lock:
                new = self._ctl.config.updated(**changes)
                self._ctl.configure(new)
        except (ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.get_logger().info(f"servo parameters updated: {changes}")
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ inputs
    def _on_guidance(self, msg: TwistStamped) -> None:
        now = self._now_s()
        frame = msg.header.frame_id
        if frame and frame != self._probe_frame:
            with self._lock:
                self._ctl.counters.rejected_other += 1
            self.get_logger().warning(f"guidance in frame '{frame}', expected '{self._probe_frame}': ignored",
                                      throttle_duration_sec=2.0)
            return
        g = Guidance(_vec(msg.twist.linear), _vec(msg.twist.angular), stamp_to_ns(msg.header.stamp) * 1e-9)
        with self._lock:
            ok = self._ctl.set_guidance(now, g)
        if not ok:
            self.get_logger().warning("guidance rejected (non-finite, or stamp older than max_guidance_age_s)",
                                      throttle_duration_sec=2.0)

    def _base_frame_pose(self, msg: PoseStamped) -> tuple[int, np.ndarray] | str:
        """(stamp ns, 4x4 mm) of a pose in ``base_frame``, or why it is rejected (another or no frame: it
        would anchor and check the workspace in the wrong frame; not a finite pose)."""
        frame = msg.header.frame_id
        if frame.lstrip("/") != self._base_frame.lstrip("/"):
            return f"in frame {frame!r}, expected {self._base_frame!r}"
        try:
            return pose_stamped_to_matrix(msg)
        except MessageError as exc:
            return str(exc)

    def _on_pose(self, msg: PoseStamped) -> None:
        now = self._now_s()
        pose = self._base_frame_pose(msg)
        if isinstance(pose, str):   # rejected like a missing pose (the pose watchdog stops the servo)
            with self._lock:
                self._ctl.counters.poses_rejected += 1
            self.get_logger().warning(f"probe_pose rejected: {pose}", throttle_duration_sec=2.0)
            return
        stamp_ns, T_mm = pose
        with self._lock:
            self._ctl.set_probe_pose(now, ProbePose(T_mm, stamp_ns * 1e-9))

    def _on_target_cov(self, msg: PoseWithCovarianceStamped) -> None:
        """The guidance node's fused target spread: total std of translation [m] and rotation [rad]."""
        cov = np.asarray(msg.pose.covariance, dtype=np.float64)
        if cov.shape != (36,) or not np.all(np.isfinite(cov)):
            lin = ang = math.inf  # not known: "plane reached" waits
        else:
            d = np.clip(np.diag(cov.reshape(6, 6)), 0.0, None)
            lin, ang = float(np.sqrt(d[:3].sum())), float(np.sqrt(d[3:].sum()))
        with self._lock:
            self._ctl.set_target_spread(self._now_s(), lin, ang)

    def _on_frame_target(self, msg: PoseStamped) -> None:
        """guidance_node's per-frame target estimate (base frame): the survey's reads with survey_gate
        frame_target."""
        pose = self._base_frame_pose(msg)
        with self._lock:
            if isinstance(pose, str):
                self._ctl.counters.rejected_other += 1
                ok = False
            else:
                ok = self._ctl.set_frame_target(self._now_s(), pose[1])   # counts its own rejections
        if not ok:
            why = pose if isinstance(pose, str) else "not a finite rigid pose"
            self.get_logger().warning(f"frame_target_pose rejected: {why}", throttle_duration_sec=2.0)

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        now_ns = self._now_ns()
        cmd = None
        with self._lock:
            if request.data:
                ok, message = self._ctl.enable(now_ns * 1e-9)
            else:
                cmd = self._ctl.disable(now_ns * 1e-9)
                ok, message = True, "disabled"
        if cmd is not None:
            self._publish_command(cmd, now_ns)
            if self._reached_published:   # disabled: the latched "reached" no longer holds
                self._publish_reached(False)
        response.success, response.message = ok, message
        if ok:
            self.get_logger().info(f"~/enable {request.data}: {message}")
        else:
            self.get_logger().warning(f"~/enable {request.data} refused: {message}")
        self._publish_status()
        return response

    # ------------------------------------------------------------------ outputs
    def _on_timer(self) -> None:
        now_ns = self._now_ns()
        with self._lock:
            cmd = self._ctl.step(now_ns * 1e-9)
        self._emit(cmd, now_ns)

    def _emit(self, cmd: ServoCommand, now_ns: int) -> None:
        if cmd.publish:
            self._publish_command(cmd, now_ns)
        for event in cmd.events:
            self._publish_reached(event == "plane_reached")
            self.get_logger().info("plane reached" if event == "plane_reached" else "left the plane: resuming")
        key = (cmd.state.value, self._ctl.enabled)
        if key != self._last_status_key or cmd.events:
            if cmd.state in (ServoState.WORKSPACE, ServoState.FAULT):
                self.get_logger().error(cmd.reason)
            self._publish_status()

    def _publish_reached(self, reached: bool) -> None:
        self._reached_published = bool(reached)
        self._reached_pub.publish(Bool(data=bool(reached)))

    def _publish_command(self, cmd: ServoCommand, now_ns: int | None = None) -> None:
        """Publish ``cmd`` stamped ``now_ns`` (the time the controller computed it) or now."""
        lin, ang = cmd.linear_mps, cmd.angular_rps
        if not (np.all(np.isfinite(lin)) and np.all(np.isfinite(ang))):  # never reached: belt and braces
            self.get_logger().error("non-finite command suppressed; sending zero")
            lin, ang = np.zeros(3), np.zeros(3)
        msg = TwistStamped()
        msg.header.stamp = ns_to_stamp(self._now_ns() if now_ns is None else now_ns)
        msg.header.frame_id = self._probe_frame
        msg.twist.linear, msg.twist.angular = _to_vector3(lin), _to_vector3(ang)
        self._cmd_pub.publish(msg)
        self._sent_nonzero = bool(np.any(lin) or np.any(ang))

    def _status_dict(self) -> dict[str, Any]:
        with self._lock:
            status = self._ctl.status()
        status["node"] = self.get_fully_qualified_name()
        return status

    def _publish_status(self) -> None:
        status = self._status_dict()
        self._last_status_key = (str(status["state"]), bool(status["enabled"]))
        self._status_pub.publish(String(data=json.dumps(status, sort_keys=True)))

    def _on_status_timer(self) -> None:
        status = self._status_dict()
        self._status_pub.publish(String(data=json.dumps(status, sort_keys=True)))
        state = ServoState(status["state"])
        level = {ServoState.WORKSPACE: DiagnosticStatus.ERROR, ServoState.FAULT: DiagnosticStatus.ERROR,
                 ServoState.TIMEOUT: DiagnosticStatus.WARN, ServoState.PAUSED: DiagnosticStatus.WARN}
        values = [KeyValue(key=k, value=str(v)) for k, v in status.items() if k != "counters"]
        values += [KeyValue(key=k, value=str(v)) for k, v in status["counters"].items()]
        diag = DiagnosticStatus(level=level.get(state, DiagnosticStatus.OK),
                                name=f"{self.get_name()}: servo", hardware_id=self._probe_frame,
                                message=f"{state.value}: {status['reason']}", values=values)
        arr = DiagnosticArray(status=[diag])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(arr)

    def stop_on_shutdown(self, timeout_s: float = 0.5) -> None:
        """Send the zero twist (if this node was commanding) and wait for it to be delivered."""
        with self._lock:
            was_commanding = self._ctl.enabled or self._sent_nonzero
            cmd = self._ctl.shutdown_command()
        if not was_commanding or not self.context.ok():
            return
        self._publish_command(cmd)
        self._publish_status()
        self._cmd_pub.wait_for_all_acked(Duration(seconds=timeout_s))
        self.get_logger().info("shutdown: zero twist sent")


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; the zero twist goes out before the context shuts down."""
    return spin_node(ServoNode, "servo_node", args, startup_errors=(ValueError,),
                     on_shutdown=ServoNode.stop_on_shutdown)


if __name__ == "__main__":
    sys.exit(main())
