"""scanner_sim_node: a simulated ultrasound machine and arm on a simulated subject.

Stands in for the hardware (docs/SIMULATOR.md):

* out ``image`` sensor_msgs/Image mono8 at ``image_rate_hz`` (stamp = simulated acquisition
  time; QoS reliable, keep last 5, so best-effort and reliable subscribers both connect);
* out ``probe_pose`` geometry_msgs/PoseStamped in ``base_frame`` (metres) at ``pose_rate_hz``
  on its own timer;
* out ``annotations`` std_msgs/String (replay mode: the demonstration's annotations);
* out ``~/true_target_pose`` geometry_msgs/PoseStamped: the true target of the current plane
  (ground truth for demo and benchmarks; reliable, transient local);
* in  ``servo_node/delta_twist_cmds`` geometry_msgs/TwistStamped (MoveIt Servo's input, so
  the simulator stands in for Servo + arm): linear m/s, angular rad/s in ``probe_frame``
  (``base_frame`` also accepted); commands older than ``cmd_timeout_s`` stop the probe;
* service ``~/reset`` std_srvs/Trigger: back to ``start_offset`` from the current target.

Setting ``start_offset`` (6 numbers: mm, mm, mm, deg, deg, deg from the target, pose =
target @ U(offset)) at run time teleports the probe; ``target_plane`` is changeable at run time.
``patient_offset`` (same units) is the subject's pose in ``base_frame``; setting it at run time
moves the patient (a simulated patient movement): the target moves in ``base_frame`` while the
arm holds the probe where it is in ``base_frame``, so the image changes.
With ``replay_bag`` set the node replays that bag's poses, images and annotations with fresh
stamps (commands are ignored).
"""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import numpy as np
from geometry_msgs.msg import PoseStamped, TwistStamped
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ..planes import UnknownPlaneError, parse_plane
from ..pose import action_to_matrix, rotvec_to_rotation
from ..runtime import LatestFrameWorker
from .conversions import gray_to_image_msg, matrix_to_pose_stamped
from .lifecycle import spin_node

NODE_NAME = "scanner_sim_node"
#: MoveIt Servo's command input, relative (resolves to /servo_node/delta_twist_cmds at the root).
COMMAND_TOPIC = "servo_node/delta_twist_cmds"
DEFAULT_START_OFFSET = [15.0, -10.0, 0.0, 8.0, -6.0, 10.0]

_READ_ONLY = ("subject_seed", "image_rate_hz", "pose_rate_hz", "image_size", "depth_mm", "sector_deg",
              "heartbeat", "base_frame", "probe_frame", "image_frame", "replay_bag")


def _frange(lo: float, hi: float) -> list[FloatingPointRange]:
    return [FloatingPointRange(from_value=lo, to_value=hi)]


def _sim_plane(value: str) -> str:
    """Canonical name of a view the simulator has; ValueError listing the simulated views."""
    from ..sim.phantom import sim_view

    return sim_view(parse_plane(value))


