"""recorder_node: expert demonstrations as rosbag2 bags that lose nothing.

Subscribes the image topic(s) (serialized: images are written without a deserialize/serialize
round trip), the probe pose and ``annotations``; writes one bag per episode (MCAP by default,
sqlite3 selectable) with ``probe_pose_sync``: the probe pose interpolated at each image's stamp.
Episodes start and stop with the ``~/start_episode`` / ``~/stop_episode`` services
(std_srvs/Trigger) or ``autostart``. Disk I/O runs on a writer thread (recording.Recorder);
SIGINT/SIGTERM close the bag cleanly; ``/diagnostics`` reports rates, drops, sync and disk.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import rclpy
import rclpy.logging
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from .. import code_version
from .. import recording as rec
from .lifecycle import spin_node

#: Parameters that only take effect at the next episode (the others apply at once).
_READ_ONLY = ("image_topics", "pose_topic", "annotation_topic", "sync_topic", "image_qos_reliability",
              "image_qos_depth", "pose_qos_depth", "max_queue_mb", "probe_calibration")
#: Parameters never written to bag metadata (a path may carry names).
_NOT_IN_METADATA = ("output_dir", "probe_calibration")
#: Static transforms (probe calibration): kept in every episode bag.
TF_STATIC = "/tf_static"


def _float_range(lo: float, hi: float) -> list[FloatingPointRange]:
    return [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]


def _qos_to_dict(qos: QoSProfile) -> dict:
    """rclpy QoSProfile -> rosbag2 v9 metadata dict."""
    def name(policy, default: str) -> str:
        try:
            return policy.name.lower()
        except AttributeError:
            return default
    return rec.qos_profile_dict(reliability=name(qos.reliability, "reliable"),
                                durability=name(qos.durability, "volatile"),
                                history=name(qos.history, "keep_last"), depth=int(qos.depth))


class RecorderNode(Node):
    """Records images, probe poses, annotations and synchronized poses into episode bags."""

    def __init__(self, **kwargs) -> None:
        super().__init__("recorder_node", **kwargs)
        self._declare_parameters()
        p = self._params()
        rec.validate_session_label(p["session_label"])
        self.recorder = rec.Recorder(self._recorder_config(p), log=self._log)
        self.recorder.extra_stats = self._sync_stats_metadata
        self.sync = rec.PoseSynchronizer(int(p["sync_max_gap_ms"] * 1e6), int(p["max_pose_age_ms"] * 1e6))
        self._sync_lock = threading.Lock()
        self._stopping = False
        self._episode_index = 0
        self._started_wall = time.monotonic()

        self._io_group = MutuallyExclusiveCallbackGroup()
        self._ctl_group = MutuallyExclusiveCallbackGroup()
        self._received: dict[str, int] = {}
        self._lost: dict[str, int] = {}
        self._bad: dict[str, int] = {}
        self._types: dict[str, str] = {}
        self._subs = []

        image_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=int(p["image_qos_depth"]),
            reliability=(ReliabilityPolicy.BEST_EFFORT if p["image_qos_reliability"] == "best_effort"
                         else ReliabilityPolicy.RELIABLE),
            durability=DurabilityPolicy.VOLATILE)
        pose_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(p["pose_qos_depth"]),
                              reliability=ReliabilityPolicy.RELIABLE)
        ann_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                             reliability=ReliabilityPolicy.RELIABLE)
        self._sub_qos: dict[str, QoSProfile] = {}
        for name in p["image_topics"]:
            is_compressed = name.rstrip("/").endswith("compressed")
            msg_type = CompressedImage if is_compressed else Image
            self._subscribe(name, msg_type, image_qos, self._make_image_cb)
        self.pose_topic = self._subscribe(p["pose_topic"], PoseStamped, pose_qos,
                                          lambda topic: self._on_pose)
        self.annotation_topic = self._subscribe(p["annotation_topic"], String, ann_qos,
                                                lambda topic: self._make_plain_cb(topic))
        self._static_tf: list[bytes] = []
        self._init_tf_static(p["probe_calibration"])
        self.image_topics = [t for t, ty in self._types.items() if ty.startswith("sensor_msgs")]
        # Warm up what an episode start needs (message definitions, code version) now: doing it
        # at the first start would hold the GIL long enough to overflow subscription queues.
        self._code_version = code_version()
        for msgtype in {*self._types.values(), "geometry_msgs/msg/PoseStamped"}:
            rec.TopicSpec("/warmup", msgtype).msgdef()
        self.sync_topic = self.resolve_topic_name(p["sync_topic"])
        self.flag_topic = self.sync_topic + "_flagged"

        self.create_service(Trigger, "~/start_episode", self._on_start, callback_group=self._ctl_group)
        self.create_service(Trigger, "~/stop_episode", self._on_stop, callback_group=self._ctl_group)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._last_diag = (time.monotonic(), dict(self._received))
        self.create_timer(float(p["diagnostics_period_s"]), self._publish_diagnostics,
                          callback_group=self._ctl_group)
        self.create_timer(0.02, self._expire_sync, callback_group=self._io_group)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info(
            f"recording {', '.join(self.image_topics)}, {self.pose_topic}, {self.annotation_topic} "
            f"-> {Path(p['output_dir']).expanduser()} ({p['storage']}); services ~/start_episode, "
            "~/stop_episode")
        if p["autostart"]:
            ok, msg = self.start_episode()
            if not ok:
                self.get_logger().error(f"autostart: {msg}")

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        S, D, INT, B, SA = (ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_DOUBLE,
                          ParameterType.PARAMETER_INTEGER, ParameterType.PARAMETER_BOOL,
                          ParameterType.PARAMETER_STRING_ARRAY)
        specs = [
            ("output_dir", "bags", S, "directory that receives one bag directory per episode", None),
            ("session_label", "session", S, "pseudonymous session label in bag names/metadata: "
             "1-32 chars [A-Za-z0-9_-], no names, no record numbers", None),
            ("storage", "mcap", S, "rosbag2 storage: mcap | sqlite3 (next episode)", None),
            ("mcap_compression", "none", S, "MCAP chunk compression: none | zstd | lz4", None),
            ("image_topics", ["image"], SA, "image topics; names ending in 'compressed' are "
             "sensor_msgs/CompressedImage, others sensor_msgs/Image", None),
            ("pose_topic", "probe_pose", S, "geometry_msgs/PoseStamped probe pose topic", None),
            ("annotation_topic", "annotations", S, "std_msgs/String annotation topic", None),
            ("sync_topic", "probe_pose_sync", S, "topic (in the bag) of the pose interpolated at "
             "each image stamp; failures go to <sync_topic>_flagged when sync_failure=flag", None),
            ("sync_failure", "drop", S, "image without a good pose: drop (count only) | flag "
             "(write the nearest pose on <sync_topic>_flagged)", None),
            ("sync_max_gap_ms", 20.0, D, "largest spacing of the two poses around an image stamp "
             "[ms]", _float_range(0.1, 10000.0)),
            ("max_pose_age_ms", 500.0, D, "how long (receipt time) an image waits for a pose "
             "stamped at/after it before it counts as stale [ms]", _float_range(1.0, 10000.0)),
            ("max_bag_size_mb", 0.0, D, "split the episode into a new storage file at this size "
             "[MiB]; 0 = no split", _float_range(0.0, 1e7)),
            ("max_bag_duration_s", 0.0, D, "split into a new storage file after this much bag time "
             "[s]; 0 = no split", _float_range(0.0, 1e7)),
            ("min_free_disk_mb", 1024.0, D, "disk guard: refuse to start / stop the episode below "
             "this much free space [MiB]; the guard raises it to 2 s of data at the measured write "
             "rate + the queue + 5 MiB when that is more (and warns)", _float_range(0.0, 1e9)),
            ("flush_period_s", 1.0, D, "flush to disk (complete MCAP chunk, sqlite commit, "
             "metadata.yaml) this often [s]: a crash loses at most this much", _float_range(0.05, 60.0)),
            ("fsync", True, B, "fsync at every flush (survives power loss, costs disk time)", None),
            ("autostart", False, B, "start an episode at launch", None),
            ("image_qos_reliability", "reliable", S, "image subscription reliability: reliable | "
             "best_effort (best_effort to receive best-effort publishers)", None),
            ("image_qos_depth", 100, INT, "image subscription queue depth [messages]: covers stalls of "
             "the process (depth / rate seconds)", [1, 10000]),
            ("pose_qos_depth", 1000, INT, "pose subscription queue depth [messages]", [1, 100000]),
            ("max_queue_mb", 512.0, D, "writer queue bound; overflow is counted as dropped [MiB]",
             _float_range(1.0, 65536.0)),
            ("diagnostics_period_s", 1.0, D, "period of /diagnostics [s]", _float_range(0.1, 60.0)),
            ("probe_calibration", "", S, "probe calibration YAML (as dataset build --probe-calibration): "
             "written to every episode's /tf_static; empty = none", None),
        ]
        self._param_names = [s[0] for s in specs]
        for name, default, ptype, text, rng in specs:
            desc = ParameterDescriptor(description=text, type=ptype, read_only=name in _READ_ONLY)
            if ptype == D and rng:
                desc.floating_point_range = rng
            elif ptype == INT and rng:
                desc.integer_range = [IntegerRange(from_value=rng[0], to_value=rng[1], step=1)]
            self.declare_parameter(name, default, desc)
        problems = self._validate({k: self.get_parameter(k).value for k, *_ in specs})
        if problems:
            raise ValueError("; ".join(problems))

    def _params(self) -> dict:
        return {k: self.get_parameter(k).value for k in self._param_names}

    @staticmethod
    def _validate(values: dict) -> list[str]:
        problems = []
        for key, val in values.items():
            if key == "session_label":
                try:
                    rec.validate_session_label(val)
                except ValueError as exc:
                    problems.append(str(exc))
            elif key == "storage" and val not in rec.STORAGE_FILES:
                problems.append(f"storage must be one of {sorted(rec.STORAGE_FILES)}, not {val!r}")
            elif key == "mcap_compression" and val not in ("none", "zstd", "lz4"):
                problems.append(f"mcap_compression must be none, zstd or lz4, not {val!r}")
            elif key == "sync_failure" and val not in ("drop", "flag"):
                problems.append(f"sync_failure must be drop or flag, not {val!r}")
            elif key == "image_qos_reliability" and val not in ("reliable", "best_effort"):
                problems.append(f"image_qos_reliability must be reliable or best_effort, not {val!r}")
            elif key == "image_topics" and (not val or any(not t for t in val)):
                problems.append("image_topics must list at least one non-empty topic name")
            elif key == "output_dir" and not str(val).strip():
                problems.append("output_dir must not be empty")
        return problems

    def _on_set_parameters(self, params) -> SetParametersResult:
        problems = self._validate({p.name: p.value for p in params})
        if problems:
            return SetParametersResult(successful=False, reason="; ".join(problems))
        # Apply after acceptance (the values are set once this callback returns).
        new = {**self._params(), **{p.name: p.value for p in params}}
        self.recorder.config = self._recorder_config(new)
        with self._sync_lock:
            self.sync.max_gap_ns = int(new["sync_max_gap_ms"] * 1e6)
            self.sync.max_pose_age_ns = int(new["max_pose_age_ms"] * 1e6)
        return SetParametersResult(successful=True)

    @staticmethod
    def _recorder_config(p: dict) -> rec.RecorderConfig:
        return rec.RecorderConfig(
            output_dir=str(Path(os.path.expanduser(p["output_dir"]))), session_label=p["session_label"],
            storage=p["storage"], compression=p["mcap_compression"],
            max_bag_size_mb=float(p["max_bag_size_mb"]), max_bag_duration_s=float(p["max_bag_duration_s"]),
            min_free_disk_mb=float(p["min_free_disk_mb"]), flush_period_s=float(p["flush_period_s"]),
            max_queue_mb=float(p["max_queue_mb"]), fsync=bool(p["fsync"]))

    # ------------------------------------------------------------------ subscriptions
    def _subscribe(self, name: str, msg_type, qos: QoSProfile, make_cb) -> str:
        topic = self.resolve_topic_name(name)
        self._received[topic] = 0
        self._lost[topic] = 0
        self._bad[topic] = 0
        self._types[topic] = f"{msg_type.__module__.split('.')[0]}/msg/{msg_type.__name__}"
        self._sub_qos[topic] = qos

        def lost(info, topic=topic) -> None:
            self._lost[topic] += int(info.total_count_change)

        def incompatible(info, topic=topic) -> None:
            self.get_logger().warning(
                f"{topic}: a publisher's QoS is incompatible with this subscription (policy "
                f"{info.last_policy_kind}); for best-effort cameras set image_qos_reliability:=best_effort",
                throttle_duration_sec=10.0)

        events = SubscriptionEventCallbacks(message_lost=lost, incompatible_qos=incompatible)
        self._subs.append(self.create_subscription(msg_type, topic, make_cb(topic), qos, raw=True,
                                                   event_callbacks=events, callback_group=self._io_group))
        return topic

    def _make_image_cb(self, topic: str):
        def cb(data: bytes) -> None:
            now = self.get_clock().now().nanoseconds
            self._received[topic] += 1
            if not self.recorder.recording or self._stopping:
                return
            try:
                stamp = rec.cdr_header_stamp_ns(data)
            except (ValueError, Exception) as exc:
                self._bad[topic] += 1
                self.get_logger().warning(f"{topic}: unreadable message ({exc}); skipped",
                                          throttle_duration_sec=5.0)
                return
            if not self.recorder.submit(topic, now, data):
                return
            with self._sync_lock:
                results = self.sync.add_image(now, stamp, time.monotonic_ns())
            self._emit_sync(results)
        return cb

    def _make_plain_cb(self, topic: str):
        def cb(data: bytes) -> None:
            now = self.get_clock().now().nanoseconds
            self._received[topic] += 1
            if self.recorder.recording:
                self.recorder.submit(topic, now, data)
        return cb

    def _init_tf_static(self, calib_path: str) -> None:
        """/tf_static in every episode: the probe_calibration (if given) and the latched static
        transforms other nodes publish (needs tf2_msgs), all written again at each episode start."""
        if calib_path:
            from ..data.calibration import CalibrationError, load_calibration, tf_static_cdr

            try:
                calib = load_calibration(calib_path)
            except CalibrationError as exc:
                raise ValueError(f"probe_calibration: {exc}") from None
            self._static_tf.append(tf_static_cdr(calib, self.get_clock().now().nanoseconds))
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
        try:
            from tf2_msgs.msg import TFMessage
        except ImportError:
            self.get_logger().info("tf2_msgs is not installed: other nodes' /tf_static is not recorded")
            if self._static_tf:
                self._types[TF_STATIC] = "tf2_msgs/msg/TFMessage"
                self._sub_qos[TF_STATIC] = qos
            return
        self._subscribe(TF_STATIC, TFMessage, qos, lambda topic: self._on_tf_static)

    def _on_tf_static(self, data: bytes) -> None:
        self._received[TF_STATIC] += 1
        data = bytes(data)
        if data not in self._static_tf:
            self._static_tf.append(data)
        if self.recorder.recording:
            self.recorder.submit(TF_STATIC, self.get_clock().now().nanoseconds, data)

    def _on_pose(self, data: bytes) -> None:
        now = self.get_clock().now().nanoseconds
        topic = self.pose_topic
        self._received[topic] += 1
        if self.recorder.recording:
            self.recorder.submit(topic, now, data)
        try:
            stamp, frame_id, pos, quat = rec.parse_pose_stamped_cdr(data)
        except Exception as exc:
            self._bad[topic] += 1
            self.get_logger().warning(f"{topic}: unreadable pose ({exc}); skipped", throttle_duration_sec=5.0)
            return
        with self._sync_lock:
            before = self.sync.poses_out_of_order
            results = self.sync.add_pose(stamp, pos, quat, frame_id, now_ns=time.monotonic_ns())
            rejected = self.sync.poses_out_of_order - before
        if rejected:
            self.get_logger().warning(
                f"{topic}: pose stamped {stamp / 1e9:.3f} s ignored: at or before the last pose, or "
                f"further ahead of it than {self.sync.max_jump_ns / 1e9:g} s plus the time between "
                f"them ({self.sync.poses_out_of_order} this episode, see /diagnostics)",
                throttle_duration_sec=5.0)
        if results:
            self._emit_sync(results)

    def _expire_sync(self) -> None:
        with self._sync_lock:
            results = self.sync.expire(time.monotonic_ns()) if self.sync.pending else []
        if results:
            self._emit_sync(results)

    def _emit_sync(self, results: list[rec.SyncResult]) -> None:
        flag = self.get_parameter("sync_failure").value == "flag"
        for r in results:
            if r.status == "synced":
                self.recorder.submit(self.sync_topic, r.key, rec.serialize_pose_stamped_cdr(
                    r.stamp_ns, self.sync.frame_id, r.position, r.quat))
            else:
                self.get_logger().warning(
                    f"no probe pose for the image at {r.stamp_ns / 1e9:.3f} s ({r.status}"
                    f"{f', gap {r.gap_ns / 1e6:.1f} ms' if r.gap_ns else ''})", throttle_duration_sec=5.0)
                if flag and r.position is not None:
                    self.recorder.submit(self.flag_topic, r.key, rec.serialize_pose_stamped_cdr(
                        r.stamp_ns, self.sync.frame_id, r.position, r.quat))

    def _sync_stats_metadata(self) -> dict[str, str]:
        return {"recorder.sync": json.dumps(dict(self.sync.counts), sort_keys=True),
                "recorder.poses_rejected": json.dumps(
                    {"poses_out_of_order": self.sync.poses_out_of_order,
                     "pose_restarts": self.sync.pose_restarts}, sort_keys=True),
                "recorder.lost_qos": json.dumps(dict(self._lost), sort_keys=True)}

    # ------------------------------------------------------------------ episodes
    def _topic_specs(self) -> list[rec.TopicSpec]:
        specs = []
        for topic, msgtype in self._types.items():
            profiles = []
            try:
                profiles = [_qos_to_dict(i.qos_profile) for i in self.get_publishers_info_by_topic(topic)]
            except Exception:
                profiles = []
            specs.append(rec.TopicSpec(topic, msgtype, profiles or [_qos_to_dict(self._sub_qos[topic])]))
        sync_qos = [rec.qos_profile_dict(depth=10)]
        specs.append(rec.TopicSpec(self.sync_topic, "geometry_msgs/msg/PoseStamped", sync_qos))
        if self.get_parameter("sync_failure").value == "flag":
            specs.append(rec.TopicSpec(self.flag_topic, "geometry_msgs/msg/PoseStamped", sync_qos))
        return specs

    def start_episode(self) -> tuple[bool, str]:
        """Open a new episode bag (also used by autostart)."""
        p = self._params()
        stored = {k: v for k, v in p.items() if k not in _NOT_IN_METADATA}
        self._episode_index += 1
        custom = {
            rec.META_PREFIX + "session_label": p["session_label"],
            rec.META_PREFIX + "code_version": self._code_version,
            rec.META_PREFIX + "recorder.parameters": json.dumps(stored, sort_keys=True, default=list),
            rec.META_PREFIX + "recorder.episode_index": str(self._episode_index),
            rec.META_PREFIX + "recorder.node": self.get_fully_qualified_name(),
        }
        with self._sync_lock:  # a bad pose before this episode must not poison it
            self.sync.reset(keep_history=True)
        ok, msg = self.recorder.start_episode(self._topic_specs(), custom)
        if not ok:
            self.get_logger().error(f"episode not started: {msg}")
        else:
            now = self.get_clock().now().nanoseconds
            for data in list(self._static_tf):   # static transforms latched before this episode
                self.recorder.submit(TF_STATIC, now, data)
        return ok, msg

    def stop_episode(self, reason: str = "requested") -> tuple[bool, str]:
        """Close the episode and finalize the bag.

        Images still waiting for a pose stamped after them (at most the last few milliseconds)
        are resolved with what is known (counted as stale, or flagged).
        """
        if not self.recorder.recording:
            return False, (f"no episode is recording (last stop: {self.recorder.last_stop_reason})"
                           if self.recorder.last_stop_reason else "no episode is recording")
        self._stopping = True
        try:
            with self._sync_lock:
                results = self.sync.flush()
            self._emit_sync(results)
            return self.recorder.stop_episode(reason)
        finally:
            self._stopping = False

    def _on_start(self, request, response):
        response.success, response.message = self.start_episode()
        return response

    def _on_stop(self, request, response):
        response.success, response.message = self.stop_episode()
        return response

    def close(self) -> None:
        """Finalize any open episode (shutdown path; the executor is no longer spinning)."""
        if self.recorder.recording:
            ok, msg = self.stop_episode("shutdown")
            self._log("info" if ok else "error", f"shutdown: {msg}")
        self.recorder.shutdown()

    # ------------------------------------------------------------------ diagnostics
    def _log(self, level: str, text: str) -> None:
        try:
            logger = (self.get_logger() if self.context.ok()
                      else rclpy.logging.get_logger(self.get_name()))  # no /rosout after shutdown
            getattr(logger, level)(text)
        except Exception:
            print(f"[recorder_node] {level}: {text}", file=sys.stderr)

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        t0, before = self._last_diag
        dt = max(now - t0, 1e-6)
        self._last_diag = (now, dict(self._received))
        r = self.recorder
        kv: list[tuple[str, str]] = [
            ("state", r.state), ("bag", str(r.bag_path or "")),
            ("bag_size_mb", f"{r.bag_size_bytes / 2**20:.1f}"),
            ("free_disk_mb", f"{r.free_disk_mb:.0f}"),
            ("min_free_disk_mb", f"{r.config.min_free_disk_mb:g}"),
            ("min_free_disk_mb_effective", f"{r.effective_min_free_disk_mb:.0f}"),
            ("write_rate_mb_s", f"{r.write_rate_bps / 2**20:.2f}"),
            ("episodes", str(len(r.episodes))),
            ("queue_mb", f"{r.queued_bytes / 2**20:.1f}"),
            ("splits", str(r.splits)), ("last_stop_reason", r.last_stop_reason),
            ("write_errors", str(r.errors)),
        ]
        for topic in self._received:
            kv.append((f"{topic} rate_hz", f"{(self._received[topic] - before.get(topic, 0)) / dt:.1f}"))
            kv.append((f"{topic} received", str(self._received[topic])))
            kv.append((f"{topic} written", str(r.written.get(topic, 0))))
            kv.append((f"{topic} dropped_queue", str(r.dropped.get(topic, 0))))
            kv.append((f"{topic} lost_qos", str(self._lost[topic])))
            kv.append((f"{topic} unreadable", str(self._bad[topic])))
        kv.append((f"{self.sync_topic} written", str(r.written.get(self.sync_topic, 0))))
        for reason, n in self.sync.counts.items():
            kv.append((f"sync {reason}", str(n)))
        kv.append(("sync pending", str(self.sync.pending)))
        kv.append(("poses_out_of_order", str(self.sync.poses_out_of_order)))
        kv.append(("pose_restarts", str(self.sync.pose_restarts)))
        drops = sum(r.dropped.values()) + sum(self._lost.values())
        failures = sum(n for k, n in self.sync.counts.items() if k != "synced")
        level, text = DiagnosticStatus.OK, r.state
        if drops or failures or self.sync.poses_out_of_order:
            level, text = DiagnosticStatus.WARN, (f"{r.state}: {drops} dropped, {failures} images without "
                                                  f"sync pose, {self.sync.poses_out_of_order} poses out of order")
        if r.errors or r.last_stop_reason in ("disk_guard", "write_error"):
            level, text = DiagnosticStatus.ERROR, f"{r.state}: stopped by {r.last_stop_reason}"
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: recording", message=text,
                                  hardware_id=self.get_fully_qualified_name(),
                                  values=[KeyValue(key=k, value=v) for k, v in kv])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; the open episode is always closed cleanly."""
    # One thread: rclpy's MultiThreadedExecutor costs about twice the CPU per message
    # (measured with `cardiac-copilot bench recorder`); disk I/O has its own thread anyway.
    return spin_node(RecorderNode, "recorder_node", args, startup_errors=(ValueError,),
                     on_shutdown=RecorderNode.close)


if __name__ == "__main__":
    sys.exit(main())
