"""Tiny synthetic recordings with an analytic probe trajectory (tests, docs, examples).

A bag written here looks like a real recording (ARCHITECTURE.md, "Bags"): images at
~30 Hz whose header stamps lag nothing and whose bag log time is stamp + latency, probe poses
at 250 Hz, annotation strings at the moment a plane is confirmed, and the subject id in the
bag's ``custom_data``. The trajectory is known in closed form (:func:`trajectory_pose`), so
tests can check interpolation and actions against the truth. ``distro="humble"`` writes the
messages with ROS 2 Humble definitions and makes the bag look like Humble's rosbag2 (metadata
version 5, no ``custom_data``, sqlite3 without embedded message definitions).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore
from ruamel.yaml import YAML

from .. import bagio
from ..pose import pose_to_matrix, rotation_to_quat, rotvec_to_rotation

NS = 1_000_000_000


@dataclass
class SyntheticScan:
    """Parameters of one synthetic scan bag (times in seconds from the scan start)."""

    subject_id: str = "synth-01"
    duration_s: float = 3.0
    image_hz: float = 30.0
    pose_hz: float = 250.0
    image_shape: tuple[int, int] = (40, 48)
    #: (time, text) annotations; text is normally a plane name.
    annotations: Sequence[tuple[float, str]] = ((1.2, "PLAX"), (2.4, "psax-av"))
    #: image stamps start this much before the first pose (frames dropped, counted).
    images_lead_s: float = 0.0
    #: (start, end) intervals without pose messages (gaps).
    pose_gaps_s: Sequence[tuple[float, float]] = ()
    image_latency_s: float = 0.015
    image_jitter_s: float = 0.002
    pose_latency_s: float = 0.002
    #: pose header stamps are shifted by this much (a probe tracker on another clock).
    pose_clock_offset_s: float = 0.0
    start_ns: int = 1_700_000_000 * NS
    seed: int = 0
    extra_topics: dict[str, str] = field(default_factory=dict)


def trajectory_pose(t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Analytic probe pose at times ``t_s``: (positions m (N, 3), quaternions xyzw (N, 4)).

    Constant linear velocity and constant angular velocity about a fixed axis, so linear
    interpolation of the position and slerp of the orientation are exact between samples.
    """
    t = np.atleast_1d(np.asarray(t_s, dtype=np.float64))
    p0 = np.array([0.40, -0.05, 0.30])
    v = np.array([0.010, -0.006, 0.004])          # m/s
    axis = np.array([0.3, -0.5, 0.8])
    axis /= np.linalg.norm(axis)
    rate = np.deg2rad(12.0)                       # rad/s
    base = rotvec_to_rotation(np.array([0.2, 2.9, 0.1]))
    rot = base @ rotvec_to_rotation(axis * (rate * t)[:, None])
    return p0 + v * t[:, None], rotation_to_quat(rot)


def trajectory_matrix(t_s: np.ndarray) -> np.ndarray:
    """:func:`trajectory_pose` as (N, 4, 4) matrices in mm."""
    p, q = trajectory_pose(t_s)
    return pose_to_matrix(p, q)


def frame_image(k: int, shape: tuple[int, int]) -> np.ndarray:
    """The k-th synthetic image: a constant value ``k % 251`` (survives any resize)."""
    return np.full(shape, k % 251, dtype=np.uint8)


def image_times_s(scan: SyntheticScan) -> np.ndarray:
    """Image stamps (seconds from scan start, may be negative with images_lead_s)."""
    rng = np.random.default_rng(scan.seed)
    n = int(round((scan.duration_s + scan.images_lead_s) * scan.image_hz))
    t = 0.01 - scan.images_lead_s + np.arange(n) / scan.image_hz
    return t + rng.uniform(-scan.image_jitter_s, scan.image_jitter_s, n)


def pose_times_s(scan: SyntheticScan) -> np.ndarray:
    """Pose stamps (seconds from scan start) with the configured gaps removed."""
    t = np.arange(int(round(scan.duration_s * scan.pose_hz)) + 1) / scan.pose_hz
    keep = np.ones(t.shape, bool)
    for a, b in scan.pose_gaps_s:
        keep &= ~((t > a) & (t < b))
    return t[keep]


