"""guidance_node: live ultrasound frames in, 6-DoF probe guidance out (the bedside node).

Subscribes ``image`` (sensor_msgs/Image) and/or ``image/compressed`` and the probe pose
(``probe_pose`` PoseStamped, or TF base_frame -> probe_frame); publishes ``guidance``
(TwistStamped in probe_frame, stamp = image stamp), ``target_pose`` (PoseStamped in base_frame,
when a fresh probe pose is known; fused in ``guidance_mode`` fused), ``frame_target_pose`` (the same
for each frame's own prediction before fusion: what servo_node's final-approach survey reads with
``survey_gate`` frame_target), ``guidance_markers`` (MarkerArray in probe_frame) and
``/diagnostics``. Parameters: see ``config/guidance.yaml``.

Coarse to fine (fused mode, with a fine model: ``fine_model_path``, by default ``models/fine.pt``
beside the default model): the coarse model guides until its fused target is within
``fine_enter_mm`` / ``fine_enter_deg`` of the probe, then the fine model guides with a fused
target of its own (:mod:`cardiac_copilot_ros.coarse_to_fine`); one model runs per frame.

Threads: subscription callbacks only hand the message to a :class:`LatestFrameWorker`
(conversion, inference and publishing run on its thread; the newest frame wins, older pending
frames are dropped and counted). The executor thread is therefore never blocked by inference,
so the diagnostics timer and parameter services keep flowing; a single-threaded executor is
enough and measured leaner than rclpy's MultiThreadedExecutor (bench guidance at 120 Hz: more
guidance per second, lower latency, similar CPU). Callback groups keep the timer separate should
the node be put on a multi-threaded executor.

Markers are in ``probe_frame`` (RViz places them through TF, which a robot or tracker
broadcasts); the predicted target probe pose is also broadcast on TF as ``target_frame``
(child of base_frame) where tf2_ros is installed.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PoseStamped, PoseWithCovarianceStamped, TwistStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import ColorRGBA
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from .. import images
from .. import pose as pose_alg
from ..coarse_to_fine import StageConfig, StageSelector
from ..engines import ENGINES
from ..planes import PLANE_NAMES
from ..runtime import (
    MODEL_HINT,
    FrameError,
    GuidanceRuntime,
    InferenceError,
    LatestFrameWorker,
    crop,
    default_fine_model_path,
    default_model_path,
    default_num_threads,
    normalize_roi,
)
from ..target_fusion import FusedTarget, FusionConfig, TargetFusion
from . import conversions as conv
from .lifecycle import spin_node

NODE_NAME = "guidance_node"
IMAGE_TRANSPORTS = ("both", "raw", "compressed")
RELIABILITIES = ("best_effort", "reliable")
POSE_SOURCES = ("topic", "tf")
DEVICES = ("auto", "cpu", "cuda")
#: guidance_mode values: fused target estimate (default) or each frame's prediction alone.
GUIDANCE_MODES = ("fused", "per_frame")
#: node parameter -> TargetFusion field (all changeable at run time).
FUSION_PARAMS = {"fusion_time_constant_s": "time_constant_s", "fusion_window_s": "window_s",
                 "fusion_max_gap_s": "max_gap_s", "fusion_gate_mm": "gate_mm", "fusion_gate_deg": "gate_deg",
                 "fusion_reset_after_outliers": "reset_after_outliers"}
#: node parameter -> StageConfig field (coarse-to-fine hand-over; changeable at run time).
STAGE_PARAMS = {"fine_enter_mm": "enter_mm", "fine_enter_deg": "enter_deg", "fine_exit_mm": "exit_mm",
                "fine_exit_deg": "exit_deg"}
THROTTLE_S = 2.0
#: Probe poses kept for lookups at image stamps.
POSE_BUFFER = 200
#: Images arriving but no guidance answered for this long [s] -> /diagnostics WARN or ERROR.
NO_GUIDANCE_S = 2.0
#: Gaps between image stamps longer than this many stream periods, or than MAX_GAP_S seconds,
#: are a pause of the stream, not lost frames.
MAX_GAP_PERIODS = 50
MAX_GAP_S = 1.0


class StartupError(RuntimeError):
    """The node cannot start (model file missing or incompatible, bad read-only parameter)."""


def _float_range(lo: float, hi: float) -> list[FloatingPointRange]:
    return [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]


def _int_range(lo: int, hi: int) -> list[IntegerRange]:
    return [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]


def _descr(text: str, read_only: bool = False, constraints: str = "", **kw: Any) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, read_only=read_only,
                               additional_constraints=constraints, **kw)


# ---------------------------------------------------------------------------------------
# Markers (pure functions of the action, testable without a graph)
# ---------------------------------------------------------------------------------------

def _color(r: float, g: float, b: float, a: float = 1.0) -> ColorRGBA:
    return ColorRGBA(r=r, g=g, b=b, a=a)


def _pt(v: Sequence[float]) -> Point:
    return Point(x=float(v[0]), y=float(v[1]), z=float(v[2]))


def format_action(action: np.ndarray) -> str:
    """The 6 numbers for people: ``x +1.2 y -3.4 z +5.6 mm | roll ... pitch ... yaw ... deg``."""
    a = np.asarray(action, dtype=float)
    return (f"x {a[0]:+.1f} y {a[1]:+.1f} z {a[2]:+.1f} mm | "
            f"roll {a[3]:+.1f} pitch {a[4]:+.1f} yaw {a[5]:+.1f} deg")


def build_markers(action: np.ndarray, stamp: Any, frame_id: str, lifetime_s: float, plane: str,
                  refined: bool, plane_size_m: Sequence[float] = (0.04, 0.10),
                  ns: str = "guidance") -> MarkerArray:
    """Markers for one prediction, in the probe frame (m).

    ids: 0 translation arrow (origin -> target position), 1 rotation arc about the rotation
    axis (deleted when the rotation is under 0.1 deg), 2 arrow head on the arc, 3 target plane
    outline (the target image plane: x lateral, z along the beam), 4 text with the 6 numbers.
    """
    a = np.asarray(action, dtype=np.float64)
    T = pose_alg.action_to_matrix(a)
    T[:3, 3] /= 1000.0  # mm -> m
    lifetime = conv.ns_to_stamp(int(max(0.0, lifetime_s) * 1e9))
    from builtin_interfaces.msg import Duration

    life = Duration(sec=lifetime.sec, nanosec=lifetime.nanosec)

    def marker(mid: int, mtype: int) -> Marker:
        m = Marker(header=conv.make_header(stamp, frame_id), ns=ns, id=mid, type=mtype,
                   action=Marker.ADD, lifetime=life, frame_locked=False)
        m.pose.orientation.w = 1.0
        return m

    out = MarkerArray()
    arrow = marker(0, Marker.ARROW)
    arrow.points = [_pt((0.0, 0.0, 0.0)), _pt(T[:3, 3])]
    arrow.scale.x, arrow.scale.y, arrow.scale.z = 0.003, 0.006, 0.01
    arrow.color = _color(0.1, 0.9, 0.2)
    out.markers.append(arrow)

    rotvec = pose_alg.rotation_to_rotvec(T[:3, :3])
    angle = float(np.linalg.norm(rotvec))
    arc, head = marker(1, Marker.LINE_STRIP), marker(2, Marker.ARROW)
    if angle < math.radians(0.1):
        arc.action = head.action = Marker.DELETE
    else:
        axis = rotvec / angle
        helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        u = np.cross(axis, helper)
        u /= np.linalg.norm(u)
        v = np.cross(axis, u)
        radius = 0.03
        phis = np.linspace(0.0, angle, max(2, int(math.degrees(angle) / 5) + 2))
        pts = [radius * (math.cos(p) * u + math.sin(p) * v) for p in phis]
        arc.points = [_pt(p) for p in pts]
        arc.scale.x = 0.002
        arc.color = _color(1.0, 0.6, 0.0)
        tangent = -math.sin(angle) * u + math.cos(angle) * v
        head.points = [_pt(pts[-1]), _pt(pts[-1] + 0.008 * tangent)]
        head.scale.x, head.scale.y, head.scale.z = 0.002, 0.006, 0.008
        head.color = arc.color
    out.markers += [arc, head]

    outline = marker(3, Marker.LINE_STRIP)
    w, d = float(plane_size_m[0]), float(plane_size_m[1])
    corners = np.array([[-w / 2, 0, 0, 1], [w / 2, 0, 0, 1], [w / 2, 0, d, 1], [-w / 2, 0, d, 1],
                        [-w / 2, 0, 0, 1]])
    outline.points = [_pt(p[:3]) for p in (T @ corners.T).T]
    outline.scale.x = 0.0015
    outline.color = _color(0.2, 0.7, 1.0)
    out.markers.append(outline)

    text = marker(4, Marker.TEXT_VIEW_FACING)
    text.pose.position.z = -0.02
    text.scale.z = 0.008
    text.color = _color(1.0, 1.0, 1.0)
    text.text = f"{plane}{' (Dreamer)' if refined else ''}\n{format_action(a)}"
    out.markers.append(text)
    return out


def format_spread(fused: FusedTarget) -> str:
    """The fused target's spread for people: ``fused 42 frames, spread 1.2 mm / 0.8 deg``."""
    if not fused.known:
        return f"fused {fused.n} frame(s), spread not yet known"
    return f"fused {fused.n} frames, spread {fused.spread_mm:.1f} mm / {fused.spread_deg:.1f} deg"