class ScannerSimNode(Node):
    """Simulated probe on a simulated subject, publishing like the real hardware."""

    def __init__(self) -> None:
        super().__init__(NODE_NAME)
        P = ParameterDescriptor
        self.declare_parameter("subject_seed", 0, P(
            description="Seed of the simulated subject (sim.phantom.make_subject); read-only.",
            read_only=True, integer_range=[IntegerRange(from_value=0, to_value=2**31 - 1, step=1)]))
        self.declare_parameter("target_plane", "PLAX", P(
            description="Standard plane whose true target is published and that start_offset and "
                        "~/reset refer to: PLAX, PSAX-AV, PSAX-MV or A4C (changeable at run time)."))
        self.declare_parameter("image_rate_hz", 30.0, P(
            description="Image rate [Hz] (read-only).", read_only=True, floating_point_range=_frange(1.0, 200.0)))
        self.declare_parameter("pose_rate_hz", 250.0, P(
            description="Probe pose rate [Hz] (read-only).", read_only=True,
            floating_point_range=_frange(1.0, 1000.0)))
        self.declare_parameter("image_size", 224, P(
            description="Square image side [px] (read-only).", read_only=True,
            integer_range=[IntegerRange(from_value=32, to_value=1024, step=1)]))
        self.declare_parameter("depth_mm", 160.0, P(
            description="Imaging depth [mm] (read-only).", read_only=True, floating_point_range=_frange(20.0, 400.0)))
        self.declare_parameter("sector_deg", 80.0, P(
            description="Sector opening angle [deg] (read-only).", read_only=True,
            floating_point_range=_frange(10.0, 150.0)))
        self.declare_parameter("heartbeat", True, P(
            description="Chambers contract over the cardiac cycle (read-only).", read_only=True))
        self.declare_parameter("start_offset", DEFAULT_START_OFFSET, P(
            description="Start pose as an action from the target [x, y, z mm, roll, pitch, yaw deg], "
                        "pose = target @ U(offset); setting it at run time teleports the probe."))
        self.declare_parameter("patient_offset", [0.0] * 6, P(
            description="The subject's pose in base_frame [x, y, z mm, roll, pitch, yaw deg]; setting it at run "
                        "time moves the patient: the target moves, the probe stays where it is in base_frame."))
        self.declare_parameter("base_frame", "panda_link0", P(description="Frame of probe_pose (read-only).",
                                                              read_only=True))
        self.declare_parameter("probe_frame", "us_probe", P(description="Probe frame (read-only).",
                                                            read_only=True))
        self.declare_parameter("image_frame", "us_image", P(description="frame_id of the images (read-only).",
                                                            read_only=True))
        self.declare_parameter("replay_bag", "", P(
            description="Path of a demonstration bag to replay (poses, images, annotations with fresh "
                        "stamps); empty = simulate live (read-only).", read_only=True))
        self.declare_parameter("replay_loop", True, P(
            description="Replay mode: start the bag again (after 1 s) when it ends."))
        self.declare_parameter("cmd_timeout_s", 0.2, P(
            description="A velocity command older than this [s] stops the probe.",
            floating_point_range=_frange(0.001, 10.0)))
        self.declare_parameter("max_linear_speed_mps", 0.1, P(
            description="Linear speed limit of the simulated arm [m/s].", floating_point_range=_frange(0.0, 1.0)))
        self.declare_parameter("max_angular_speed_rps", 1.0, P(
            description="Angular speed limit of the simulated arm [rad/s].",
            floating_point_range=_frange(0.0, 10.0)))

        gp = self.get_parameter
        try:
            self._plane = _sim_plane(gp("target_plane").value)
        except UnknownPlaneError as exc:
            raise ValueError(str(exc)) from exc
        self._offset = self._check_offset(gp("start_offset").value)
        self._P = action_to_matrix(self._check_offset(gp("patient_offset").value))  # base <- subject
        self._base = gp("base_frame").value
        self._probe = gp("probe_frame").value
        self._image_frame = gp("image_frame").value
        self._cmd_timeout_s = float(gp("cmd_timeout_s").value)
        self._max_lin = float(gp("max_linear_speed_mps").value)
        self._max_ang = float(gp("max_angular_speed_rps").value)

        from ..sim.phantom import make_subject
        from ..sim.render import Renderer

        seed = int(gp("subject_seed").value)
        replay = str(gp("replay_bag").value)
        if replay:  # the bag's own subject, when it is a simulator bag
            seed = int(_custom_data(Path(replay)).get("cardiac_copilot.sim.subject_seed", seed))
        self._subject = make_subject(seed)
        self._renderer = Renderer(self._subject, size=int(gp("image_size").value),
                                  depth_mm=float(gp("depth_mm").value), sector_deg=float(gp("sector_deg").value),
                                  heartbeat=bool(gp("heartbeat").value))
        self._lock = threading.Lock()
        self._T = self._subject.target_pose(self._plane) @ action_to_matrix(self._offset)
        self._cmd: tuple[np.ndarray, np.ndarray, bool] | None = None  # (lin m/s, ang rad/s, in base frame)
        self._cmd_time_ns = 0
        self._last_step_ns = self.get_clock().now().nanoseconds
        self._t0_ns = self._last_step_ns

        image_qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._pub_image = self.create_publisher(Image, "image", image_qos)
        self._pub_pose = self.create_publisher(PoseStamped, "probe_pose", 100)  # 0.4 s at 250 Hz
        self._pub_ann = self.create_publisher(String, "annotations", QoSProfile(
            depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self._pub_target = self.create_publisher(PoseStamped, "~/true_target_pose", latched)
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._pose_group = MutuallyExclusiveCallbackGroup()
        # Rendering (several ms, more on a loaded machine) runs on a thread of its own: on the
        # executor thread it held back the pose timer (about 90 of 250 Hz, > 20 ms gaps around
        # each image). The image timer only takes the acquisition time and pose and hands them over.
        self._render_worker: LatestFrameWorker = LatestFrameWorker(
            self._render_and_publish, on_error=self._on_render_error, name="sim-render")

        self._replay = None
        if replay:
            self._replay = _Replay(self, Path(replay))
            self._replay_timer = self.create_timer(0.002, self._replay.step, callback_group=self._pose_group)
        else:
            self.create_subscription(TwistStamped, COMMAND_TOPIC, self._on_cmd, 10,
                                     callback_group=self._pose_group)
            self.create_timer(1.0 / float(gp("pose_rate_hz").value), self._on_pose_timer,
                              callback_group=self._pose_group)
            self.create_timer(1.0 / float(gp("image_rate_hz").value), self._on_image_timer,
                              callback_group=self._image_group)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=self._pose_group)
        self.create_timer(1.0, self._publish_target, callback_group=self._pose_group)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._publish_target()
        mode = f"replaying {replay}" if replay else f"live, plane {self._plane}, start offset {self._offset.tolist()}"
        self.get_logger().info(f"subject {self._subject.subject_id}: {mode}")

    # ------------------------------------------------------------------ parameters

    @staticmethod
    def _check_offset(value) -> np.ndarray:
        a = np.asarray(list(value), dtype=np.float64)
        if a.shape != (6,) or not np.all(np.isfinite(a)):
            raise ValueError("start_offset must be 6 finite numbers [mm, mm, mm, deg, deg, deg]")
        if np.any(np.abs(a[:3]) > 200.0) or np.any(np.abs(a[3:]) > 180.0):
            raise ValueError("start_offset out of range (|x,y,z| <= 200 mm, |angles| <= 180 deg)")
        return a

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        updates = {}
        for p in params:
            try:
                if p.name == "target_plane":
                    updates[p.name] = _sim_plane(p.value)
                elif p.name == "start_offset":
                    updates[p.name] = self._check_offset(p.value)
                elif p.name == "patient_offset":
                    updates[p.name] = self._check_offset(p.value)
                elif p.name in ("cmd_timeout_s", "max_linear_speed_mps", "max_angular_speed_rps"):
                    v = float(p.value)
                    if not math.isfinite(v) or v < 0 or (p.name == "cmd_timeout_s" and v <= 0):
                        raise ValueError(f"{p.name} must be a positive number")
                    updates[p.name] = v
            except (ValueError, TypeError) as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        with self._lock:
            if "target_plane" in updates:
                self._plane = updates["target_plane"]
            if "cmd_timeout_s" in updates:
                self._cmd_timeout_s = updates["cmd_timeout_s"]
            if "max_linear_speed_mps" in updates:
                self._max_lin = updates["max_linear_speed_mps"]
            if "max_angular_speed_rps" in updates:
                self._max_ang = updates["max_angular_speed_rps"]
            if "start_offset" in updates:
                self._offset = updates["start_offset"]
                self._teleport_locked()
            if "patient_offset" in updates:  # the probe keeps its base_frame pose
                P_new = action_to_matrix(updates["patient_offset"])
                self._T = np.linalg.inv(P_new) @ self._P @ self._T
                self._P = P_new
        if "target_plane" in updates or "patient_offset" in updates:
            self._publish_target()
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ state

    def _teleport_locked(self) -> None:
        self._T = self._subject.target_pose(self._plane) @ action_to_matrix(self._offset)
        self._cmd = None

    def probe_pose_mm(self) -> np.ndarray:
        """Current probe pose (4, 4) relative to the subject, mm (the base frame while patient_offset is 0)."""
        with self._lock:
            return self._T.copy()

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            self._teleport_locked()
        response.success = True
        response.message = f"probe at start_offset {self._offset.tolist()} from the {self._plane} target"
        return response

    def _on_cmd(self, msg: TwistStamped) -> None:
        lin = np.array([msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z], dtype=np.float64)
        ang = np.array([msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z], dtype=np.float64)
        frame = msg.header.frame_id
        if not (np.all(np.isfinite(lin)) and np.all(np.isfinite(ang))):
            self.get_logger().warn("ignoring velocity command with NaN/inf", throttle_duration_sec=2.0)
            return
        if frame not in ("", self._probe, self._base):
            self.get_logger().warn(f"ignoring velocity command in frame {frame!r}; expected "
                                   f"{self._probe!r} or {self._base!r}", throttle_duration_sec=2.0)
            return
        with self._lock:
            self._cmd = (lin, ang, frame == self._base)
            self._cmd_time_ns = self.get_clock().now().nanoseconds

    def _on_pose_timer(self) -> None:
        now = self.get_clock().now().nanoseconds
        with self._lock:
            dt = max(0.0, min((now - self._last_step_ns) * 1e-9, 0.1))
            self._last_step_ns = now
            if self._cmd is not None and (now - self._cmd_time_ns) * 1e-9 <= self._cmd_timeout_s:
                lin, ang, in_base = self._cmd
                n_lin, n_ang = np.linalg.norm(lin), np.linalg.norm(ang)
                if n_lin > self._max_lin:
                    lin = lin * (self._max_lin / n_lin)
                if n_ang > self._max_ang:
                    ang = ang * (self._max_ang / n_ang)
                if in_base:  # base-frame axes -> subject axes
                    lin, ang = self._P[:3, :3].T @ lin, self._P[:3, :3].T @ ang
                dR = rotvec_to_rotation(ang * dt)
                dp = lin * dt * 1000.0
                T = self._T.copy()
                if in_base:  # twist of the probe origin, axes of the base frame
                    T[:3, :3] = dR @ T[:3, :3]
                    T[:3, 3] += dp
                else:        # body twist in the probe frame
                    T[:3, 3] += T[:3, :3] @ dp
                    T[:3, :3] = T[:3, :3] @ dR
                self._T = T
            elif self._cmd is not None:
                self._cmd = None
            T = self._P @ self._T
        self._pub_pose.publish(matrix_to_pose_stamped(T, now, self._base))

    def _on_image_timer(self) -> None:
        now = self.get_clock().now().nanoseconds  # acquisition time
        self._render_worker.submit((now, self.probe_pose_mm()))

    def _render_and_publish(self, item: tuple[int, np.ndarray]) -> None:
        """Render thread: the image at the acquisition time and pose taken by the image timer."""
        now, T = item
        try:
            img = self._renderer.render(T, (now - self._t0_ns) * 1e-9)
        except ValueError as exc:
            self.get_logger().error(f"cannot render: {exc}", throttle_duration_sec=2.0)
            return
        self._pub_image.publish(gray_to_image_msg(img, now, self._image_frame))

    def _on_render_error(self, _item: object, exc: BaseException) -> None:
        self.get_logger().error(f"render thread: {type(exc).__name__}: {exc}", throttle_duration_sec=2.0)

    def destroy_node(self) -> None:
        """Stop the render thread (no publishing after the node is gone), then destroy the node."""
        worker = getattr(self, "_render_worker", None)
        if worker is not None:
            worker.stop()
        super().destroy_node()

    def _publish_target(self) -> None:
        with self._lock:
            plane, P = self._plane, self._P
        if self._replay is not None and self._replay.target is not None:
            T = self._replay.target
        else:
            T = P @ self._subject.target_pose(plane)
        self._pub_target.publish(matrix_to_pose_stamped(T, self.get_clock().now().nanoseconds, self._base))


class _Replay:
    """Replays a demonstration bag at its recorded pace with fresh stamps."""

    def __init__(self, node: ScannerSimNode, path: Path) -> None:
        from .. import bagio

        self.node = node
        self.events: list[tuple[int, str, object]] = []
        meta = _custom_data(path)
        tp = meta.get("cardiac_copilot.sim.target_pose")
        self.target = np.array([float(v) for v in tp.split(",")]).reshape(4, 4) if tp else None
        try:
            for topic, log_ns, msg in bagio.read_messages(path):
                self.events.append((log_ns, topic, msg))
        except bagio.BagError as exc:
            raise ValueError(str(exc)) from exc
        if not self.events:
            raise ValueError(f"bag {path} has no messages")
        self.events.sort(key=lambda e: e[0])
        self.bag_t0 = self.events[0][0]
        self.start_ns = node.get_clock().now().nanoseconds
        self.i = 0
        self.done = False
        node.get_logger().info(f"replaying {len(self.events)} messages from {path}")

    def step(self) -> None:
        if self.done:
            return
        from .. import bagio
        from .conversions import ns_to_stamp

        node = self.node
        now = node.get_clock().now().nanoseconds
        elapsed = now - self.start_ns
        while self.i < len(self.events) and self.events[self.i][0] - self.bag_t0 <= elapsed:
            log_ns, topic, msg = self.events[self.i]
            self.i += 1
            shift = self.start_ns - self.bag_t0
            if topic == bagio.POSE_TOPIC:
                out = PoseStamped()
                out.header.frame_id = msg.header.frame_id
                out.header.stamp = ns_to_stamp(bagio.stamp_to_ns(msg.header.stamp) + shift)
                p, q = msg.pose.position, msg.pose.orientation
                out.pose.position.x, out.pose.position.y, out.pose.position.z = p.x, p.y, p.z
                (out.pose.orientation.x, out.pose.orientation.y, out.pose.orientation.z,
                 out.pose.orientation.w) = q.x, q.y, q.z, q.w
                node._pub_pose.publish(out)
            elif topic == bagio.IMAGE_TOPIC:
                out = Image(height=int(msg.height), width=int(msg.width), encoding=str(msg.encoding),
                            is_bigendian=int(msg.is_bigendian), step=int(msg.step), data=bytes(msg.data))
                out.header.frame_id = msg.header.frame_id
                out.header.stamp = ns_to_stamp(bagio.stamp_to_ns(msg.header.stamp) + shift)
                node._pub_image.publish(out)
            elif topic == bagio.ANNOTATION_TOPIC:
                node._pub_ann.publish(String(data=str(msg.data)))
        if self.i >= len(self.events):
            if node.get_parameter("replay_loop").value:
                self.i = 0
                self.start_ns = now + 1_000_000_000
                node.get_logger().info("replay finished; starting again in 1 s")
            else:
                self.done = True
                node.get_logger().info("replay finished")


def _custom_data(path: Path) -> dict[str, str]:
    try:
        import yaml

        meta = yaml.safe_load((path / "metadata.yaml").read_text())
        return dict(meta["rosbag2_bagfile_information"].get("custom_data") or {})
    except Exception:  # metadata is optional for replay
        return {}


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; exit code 2 on invalid parameters."""
    # One thread: with rclpy's MultiThreadedExecutor the closed-loop bench saw probe poses arrive
    # stale at the servo (pose-watchdog faults in most episodes); single-threaded, none.
    return spin_node(ScannerSimNode, NODE_NAME, args, startup_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