def write_synthetic_bag(path: str | Path, scan: SyntheticScan | None = None, storage: str = "mcap",
                        distro: str = "jazzy", image_topic: str = bagio.IMAGE_TOPIC,
                        pose_topic: str | None = bagio.POSE_TOPIC,
                        annotation_topic: str | None = bagio.ANNOTATION_TOPIC,
                        compressed: bool = False) -> Path:
    """Write one synthetic scan bag at ``path`` (a new directory); returns the path.

    ``pose_topic=None`` / ``annotation_topic=None`` omit those topics (bad-input tests);
    ``compressed=True`` writes PNG sensor_msgs/CompressedImage instead of raw images.
    """
    scan = scan or SyntheticScan()
    path = Path(path)
    if distro not in ("jazzy", "humble"):
        raise ValueError(f"distro must be jazzy or humble, not {distro!r}")
    store = get_typestore(Stores.ROS2_JAZZY if distro == "jazzy" else Stores.ROS2_HUMBLE)
    T = store.types

    def header(stamp_ns: int, frame: str):
        stamp = T["builtin_interfaces/msg/Time"](sec=int(stamp_ns // NS), nanosec=int(stamp_ns % NS))
        return T["std_msgs/msg/Header"](stamp=stamp, frame_id=frame)

    msgs: list[tuple[int, str, object, str]] = []  # (log time, topic, msg, type)

    def to_ns(t_s: float) -> int:
        return scan.start_ns + int(round(t_s * NS))

    for k, ts in enumerate(image_times_s(scan)):
        img = frame_image(k, scan.image_shape)
        if compressed:
            import cv2
            ok, buf = cv2.imencode(".png", img)
            assert ok
            msg = T[bagio.COMPRESSED_IMAGE_TYPE](header=header(to_ns(ts), "us_image"), format="png",
                                                 data=buf.reshape(-1))
            typ = bagio.COMPRESSED_IMAGE_TYPE
        elif distro == "jazzy":
            msg = bagio.make_image(to_ns(ts), "us_image", img)
            typ = bagio.IMAGE_TYPE
        else:
            msg = T[bagio.IMAGE_TYPE](header=header(to_ns(ts), "us_image"), height=img.shape[0],
                                      width=img.shape[1], encoding="mono8", is_bigendian=0,
                                      step=img.shape[1], data=img.reshape(-1))
            typ = bagio.IMAGE_TYPE
        msgs.append((to_ns(ts + scan.image_latency_s), image_topic, msg, typ))
    if pose_topic is not None:
        tp = pose_times_s(scan)
        pos, quat = trajectory_pose(tp)
        for ts_true, p, q in zip(tp, pos, quat, strict=True):
            ts = ts_true + scan.pose_clock_offset_s
            if distro == "jazzy":
                msg = bagio.make_pose_stamped(to_ns(ts), "panda_link0", p, q)
            else:
                pose = T["geometry_msgs/msg/Pose"](
                    position=T["geometry_msgs/msg/Point"](x=p[0], y=p[1], z=p[2]),
                    orientation=T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3]))
                msg = T[bagio.POSE_TYPE](header=header(to_ns(ts), "panda_link0"), pose=pose)
            msgs.append((to_ns(ts + scan.pose_latency_s), pose_topic, msg, bagio.POSE_TYPE))
    if annotation_topic is not None:
        for ts, text in scan.annotations:
            msg = bagio.make_string(text) if distro == "jazzy" else T[bagio.STRING_TYPE](data=text)
            msgs.append((to_ns(ts), annotation_topic, msg, bagio.STRING_TYPE))
    for topic, typ in scan.extra_topics.items():
        msgs.append((scan.start_ns, topic, T[bagio.STRING_TYPE](data="x"), bagio.STRING_TYPE)
                    if typ == bagio.STRING_TYPE else (scan.start_ns, topic, None, typ))
    msgs.sort(key=lambda m: m[0])

    writer = Writer(path, version=9 if distro == "jazzy" else 8, storage_plugin=bagio.STORAGES[storage])
    if distro == "jazzy":
        writer.set_custom_data("cardiac_copilot.subject_id", scan.subject_id)
        writer.set_custom_data("cardiac_copilot.session_label", f"synthetic {scan.subject_id}")
    writer.open()
    conns = {}
    try:
        for log_ns, topic, msg, typ in msgs:
            if topic not in conns:
                conns[topic] = (writer.add_connection(topic, typ, typestore=store), typ)
            if msg is not None:
                writer.write(conns[topic][0], log_ns, store.serialize_cdr(msg, typ))
    finally:
        writer.close()
    if distro == "humble":
        _make_humble_like(path, storage)
    return path


def _make_humble_like(path: Path, storage: str) -> None:
    """Rewrite metadata (and sqlite schema) the way Humble's rosbag2 leaves them."""
    meta_path = path / "metadata.yaml"
    yml = YAML(typ="safe")
    meta = yml.load(meta_path.read_text())
    info = meta["rosbag2_bagfile_information"]
    info["version"] = 5
    for key in ("custom_data", "ros_distro"):
        info.pop(key, None)
    for t in info.get("topics_with_message_count", []):
        t["topic_metadata"].pop("type_description_hash", None)
    with meta_path.open("w") as fh:
        yml.dump(meta, fh)
    if storage == "sqlite3":
        for db in path.glob("*.db3"):
            con = sqlite3.connect(db)
            con.executescript("DROP TABLE message_definitions; DROP TABLE metadata; "
                              "UPDATE schema SET schema_version = 3, ros_distro = 'humble';")
            con.commit()
            con.close()