def build_uncertainty_markers(action: np.ndarray, fused: FusedTarget, stamp: Any, frame_id: str,
                              lifetime_s: float, T_target_mm: np.ndarray,
                              ns: str = "guidance") -> list[Marker]:
    """id 5: the fused target's translation uncertainty, an ellipsoid of +-1 standard deviation
    (the spread) at the target position, in the probe frame (m); deleted while it is unknown."""
    from builtin_interfaces.msg import Duration

    lifetime = conv.ns_to_stamp(int(max(0.0, lifetime_s) * 1e9))
    m = Marker(header=conv.make_header(stamp, frame_id), ns=ns, id=5, type=Marker.SPHERE, action=Marker.ADD,
               lifetime=Duration(sec=lifetime.sec, nanosec=lifetime.nanosec), frame_locked=False)
    m.pose.orientation.w = 1.0
    if not fused.known:
        m.action = Marker.DELETE
        return [m]
    U = pose_alg.action_to_matrix(np.asarray(action, dtype=np.float64))
    R_probe = np.asarray(T_target_mm)[:3, :3] @ U[:3, :3].T
    cov_probe = R_probe.T @ fused.covariance[:3, :3] @ R_probe  # m^2, probe axes
    vals, vecs = np.linalg.eigh(cov_probe)
    if np.linalg.det(vecs) < 0:
        vecs[:, 0] *= -1
    std = np.sqrt(np.clip(vals, 0.0, None))
    q = pose_alg.rotation_to_quat(vecs)
    m.pose.position = _pt(U[:3, 3] / 1000.0)
    m.pose.orientation.x, m.pose.orientation.y, m.pose.orientation.z, m.pose.orientation.w = (float(v) for v in q)
    m.scale.x, m.scale.y, m.scale.z = (float(max(2.0 * v, 0.001)) for v in std)
    m.color = _color(0.2, 0.7, 1.0, 0.35)
    return [m]


# ---------------------------------------------------------------------------------------
# Node
# ---------------------------------------------------------------------------------------

class _StampGaps:
    """Frames lost in transport, estimated from gaps between consecutive image header stamps.

    The stream period is estimated from recent stamp differences (the mean of those near
    their 25th percentile, so it holds with up to ~75 % of frames lost); a gap of ``k``
    periods means ``k - 1`` frames lost. Repeated stamps count nothing; a backwards stamp or a
    gap beyond :data:`MAX_GAP_PERIODS` periods or :data:`MAX_GAP_S` (a restarted or paused
    stream) counts nothing and starts the estimate afresh (it may come back at another rate).
    """

    def __init__(self, window: int = 64) -> None:
        self.last_ns: int | None = None
        self.diffs: deque[int] = deque(maxlen=window)
        self.period_ns: float | None = None

    def add(self, stamp_ns: int) -> int:
        """Take the next stamp; returns the number of frames lost just before it."""
        last, self.last_ns = self.last_ns, stamp_ns
        if last is None or stamp_ns == last:
            return 0
        diff = stamp_ns - last
        period = self.period_ns
        if diff < 0 or diff > MAX_GAP_S * 1e9 or (period is not None and diff > MAX_GAP_PERIODS * period):
            self.diffs.clear()
            self.period_ns = None
            return 0
        self.diffs.append(diff)
        if len(self.diffs) >= 8 and (period is None or len(self.diffs) % 8 == 0):
            arr = np.asarray(self.diffs, dtype=np.float64)
            p0 = float(np.percentile(arr, 25))
            near = arr[(arr > 0.5 * p0) & (arr < 1.5 * p0)]
            self.period_ns = float(near.mean()) if near.size else p0
        if period is None or period <= 0:
            return 0
        k = int(round(diff / period))
        return k - 1 if 2 <= k <= MAX_GAP_PERIODS else 0


class _Stats:
    """Thread-safe counters and recent latencies for diagnostics."""

    KEYS = ("frames_received", "frames_processed", "frames_dropped", "bad_images", "bad_poses",
            "stale_poses", "model_errors", "internal_errors", "guidance_published", "target_poses_published",
            "oversized_images", "bad_stamps", "frames_lost_transport")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(self.KEYS, 0)
        self.latency_ms: deque[float] = deque(maxlen=2000)   # image stamp -> guidance published
        self.process_ms: deque[float] = deque(maxlen=2000)   # received -> guidance published
        self.inference_ms: deque[float] = deque(maxlen=2000)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


class GuidanceNode(Node):
    """The bedside guidance node (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._declare_parameters()
        self._declare_fusion_parameters()
        gp = self.get_parameter
        self._base_frame = gp("base_frame").value
        self._probe_frame = gp("probe_frame").value
        self._target_frame = gp("target_frame").value
        self._calib_mm, self._pose_frame = self._load_calibration(gp("probe_calibration").value)
        self._max_pose_age_s = float(gp("max_pose_age_s").value)
        self._marker_lifetime_s = float(gp("marker_lifetime_s").value)
        self._plane_size_m = [float(v) for v in gp("plane_size_m").value]
        for name, allowed in (("image_transport", IMAGE_TRANSPORTS), ("qos_reliability", RELIABILITIES),
                              ("pose_source", POSE_SOURCES), ("device", DEVICES)):
            if gp(name).value not in allowed:
                raise StartupError(f"parameter {name}={gp(name).value!r} is invalid; "
                                   f"choose one of {', '.join(allowed)}")

        self._pose_source = gp("pose_source").value
        self._tf2_ros = self._import_tf2_ros()
        self.runtime = self._load_runtime()
        self.get_logger().info(f"model {self.runtime.describe()}")
        self.fine_runtime = self._load_fine_runtime()
        try:
            self._plane = self.runtime.plane_name(gp("target_plane").value)
            if self.fine_runtime is not None:
                self.fine_runtime.plane_name(self._plane)
        except ValueError as exc:
            raise StartupError(f"parameter target_plane: {exc}") from None
        self._use_dreamer = bool(gp("use_dreamer").value)
        if self._use_dreamer and not self.runtime.has_dreamer:
            self.get_logger().warning(f"use_dreamer is true but {self.runtime.path.name} has no Dreamer: "
                                      "guidance is the policy output")
            self._use_dreamer = False

        self._stats = _Stats()
        self._poses: deque[tuple[int, np.ndarray]] = deque(maxlen=POSE_BUFFER)
        self._pose_lock = threading.Lock()
        self._last_diag = (time.monotonic(), 0, 0)
        # input guards (issue 14): frame size seen last, stamp checks, transport gaps, stalls
        self._max_pixels = int(gp("max_image_pixels").value)
        self._max_stamp_skew_s = float(gp("max_stamp_skew_s").value)
        self._frame_hw: tuple[int, int] | None = None
        self._gaps: dict[type, _StampGaps] = {}
        self._gap_key: type | None = None  # the input (raw / compressed) that sent the last frame
        self._last_reject = ""            # why the last frame got no guidance
        self._unanswered_since: float | None = None   # monotonic s: images came, no guidance since
        self._rejects_at_stall = 0
        self._last_rx_t = -math.inf
        self._last_counts: dict[str, int] = dict.fromkeys(_Stats.KEYS, 0)

        # publishers
        self._pub_guidance = self.create_publisher(TwistStamped, "guidance", 10)
        self._pub_target = self.create_publisher(PoseStamped, "target_pose", 10)
        self._pub_frame_target = self.create_publisher(PoseStamped, "frame_target_pose", 10)
        self._pub_markers = self.create_publisher(MarkerArray, "guidance_markers", 10)
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._setup_fusion()

        # TF (optional)
        self._tf_broadcaster = None
        self._tf_buffer = None
        self._setup_tf(bool(gp("publish_tf").value))

        # inference worker
        self._worker: LatestFrameWorker = LatestFrameWorker(
            self._process, on_result=None, on_error=self._on_worker_error, name="guidance-inference")

        # subscriptions (callbacks only hand over the message)
        self._sub_group = MutuallyExclusiveCallbackGroup()
        self._diag_group = MutuallyExclusiveCallbackGroup()
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=int(gp("qos_depth").value),
            reliability=(ReliabilityPolicy.BEST_EFFORT if gp("qos_reliability").value == "best_effort"
                         else ReliabilityPolicy.RELIABLE))
        transport = gp("image_transport").value
        self._subs = []
        if transport in ("both", "raw"):
            self._subs.append(self.create_subscription(Image, "image", self._on_image, qos,
                                                       callback_group=self._sub_group))
        if transport in ("both", "compressed"):
            self._subs.append(self.create_subscription(CompressedImage, "image/compressed", self._on_image,
                                                       qos, callback_group=self._sub_group))
        if self._pose_source == "topic":
            pose_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(gp("pose_qos_depth").value),
                                  reliability=qos.reliability)
            self._subs.append(self.create_subscription(PoseStamped, "probe_pose", self._on_pose, pose_qos,
                                                       callback_group=self._sub_group))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._diag_timer = self.create_timer(float(gp("diagnostics_period_s").value), self._publish_diagnostics,
                                             callback_group=self._diag_group)
        self.get_logger().info(
            f"guidance for {self._plane} (dreamer {'on' if self._use_dreamer else 'off'}), images via "
            f"{transport} ({gp('qos_reliability').value}, depth {gp('qos_depth').value}), probe pose via "
            f"{self._pose_source}, base {self._base_frame}, probe {self._probe_frame}")

    # -- set-up ---------------------------------------------------------------------------

    def _declare_parameters(self) -> None:
        d = self.declare_parameter
        d("model_path", "", _descr("model bundle (.pt TorchScript or .onnx for ONNX Runtime; torch.export .pt2 "
                                   "files are refused: loading them can run code); empty = the package's "
                                   "models/default.pt",
                                   read_only=True))
        d("model_sha256", "", _descr("SHA-256 hex digest that pins the model file; the node refuses to start "
                                     "when the file differs; empty = not pinned", read_only=True))
        d("fine_model_path", "", _descr(
            "fine stage of coarse-to-fine: a bundle trained on the last centimetre (preset fine) that guides, in "
            "fused mode, once the coarse fused target is within fine_enter_mm / fine_enter_deg; empty = the "
            "package's models/fine.pt when model_path is empty too and the file exists; 'none' = off",
            read_only=True))
        d("fine_model_sha256", "", _descr("SHA-256 hex digest that pins the fine model file; empty = not pinned",
                                          read_only=True))
        d("device", "auto", _descr("inference device", True, "auto (CUDA when present) | cpu | cuda"))
        d("num_threads", 0, _descr("torch intra-op threads; 0 = number of cores - 1 (at least 1)", True,
                                   integer_range=_int_range(0, 256)))
        d("engine", "auto", _descr("inference engine; auto = the faster of torch and onnxruntime measured on the "
                                   "warm-up frames when both are available (a .pt with the same model as .onnx "
                                   "beside it), see docs/ARCHITECTURE.md", True, " | ".join(ENGINES)))
        d("expected_rate_hz", 30.0, _descr("frame rate [Hz] the machine should keep up with: start-up warns when "
                                           "the measured model time exceeds 1 / expected_rate_hz; 0 = no check",
                                           True, floating_point_range=_float_range(0.0, 1000.0)))
        d("target_plane", PLANE_NAMES[0], _descr("view to guide to, any view of the loaded model (its "
                                                 "metadata 'planes'); changeable at run time",
                                                 constraints="a view of the model (default model: "
                                                             + " | ".join(PLANE_NAMES) + ")"))
        d("use_dreamer", True, _descr("refine the action with the Cardiac Dreamer world model; "
                                      "changeable at run time"))
        d("crop_roi", [0, 0, 0, 0], _descr("crop [x, y, w, h] in pixels before resizing; 0s = full frame, "
                                           "w or h 0 = to the edge; changeable at run time"))
        d("image_transport", "both", _descr("image topics to subscribe", True,
                                            "both (image and image/compressed) | raw | compressed"))
        d("qos_reliability", "best_effort", _descr("reliability of the input subscriptions "
                                                   "(best_effort = SensorData QoS)", True,
                                                   "best_effort | reliable"))
        d("qos_depth", 1, _descr("history depth of the image subscriptions (keep last N)", True,
                                 integer_range=_int_range(1, 100)))
        d("pose_qos_depth", 50, _descr("history depth of the probe_pose subscription: poses are buffered "
                                       "for interpolation at image stamps, so keep more than one", True,
                                       integer_range=_int_range(1, 1000)))
        d("base_frame", "panda_link0", _descr("robot base / tracker frame of probe_pose and target_pose", True))
        d("probe_frame", "us_probe", _descr("probe frame of guidance and markers", True))
        d("target_frame", "us_probe_target", _descr("TF child frame broadcast for the predicted target "
                                                    "probe pose", True))
        d("publish_tf", True, _descr("broadcast target_frame on TF (needs tf2_ros)", True))
        d("probe_calibration", "", _descr("probe calibration YAML (docs/DATA.md: parent_frame = the tool frame "
                                          "whose pose probe_pose / TF gives, child_frame = the image frame, "
                                          "translation_m, quaternion_xyzw); the image frame's pose = tool pose "
                                          "x calibration. Empty: poses are the image frame's", True))
        d("pose_source", "topic", _descr("probe pose from the probe_pose topic or a TF lookup "
                                         "base_frame -> probe_frame (needs tf2_ros)", True, "topic | tf"))
        d("max_pose_age_s", 0.1, _descr("largest time [s] between the image stamp and the probe pose used "
                                        "for target_pose; older -> no target_pose (counted as stale)",
                                        floating_point_range=_float_range(0.0, 60.0)))
        d("marker_lifetime_s", 0.5, _descr("lifetime [s] of the guidance markers (0 = forever)",
                                           floating_point_range=_float_range(0.0, 60.0)))
        d("plane_size_m", [0.04, 0.10], _descr("target plane outline [width, depth] in metres"))
        d("diagnostics_period_s", 1.0, _descr("period [s] of /diagnostics", True,
                                              floating_point_range=_float_range(0.05, 60.0)))
        d("max_image_pixels", images.DEFAULT_MAX_PIXELS,
          _descr("largest accepted image, width x height [pixels], checked from the PNG/JPEG header before "
                 "decoding (decompression bombs) and on raw images; larger ones are rejected and counted "
                 "(oversized_images); also at most 8192 px per side; changeable at run time",
                 integer_range=_int_range(1, images.MAX_SIDE_PX * images.MAX_SIDE_PX)))
        d("max_stamp_skew_s", 5.0,
          _descr("image stamps further than this [s] from the node's clock (future or past), and stamps of 0 "
                 "or below, are counted as bad_stamps with a warning; such frames are still answered "
                 "(guidance keeps their stamp) but left out of the latency statistics; 0 = only check for "
                 "zero/negative stamps; changeable at run time",
                 floating_point_range=_float_range(0.0, 86400.0)))

    def _load_runtime(self, path: Path | None = None, sha256_param: str = "model_sha256") -> GuidanceRuntime:
        if path is None:
            raw = str(self.get_parameter("model_path").value).strip()
            path = Path(raw).expanduser() if raw else default_model_path()
        if not path.is_file():
            raise StartupError(f"model file {path} not found; {MODEL_HINT}")
        threads = int(self.get_parameter("num_threads").value) or default_num_threads()
        roi = list(self.get_parameter("crop_roi").value)
        try:
            normalize_roi(roi)
        except ValueError as exc:
            raise StartupError(f"parameter crop_roi: {exc}") from None
        engine = str(self.get_parameter("engine").value)
        if engine not in ENGINES:
            raise StartupError(f"parameter engine={engine!r} is invalid; choose one of {', '.join(ENGINES)}")
        try:
            runtime = GuidanceRuntime(path, device=self.get_parameter("device").value, num_threads=threads,
                                      crop_roi=roi, model_sha256=str(self.get_parameter(sha256_param).value),
                                      engine=engine, log=self.get_logger().info)
            warning = runtime.slow_warning(float(self.get_parameter("expected_rate_hz").value))
            if warning:
                self.get_logger().warning(warning)
            return runtime
        except ValueError as exc:  # device, or BundleError (a ValueError or RuntimeError subclass)
            raise StartupError(f"cannot load model file {path}: {exc}") from exc
        except Exception as exc:
            raise StartupError(f"cannot load model file {path}: {type(exc).__name__}: {exc}") from exc

    def _fine_model_file(self) -> Path | None:
        """The fine-stage bundle to load, or None (coarse-to-fine off)."""
        raw = str(self.get_parameter("fine_model_path").value).strip()
        if raw.lower() == "none":
            return None
        if raw:
            return Path(raw).expanduser()
        if str(self.get_parameter("model_path").value).strip():
            return None  # a model of the user's own: no default fine stage paired with it
        return default_fine_model_path()

    def _load_fine_runtime(self) -> GuidanceRuntime | None:
        """The fine stage of coarse-to-fine (docs/ARCHITECTURE.md), or None."""
        path = self._fine_model_file()
        if path is None:
            self.get_logger().info("coarse-to-fine off: no fine model (fine_model_path)")
            return None
        try:
            runtime = self._load_runtime(path, "fine_model_sha256")
        except StartupError as exc:
            raise StartupError(f"parameter fine_model_path: {exc}") from None
        if runtime.input_size != self.runtime.input_size:
            self.get_logger().info(f"fine model input {runtime.input_size} differs from the coarse model's "
                                   f"{self.runtime.input_size}: each resizes on its own")
        self.get_logger().info(f"fine model {runtime.describe()}")
        return runtime

    def _import_tf2_ros(self) -> Any:
        """tf2_ros, or None where it is not installed (then pose_source=tf cannot start)."""
        try:
            import tf2_ros
        except ImportError:
            if self._pose_source == "tf":
                raise StartupError("pose_source=tf needs tf2_ros, which is not installed here; "
                                   "use pose_source:=topic (probe_pose) or install ROS 2 tf2_ros") from None
            return None
        return tf2_ros

    def _setup_tf(self, publish_tf: bool) -> None:
        tf2_ros = self._tf2_ros
        if tf2_ros is None:
            if publish_tf:
                self.get_logger().info("tf2_ros is not installed: target_frame is not broadcast on TF")
            return
        if publish_tf:
            self._tf_broadcaster = tf2_ros.TransformBroadcaster(self)
        if self._pose_source == "tf":
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)

    # -- parameters at run time --------------------------------------------------------------

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        updates: dict[str, Any] = {}
        for p in params:
            if p.name == "target_plane":
                try:
                    updates["plane"] = self.runtime.plane_name(p.value)
                    if self.fine_runtime is not None:
                        self.fine_runtime.plane_name(updates["plane"])
                except (ValueError, TypeError) as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
            elif p.name == "use_dreamer":
                if p.value and not self.runtime.has_dreamer:
                    return SetParametersResult(
                        successful=False, reason=f"model {self.runtime.path.name} has no Dreamer")
                updates["dreamer"] = bool(p.value)
            elif p.name == "crop_roi":
                try:
                    updates["roi"] = normalize_roi(list(p.value))
                    hw = self._frame_hw
                    if updates["roi"] is not None and hw is not None:   # size of the last frame
                        crop(np.broadcast_to(np.uint8(0), hw), updates["roi"])
                except (ValueError, TypeError) as exc:   # FrameError is a ValueError
                    return SetParametersResult(successful=False, reason=f"{exc} (the last frame received)"
                                               if isinstance(exc, FrameError) else str(exc))
            elif p.name == "plane_size_m":
                vals = list(p.value or [])
                if len(vals) != 2 or not all(math.isfinite(v) and v > 0 for v in vals):
                    return SetParametersResult(successful=False,
                                               reason="plane_size_m must be [width, depth] > 0 in metres")
                updates["plane_size"] = [float(v) for v in vals]
            elif p.name == "max_pose_age_s":
                updates["pose_age"] = float(p.value)
            elif p.name == "marker_lifetime_s":
                updates["lifetime"] = float(p.value)
            elif p.name == "max_image_pixels":
                updates["max_pixels"] = int(p.value)
            elif p.name == "max_stamp_skew_s":
                updates["skew"] = float(p.value)
        if "plane" in updates:
            if updates["plane"] != self._plane:
                self.get_logger().info(f"target plane: {updates['plane']}")
            self._plane = updates["plane"]
        if "dreamer" in updates:
            self._use_dreamer = updates["dreamer"]
        if "roi" in updates:
            self.runtime.crop_roi = updates["roi"]
            if self.fine_runtime is not None:
                self.fine_runtime.crop_roi = updates["roi"]
        if "plane_size" in updates:
            self._plane_size_m = updates["plane_size"]
        if "pose_age" in updates:
            self._max_pose_age_s = updates["pose_age"]
        if "lifetime" in updates:
            self._marker_lifetime_s = updates["lifetime"]
        if "max_pixels" in updates:
            self._max_pixels = updates["max_pixels"]
        if "skew" in updates:
            self._max_stamp_skew_s = updates["skew"]
        return SetParametersResult(successful=True)

    # -- callbacks (executor threads) ---------------------------------------------------------

    def _on_image(self, msg: Image | CompressedImage) -> None:
        self._stats.add("frames_received")
        self._check_stamp(msg)
        if self._worker.submit((msg, time.monotonic())):
            self._stats.add("frames_dropped")

    def _check_stamp(self, msg: Image | CompressedImage) -> None:
        """Count bad stamps (warn, still answered) and frames lost in transport (stamp gaps)."""
        stamp_ns = conv.stamp_to_ns(msg.header.stamp)
        now_ns = self.get_clock().now().nanoseconds
        skew_ns = int(self._max_stamp_skew_s * 1e9)
        why = ""
        if stamp_ns <= 0:
            why = "stamp is 0 (driver not setting header.stamp?)" if stamp_ns == 0 else "stamp is negative"
        elif skew_ns > 0 and now_ns > 0 and abs(stamp_ns - now_ns) > skew_ns:
            ahead = stamp_ns > now_ns
            why = (f"stamp is {abs(stamp_ns - now_ns) / 1e9:.3f} s {'ahead of' if ahead else 'behind'} the node's "
                   f"clock (max_stamp_skew_s {self._max_stamp_skew_s:g}; unsynchronised clocks, or a bag "
                   f"played without --clock / use_sim_time?)")
        if why:
            self._stats.add("bad_stamps")
            self.get_logger().warning(f"image {why}: answered anyway, guidance carries this stamp",
                                      throttle_duration_sec=THROTTLE_S)
            return
        self._gap_key = type(msg)
        gaps = self._gaps.setdefault(self._gap_key, _StampGaps())
        lost = gaps.add(stamp_ns)
        if lost:
            self._stats.add("frames_lost_transport", lost)

    def _on_pose(self, msg: PoseStamped) -> None:
        frame = msg.header.frame_id
        if frame and frame.lstrip("/") != self._base_frame.lstrip("/"):
            self._stats.add("bad_poses")
            self.get_logger().warning(f"probe_pose in frame {frame!r}, expected {self._base_frame!r}: ignored",
                                      throttle_duration_sec=THROTTLE_S)
            return
        try:
            stamp_ns, T = conv.pose_stamped_to_matrix(msg)
        except conv.MessageError as exc:
            self._stats.add("bad_poses")
            self.get_logger().warning(f"bad probe_pose ignored: {exc}", throttle_duration_sec=THROTTLE_S)
            return
        with self._pose_lock:
            if self._poses and stamp_ns < self._poses[-1][0]:
                items = sorted([*self._poses, (stamp_ns, T)], key=lambda s: s[0])
                self._poses.clear()
                self._poses.extend(items)
            else:
                self._poses.append((stamp_ns, T))
        self._publish_pose_guidance(stamp_ns, T)

    # -- probe pose at an image stamp -------------------------------------------------------

    def _load_calibration(self, path: str) -> tuple[np.ndarray | None, str]:
        """(tool <- image matrix in mm or None, frame whose pose the pose source gives)."""
        if not path:
            return None, self._probe_frame
        from ..data.calibration import CalibrationError, load_calibration

        try:
            calib = load_calibration(path)
        except CalibrationError as exc:
            raise StartupError(f"parameter probe_calibration: {exc}") from None
        if calib.child_frame != self._probe_frame:
            self.get_logger().warning(f"probe_calibration child_frame {calib.child_frame!r} is not probe_frame "
                                      f"{self._probe_frame!r}: guidance is in the calibration's image frame")
        self.get_logger().info(f"probe calibration {calib.parent_frame} <- {calib.child_frame} from {path}: "
                               f"poses are the tool's, image pose = tool pose x calibration")
        return calib.matrix_mm(), calib.parent_frame

    def _probe_pose_at(self, stamp_ns: int) -> tuple[np.ndarray | None, str]:
        """Probe pose (4x4 mm, base_frame) at ``stamp_ns``, or (None, why)."""
        max_age_ns = int(self._max_pose_age_s * 1e9)
        if self._pose_source == "tf":
            return self._tf_pose_at(stamp_ns, max_age_ns)
        with self._pose_lock:
            poses = list(self._poses)
        if not poses:
            return None, "no probe pose received yet"
        stamps = np.array([s for s, _ in poses], dtype=np.int64)
        i = int(np.searchsorted(stamps, stamp_ns))
        lo, hi = max(0, i - 1), min(len(poses) - 1, i)
        if lo != hi and stamp_ns - stamps[lo] <= max_age_ns and stamps[hi] - stamp_ns <= max_age_ns:
            mats = np.stack([poses[lo][1], poses[hi][1]])
            pos, quat = mats[:, :3, 3], pose_alg.rotation_to_quat(mats[:, :3, :3])
            p, q, _ = pose_alg.interpolate_poses(np.array([stamp_ns]), stamps[[lo, hi]], pos, quat)
            T = np.eye(4)
            T[:3, :3] = pose_alg.quat_to_rotation(q[0])
            T[:3, 3] = p[0]
            return T, ""
        near = lo if abs(stamp_ns - stamps[lo]) <= abs(stamps[hi] - stamp_ns) else hi
        age_ns = abs(int(stamps[near]) - stamp_ns)
        if age_ns > max_age_ns:
            return None, f"nearest probe pose is {age_ns / 1e9:.3f} s from the image (max_pose_age_s " \
                         f"{self._max_pose_age_s:g})"
        return poses[near][1], ""

    def _tf_pose_at(self, stamp_ns: int, max_age_ns: int) -> tuple[np.ndarray | None, str]:
        from rclpy.time import Time

        try:
            tf = self._tf_buffer.lookup_transform(self._base_frame, self._pose_frame, Time(nanoseconds=stamp_ns))
        except Exception:
            try:
                tf = self._tf_buffer.lookup_transform(self._base_frame, self._pose_frame, Time())
            except Exception as exc:
                return None, f"no TF {self._base_frame} -> {self._pose_frame}: {exc}"
        age_ns = abs(conv.stamp_to_ns(tf.header.stamp) - stamp_ns)
        if age_ns > max_age_ns:
            return None, f"TF probe pose is {age_ns / 1e9:.3f} s from the image"
        try:
            return conv.transform_msg_to_matrix(tf.transform), ""
        except conv.MessageError as exc:
            self._stats.add("bad_poses")
            return None, f"bad TF probe pose: {exc}"

    # -- inference (worker thread) ------------------------------------------------------------

    def _process(self, item: tuple[Image | CompressedImage, float]) -> None:
        msg, t_rx = item
        log = self.get_logger()
        gray = self._input_gray(msg)
        if gray is None:
            return
        plane, refine = self._plane, self._use_dreamer
        stage = self._stage_for_frame()
        runtime = self.fine_runtime if stage == "fine" else self.runtime
        try:
            pred = runtime.predict(gray, plane, refine)
        except FrameError as exc:
            self._stats.add("bad_images")
            self._last_reject = f"bad image: {exc}"
            log.warning(f"bad image ignored: {exc}", throttle_duration_sec=THROTTLE_S)
            return
        except InferenceError as exc:
            self._stats.add("model_errors")
            self._last_reject = f"inference failed: {exc}"
            log.error(f"inference failed, no guidance for this frame: {exc}", throttle_duration_sec=THROTTLE_S)
            return
        if not self.context.ok():
            return
        stamp = msg.header.stamp
        stamp_ns = conv.stamp_to_ns(stamp)
        T_probe, why = self._probe_pose_at(stamp_ns)
        if T_probe is not None and self._calib_mm is not None:
            T_probe = T_probe @ self._calib_mm   # tool pose -> image-frame pose (probe_calibration)
        fused = self._fuse_frame(pred, stamp_ns, T_probe, why, stage)  # None: per-frame guidance
        action = pred.action if fused is None else fused[0]
        guidance = conv.action_to_twist_stamped(action, stamp, self._probe_frame)
        self._pub_guidance.publish(guidance)
        t_pub = time.monotonic()
        lat_ms = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6   # the node clock: sim time under use_sim_time
        with self._stats.lock:
            self._stats.counts["frames_processed"] += 1
            self._stats.counts["guidance_published"] += 1
            self._stats.latency_ms.append(lat_ms)
            self._stats.process_ms.append((t_pub - t_rx) * 1e3)
            self._stats.inference_ms.append(pred.timings_ms["total"])

        if T_probe is None:
            self._stats.add("stale_poses")
            log.warning(f"no target_pose: {why}", throttle_duration_sec=THROTTLE_S * 5)
        else:
            T_frame = pose_alg.apply_action(T_probe, pred.action)
            T_target = T_frame if fused is None else fused[1]
            self._pub_target.publish(conv.matrix_to_pose_stamped(T_target, stamp, self._base_frame))
            self._pub_frame_target.publish(conv.matrix_to_pose_stamped(T_frame, stamp, self._base_frame))
            self._stats.add("target_poses_published")
            if self._tf_broadcaster is not None:
                self._tf_broadcaster.sendTransform(
                    conv.matrix_to_transform_stamped(T_target, stamp, self._base_frame, self._target_frame))
        markers = build_markers(action, stamp, self._probe_frame, self._marker_lifetime_s,
                                pred.plane, pred.refined, self._plane_size_m)
        if fused is not None:
            self._publish_fused_extras(fused, stamp, markers)
        self._pub_markers.publish(markers)

    def _input_gray(self, msg: Image | CompressedImage) -> np.ndarray | None:
        """The message as (H, W) uint8 grey, or None (counted, logged) when it must be rejected."""
        log = self.get_logger()
        try:
            gray = conv.any_image_msg_to_gray(msg, self._max_pixels)
        except conv.ImageTooLargeMessageError as exc:
            self._stats.add("bad_images")
            self._stats.add("oversized_images")
            self._last_reject = f"image rejected: {exc}"
            log.error(f"image rejected before decoding: {exc}", throttle_duration_sec=THROTTLE_S)
            return None
        except conv.MessageError as exc:
            self._stats.add("bad_images")
            self._last_reject = f"bad image: {exc}"
            log.warning(f"bad image ignored: {exc}", throttle_duration_sec=THROTTLE_S)
            return None
        self._frame_hw = (int(gray.shape[0]), int(gray.shape[1]))
        roi = self.runtime.crop_roi
        if roi is not None:
            try:
                crop(gray, roi)
            except FrameError as exc:
                self._stats.add("bad_images")
                self._last_reject = str(exc)
                log.error(f"frame rejected: {exc}; set crop_roi to fit the frames "
                          f"(ros2 param set {self.get_fully_qualified_name()} crop_roi ...)",
                          throttle_duration_sec=THROTTLE_S)
                return None
        return gray

    def _on_worker_error(self, item: Any, exc: BaseException) -> None:
        if not self.context.ok():  # shutting down (SIGINT/SIGTERM): publishers are gone, not an error
            return
        self._stats.add("internal_errors")
        self._last_reject = f"internal error: {type(exc).__name__}: {exc}"
        self.get_logger().error(f"frame failed: {type(exc).__name__}: {exc}", throttle_duration_sec=THROTTLE_S)

    # -- fused target (see cardiac_copilot_ros.target_fusion) ----------------------------------

    def _declare_fusion_parameters(self) -> None:
        d = self.declare_parameter
        d("guidance_mode", "fused", _descr(
            "fused: guidance and target_pose from the target estimate fused over frames (needs a fresh probe "
            "pose; without one the frame's own prediction is used, with a warning); per_frame: each frame's "
            "prediction alone; changeable at run time", constraints=" | ".join(GUIDANCE_MODES)))
        d("pose_guidance_rate_hz", 50.0, _descr(
            "fused mode: also publish guidance (fused target relative to the newest probe pose, stamped with "
            "the pose's stamp) on probe_pose messages, at most this often [Hz]; 0 = at frame rate only",
            floating_point_range=_float_range(0.0, 1000.0)))
        defaults = FusionConfig()
        d("fusion_time_constant_s", defaults.time_constant_s, _descr(
            "recency weighting of the frames' target estimates: weight exp(-age / tau) [s]",
            floating_point_range=_float_range(0.01, 600.0)))
        d("fusion_window_s", defaults.window_s, _descr(
            "estimates older than this [s] (vs the newest) leave the fusion",
            floating_point_range=_float_range(0.1, 600.0)))
        d("fusion_max_gap_s", defaults.max_gap_s, _descr(
            "no estimate for longer than this [s] -> the fused target is reset",
            floating_point_range=_float_range(0.01, 600.0)))
        d("fusion_gate_mm", defaults.gate_mm, _descr(
            "outlier gate floor [mm]: an estimate farther than max(this, 4 x spread) from the fused target is rejected",
            floating_point_range=_float_range(0.1, 1000.0)))
        d("fusion_gate_deg", defaults.gate_deg, _descr(
            "outlier gate floor [deg] on the rotation", floating_point_range=_float_range(0.1, 180.0)))
        d("fusion_reset_after_outliers", defaults.reset_after_outliers, _descr(
            "this many consecutive rejected estimates -> reset (the patient moved)", integer_range=_int_range(1, 1000)))
        stage = StageConfig()
        d("fine_enter_mm", stage.enter_mm, _descr(
            "coarse-to-fine (with a fine model): the fine model guides once the coarse fused target is within "
            "this [mm] (and fine_enter_deg) of the probe", floating_point_range=_float_range(0.1, 1000.0)))
        d("fine_enter_deg", stage.enter_deg, _descr(
            "coarse-to-fine: rotation [deg] within which the fine model takes over",
            floating_point_range=_float_range(0.1, 180.0)))
        d("fine_exit_mm", stage.exit_mm, _descr(
            "coarse-to-fine: back to the coarse model when the probe or the fine fused target is farther than "
            "this [mm] from the coarse target at the hand-over (>= fine_enter_mm)",
            floating_point_range=_float_range(0.1, 1000.0)))
        d("fine_exit_deg", stage.exit_deg, _descr(
            "coarse-to-fine: the same in rotation [deg] (>= fine_enter_deg)",
            floating_point_range=_float_range(0.1, 180.0)))

    def _setup_fusion(self) -> None:
        gp = self.get_parameter
        mode = gp("guidance_mode").value
        if mode not in GUIDANCE_MODES:
            raise StartupError(f"parameter guidance_mode={mode!r} is invalid; "
                               f"choose one of {', '.join(GUIDANCE_MODES)}")
        try:
            config = FusionConfig().updated(**{f: gp(p).value for p, f in FUSION_PARAMS.items()})
        except (ValueError, TypeError) as exc:
            raise StartupError(f"fusion parameters: {exc}") from None
        self._guidance_mode = mode
        self._pose_guidance_rate_hz = float(gp("pose_guidance_rate_hz").value)
        try:
            stage_config = StageConfig().updated(**{f: float(gp(p).value) for p, f in STAGE_PARAMS.items()})
        except (ValueError, TypeError) as exc:
            raise StartupError(f"coarse-to-fine parameters: {exc}") from None
        self._fusion = TargetFusion(config)            # the coarse model's estimates
        self._fine_fusion = TargetFusion(config)       # the fine model's (coarse-to-fine)
        self._stages = StageSelector(stage_config)
        self._fusion_lock = threading.Lock()
        self._fusion_counts = {"fused_frames": 0, "fused_fallbacks": 0, "pose_guidance_published": 0}
        self._fallbacks_at_last_diag = 0
        self._last_pose_guidance = -math.inf  # monotonic s
        self._pub_target_cov = self.create_publisher(PoseWithCovarianceStamped, "target_pose_cov", 10)
        self._reset_srv = self.create_service(Trigger, "~/reset_target", self._on_reset_target)
        # validated with the other parameters, applied once all of a set call succeeded
        self.add_on_set_parameters_callback(self._check_fusion_parameters)
        self.add_post_set_parameters_callback(self._apply_fusion_parameters)

    def _fusion_changes(self, params: list[Parameter]
                        ) -> tuple[str, FusionConfig | None, StageConfig | None]:
        """(error or "", the new fusion configuration or None, the new coarse-to-fine configuration or
        None) for the fusion parameters in ``params``."""
        changes = {FUSION_PARAMS[p.name]: p.value for p in params if p.name in FUSION_PARAMS}
        stage_changes = {STAGE_PARAMS[p.name]: float(p.value) for p in params if p.name in STAGE_PARAMS}
        for p in params:
            if p.name == "guidance_mode" and p.value not in GUIDANCE_MODES:
                return f"guidance_mode must be one of {', '.join(GUIDANCE_MODES)}", None, None
        try:
            return ("", self._fusion.config.updated(**changes) if changes else None,
                    self._stages.config.updated(**stage_changes) if stage_changes else None)
        except (ValueError, TypeError) as exc:
            return str(exc), None, None

    def _check_fusion_parameters(self, params: list[Parameter]) -> SetParametersResult:
        error, _, _ = self._fusion_changes(params)
        return SetParametersResult(successful=not error, reason=error)

    def _reset_targets(self, reason: str, key_change: bool = False) -> None:
        """Forget both fused estimates and go back to the coarse stage (caller holds the lock)."""
        self._fusion.reset(reason, key_change=key_change)
        self._fine_fusion.reset(reason, key_change=key_change)
        self._stages.reset(reason)

    def _apply_fusion_parameters(self, params: list[Parameter]) -> None:
        """After a successful set: apply the fusion parameters, reset on a mode, plane or model change."""
        _, config, stage_config = self._fusion_changes(params)
        names = {p.name: p.value for p in params}
        with self._fusion_lock:
            if config is not None:
                self._fusion.configure(config)
                self._fine_fusion.configure(config)
            if stage_config is not None:
                self._stages.configure(stage_config)
            mode = names.get("guidance_mode")
            if mode is not None and mode != self._guidance_mode:
                self._reset_targets("guidance_mode changed", key_change=True)
                self._guidance_mode = mode
                self.get_logger().info(f"guidance_mode: {mode}")
            if "target_plane" in names or "use_dreamer" in names:
                # the old estimate must not drive pose-rate guidance for the new plane
                self._reset_targets("target plane or model changed", key_change=True)
            if "pose_guidance_rate_hz" in names:
                self._pose_guidance_rate_hz = float(names["pose_guidance_rate_hz"])

    def _on_reset_target(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._fusion_lock:
            self._reset_targets("requested")
        self.get_logger().info("fused target estimate reset (~/reset_target)")
        response.success, response.message = True, "fused target estimate reset"
        return response

    def _stage_for_frame(self) -> str:
        """Which model runs on the next frame: ``fine`` only in fused mode with a fine model, once the
        coarse fused target is near (cardiac_copilot_ros.coarse_to_fine); else ``coarse``."""
        if self.fine_runtime is None or self._guidance_mode != "fused":
            return "coarse"
        with self._fusion_lock:
            return self._stages.stage

    @property
    def _active_fusion(self) -> TargetFusion:
        """The fusion whose target guides now (caller holds the lock)."""
        return self._fine_fusion if self._stages.stage == "fine" else self._fusion

    def _fuse_frame(self, pred: Any, stamp_ns: int, T_probe: np.ndarray | None, why: str, stage: str = "coarse"
                    ) -> tuple[np.ndarray, np.ndarray, FusedTarget] | None:
        """Fused mode: add this frame's target estimate (to the fusion of the ``stage`` whose model made
        it); (guidance action at the image's probe pose, fused target pose, fused target). None in
        per_frame mode or without a probe pose (fallback)."""
        if self._guidance_mode != "fused":
            return None
        if T_probe is None:
            with self._fusion_lock:
                self._fusion_counts["fused_fallbacks"] += 1
            self.get_logger().warning(f"fused guidance needs the probe pose at the image stamp ({why}): "
                                      "publishing this frame's own prediction", throttle_duration_sec=THROTTLE_S)
            return None
        scale = pred.action_scale  # per-axis Laplace scale (mm, deg) or None
        switch = None
        with self._fusion_lock:
            if stage != self._stages.stage:   # the stage changed while the model ran: the frame is stale
                return None
            fusion = self._active_fusion
            try:
                up = fusion.add(stamp_ns * 1e-9, T_probe, pose_alg.action_to_matrix(pred.action), scale,
                                key=(pred.plane, pred.refined))
            except ValueError as exc:  # a malformed action_scale from the model
                self._fusion_counts["fused_fallbacks"] += 1
                self.get_logger().warning(f"cannot fuse this frame ({exc}): per-frame guidance",
                                          throttle_duration_sec=THROTTLE_S)
                return None
            self._fusion_counts["fused_frames"] += 1
            fused = up.fused
            assert fused is not None
            if self.fine_runtime is not None:   # this frame still guides after a switch
                switch = self._stages.hand_over(stage, up, T_probe, self._fusion, self._fine_fusion)
        if up.reset:
            self.get_logger().info(f"fused target estimate reset: {up.reset}", throttle_duration_sec=THROTTLE_S)
        if switch:
            self.get_logger().info(f"coarse-to-fine: {switch}", throttle_duration_sec=THROTTLE_S)
        return pose_alg.relative_action(T_probe, fused.T_mm), fused.T_mm, fused

    def _publish_pose_guidance(self, stamp_ns: int, T_probe: np.ndarray) -> None:
        """Fused mode: guidance from the fused target relative to this probe pose (rate-limited).

        Stamp = the pose's stamp (the guidance describes the target relative to the probe at that
        time). Nothing when no fused target is fresh (no estimate within fusion_max_gap_s).
        """
        if self._guidance_mode != "fused" or self._pose_guidance_rate_hz <= 0:
            return
        now = time.monotonic()
        with self._fusion_lock:
            fused = self._active_fusion.fused
            if fused is None or now - self._last_pose_guidance < 1.0 / self._pose_guidance_rate_hz:
                return
            if abs(stamp_ns * 1e-9 - fused.stamp_s) > self._fusion.config.max_gap_s:
                return
            self._last_pose_guidance = now
            self._fusion_counts["pose_guidance_published"] += 1
        if self._calib_mm is not None:  # probe_calibration: tool pose -> image-frame pose
            T_probe = T_probe @ self._calib_mm
        action = pose_alg.relative_action(T_probe, fused.T_mm)
        try:
            self._pub_guidance.publish(conv.action_to_twist_stamped(action, stamp_ns, self._probe_frame))
        except conv.MessageError:  # not finite: cannot happen for finite poses; never publish it
            return

    def _publish_fused_extras(self, fused: tuple[np.ndarray, np.ndarray, FusedTarget], stamp: Any,
                              markers: MarkerArray) -> None:
        """target_pose_cov (when the spread is known) and the uncertainty marker."""
        action, T_target, ft = fused
        if ft.known:
            msg = PoseWithCovarianceStamped()
            msg.header = conv.make_header(stamp, self._base_frame)
            msg.pose.pose = conv.matrix_to_pose_msg(T_target)
            msg.pose.covariance = [float(v) for v in ft.covariance.reshape(-1)]
            self._pub_target_cov.publish(msg)
        markers.markers.extend(build_uncertainty_markers(action, ft, stamp, self._probe_frame,
                                                         self._marker_lifetime_s, T_target))
        for m in markers.markers:
            if m.id == 4 and m.type == Marker.TEXT_VIEW_FACING:
                m.text += "\n" + format_spread(ft)

    def _fusion_diagnostics(self, status: DiagnosticStatus) -> dict[str, str]:
        """Fusion values for /diagnostics; raises the level to WARN while fused mode falls back."""
        with self._fusion_lock:
            counts = dict(self._fusion_counts)
            fc = self._fusion.counters
            ft = self._fusion.fused
            last_reset = self._fusion.last_reset
            mode = self._guidance_mode
            stage, stage_change, sc = self._stages.stage, self._stages.last_change, self._stages.counters
            if stage == "fine":
                fc, ft, last_reset = self._fine_fusion.counters, self._fine_fusion.fused, self._fine_fusion.last_reset
        out = {"guidance_mode": mode, "fusion_estimates": str(fc.estimates), "fusion_outliers": str(fc.outliers),
               "fusion_resets": str(fc.resets), "fusion_resets_key": str(fc.resets_key),
               "fusion_resets_gap": str(fc.resets_gap), "fusion_resets_disagreement": str(fc.resets_disagreement),
               "fusion_resets_requested": str(fc.resets_requested), "fusion_last_reset": str(last_reset or "")}
        out.update({k: str(v) for k, v in counts.items()})
        if self.fine_runtime is not None:
            out.update({"stage": stage if mode == "fused" else "coarse", "stage_last_change": stage_change,
                        "stage_to_fine": str(sc.to_fine), "stage_to_coarse": str(sc.to_coarse),
                        "stage_fine_frames": str(sc.fine_frames), "stage_coarse_frames": str(sc.coarse_frames),
                        "fine_model": str(self.fine_runtime.path)})
        if ft is not None:
            out["fused_frames_in_window"] = str(ft.n)
            out["fused_std_mm"] = ",".join(f"{v:.2f}" for v in ft.std_mm)
            out["fused_std_deg"] = ",".join(f"{v:.2f}" for v in ft.std_deg)
            out["fused_spread_mm"] = f"{ft.spread_mm:.2f}"
            out["fused_spread_deg"] = f"{ft.spread_deg:.2f}"
        new_fallbacks = counts["fused_fallbacks"] - self._fallbacks_at_last_diag
        self._fallbacks_at_last_diag = counts["fused_fallbacks"]
        out["fused_fallback_active"] = str(mode == "fused" and new_fallbacks > 0)
        if mode == "fused" and new_fallbacks > 0:
            if status.level == DiagnosticStatus.OK:
                status.level = DiagnosticStatus.WARN
            status.message += (f"; fused mode without a fresh probe pose: per-frame guidance for "
                               f"{new_fallbacks} frame(s)")
        return out

    # -- diagnostics --------------------------------------------------------------------------

    def diagnostics_snapshot(self) -> dict[str, float]:
        """Counters and latency percentiles (also published on /diagnostics)."""
        with self._stats.lock:
            out: dict[str, float] = dict(self._stats.counts)
            lat = np.array(self._stats.latency_ms)
            proc = np.array(self._stats.process_ms)
            inf = np.array(self._stats.inference_ms)
            self._stats.latency_ms.clear()
            self._stats.process_ms.clear()
            self._stats.inference_ms.clear()
        skew_ms = self._max_stamp_skew_s * 1e3
        if skew_ms > 0 and lat.size:   # frames with bad stamps have no meaningful latency
            lat = lat[np.abs(lat) <= skew_ms]
        for key, arr in (("latency_ms", lat), ("processing_ms", proc), ("inference_ms", inf)):
            if arr.size:
                out[f"{key}_p50"], out[f"{key}_p95"] = (float(v) for v in np.percentile(arr, [50, 95]))
        return out

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        snap = self.diagnostics_snapshot()
        t_last, rx_last, pub_last = self._last_diag
        dt = max(1e-6, now - t_last)
        rx, pub = snap["frames_received"], snap["guidance_published"]
        self._last_diag = (now, rx, pub)
        snap["input_rate_hz"] = (rx - rx_last) / dt
        snap["inference_rate_hz"] = (pub - pub_last) / dt
        status = DiagnosticStatus(name=f"{self.get_name()}: guidance", hardware_id=self.runtime.path.name)
        errors = snap["model_errors"] + snap["internal_errors"]
        new = {k: int(snap[k]) - self._last_counts.get(k, 0) for k in _Stats.KEYS}
        self._last_counts = {k: int(snap[k]) for k in _Stats.KEYS}
        # images arriving without any answer: for how long, and were they rejected?
        reject_keys = ("bad_images", "model_errors", "internal_errors")
        rejects = sum(int(snap[k]) for k in reject_keys)
        if new["frames_received"] > 0:
            self._last_rx_t = now
        if new["guidance_published"] > 0:
            self._unanswered_since = None
        elif new["frames_received"] > 0 and self._unanswered_since is None:
            # counted from now (no false alarm); rejections counted from the start of this period
            self._unanswered_since = now
            self._rejects_at_stall = rejects - sum(new[k] for k in reject_keys)
        waited = 0.0 if self._unanswered_since is None else now - self._unanswered_since
        snap["no_guidance_s"] = waited
        stalled = waited >= NO_GUIDANCE_S and now - self._last_rx_t < NO_GUIDANCE_S
        rejected = rejects > self._rejects_at_stall
        others = self._other_guidance_publishers()
        snap["guidance_publishers"] = len(others) + 1
        if stalled and rejected:
            status.level = DiagnosticStatus.ERROR
            status.message = f"no guidance for {waited:.1f} s: frames rejected (last: {self._last_reject})"
        elif stalled:
            status.level = DiagnosticStatus.WARN
            status.message = f"no guidance for {waited:.1f} s although images arrive (inference slow or stuck?)"
        elif errors and snap["inference_rate_hz"] == 0 and snap["input_rate_hz"] > 0:
            status.level, status.message = DiagnosticStatus.ERROR, "inference failing"
        elif others:
            status.level = DiagnosticStatus.WARN
            status.message = f"another node publishes {self._pub_guidance.topic_name}: {', '.join(others)}"
        elif snap["input_rate_hz"] == 0:
            status.level, status.message = DiagnosticStatus.WARN, "no images received"
        elif new["bad_stamps"]:
            status.level = DiagnosticStatus.WARN
            status.message = f"{new['bad_stamps']} image(s) with bad stamps (0, or beyond max_stamp_skew_s)"
        else:
            status.level = DiagnosticStatus.OK
            status.message = (f"{snap['inference_rate_hz']:.1f} Hz, latency p95 "
                              f"{snap.get('latency_ms_p95', float('nan')):.1f} ms")
        gaps = self._gaps.get(self._gap_key) if self._gap_key is not None else None
        if gaps is not None and gaps.period_ns:
            snap["stream_period_ms"] = gaps.period_ns / 1e6
        extra = {"target_plane": self._plane, "use_dreamer": str(self._use_dreamer),
                 "device": self.runtime.device, "model": str(self.runtime.path)}
        extra.update(self._fusion_diagnostics(status))
        status.values = ([KeyValue(key=k, value=f"{v:.3f}" if isinstance(v, float) else str(v))
                          for k, v in snap.items()]
                         + [KeyValue(key=k, value=v) for k, v in extra.items()])
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._pub_diag.publish(arr)

    def _other_guidance_publishers(self) -> list[str]:
        """Other nodes publishing on our ``guidance`` topic (two guidance nodes interleave answers)."""
        topic = self._pub_guidance.topic_name
        if self.count_publishers(topic) <= 1:
            return []
        me = (self.get_name(), self.get_namespace())
        others = [f"{i.node_namespace.rstrip('/')}/{i.node_name}" for i in self.get_publishers_info_by_topic(topic)
                  if (i.node_name, i.node_namespace) != me]
        if others:
            self.get_logger().warning(f"{topic} has other publishers: {', '.join(others)}; their answers "
                                      "interleave with this node's", throttle_duration_sec=10.0)
        return others

    # -- shutdown -------------------------------------------------------------------------------

    def destroy_node(self) -> None:
        """Stop the inference thread, then destroy the node."""
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; exit code 2 when it cannot start."""
    return spin_node(GuidanceNode, NODE_NAME, args, startup_errors=(StartupError,))


if __name__ == "__main__":
    sys.exit(main())
