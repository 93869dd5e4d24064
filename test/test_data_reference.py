"""Reference recomputation of the cache's ground truth straight from a bag's raw messages.

Shared by the test_data_* files (no tests here). Independent of data/build.py except for
pose.py (the algebra under test elsewhere): the round-trip tests compare the cache with this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cardiac_copilot_ros import bagio
from cardiac_copilot_ros.planes import UnknownPlaneError, parse_plane
from cardiac_copilot_ros.pose import interpolate_poses, pose_to_matrix, relative_action


def raw_streams(bag: Path, image_topic: str = bagio.IMAGE_TOPIC, pose_topic: str = bagio.POSE_TOPIC,
                annotation_topic: str = bagio.ANNOTATION_TOPIC) -> dict[str, np.ndarray]:
    """Image stamps, pose stamps/positions/quaternions and annotation (log time, plane index)."""
    img, pst, pv, ann = [], [], [], []
    reader = bagio.open_reader(bag)
    msgs = []
    conns = [c for c in reader.connections if c.topic in (image_topic, pose_topic, annotation_topic)]
    for conn, log_ns, raw in reader.messages(connections=conns):
        try:
            msgs.append((conn.topic, log_ns, reader.deserialize(raw, conn.msgtype)))
        except Exception:  # damaged message (the builder counts it)
            pass
    reader.close()
    for topic, log_ns, msg in msgs:
        if topic == image_topic:
            img.append(bagio.stamp_to_ns(msg.header.stamp))
        elif topic == pose_topic:
            p, q = msg.pose.position, msg.pose.orientation
            if np.linalg.norm([q.x, q.y, q.z, q.w]) < 1e-9:
                continue
            pst.append(bagio.stamp_to_ns(msg.header.stamp))
            pv.append((p.x, p.y, p.z, q.x, q.y, q.z, q.w))
        else:
            try:
                ann.append((log_ns, parse_plane(msg.data).index))
            except UnknownPlaneError:
                pass
    order = np.argsort(pst, kind="stable")
    pv = np.asarray(pv)[order]
    return {"image_ns": np.sort(np.asarray(img, np.int64)), "pose_ns": np.asarray(pst, np.int64)[order],
            "pos": pv[:, :3], "quat": pv[:, 3:], "ann_ns": np.asarray([a[0] for a in ann], np.int64),
            "ann_plane": np.asarray([a[1] for a in ann], np.int64)}


def reference_actions(bag: Path, stamps_ns: np.ndarray, demo_ann_ns: np.ndarray,
                      max_gap_ms: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """(poses (N, 4, 4) mm, actions (N, 6)) at image ``stamps_ns`` towards the probe pose at
    each frame's annotation time ``demo_ann_ns`` (both from the raw bag, float64)."""
    s = raw_streams(bag)
    gap = int(max_gap_ms * 1e6)
    p, q, ok = interpolate_poses(stamps_ns, s["pose_ns"], s["pos"], s["quat"], gap)
    assert ok.all()
    tp, tq, tok = interpolate_poses(demo_ann_ns, s["pose_ns"], s["pos"], s["quat"], gap)
    assert tok.all()
    T = pose_to_matrix(p, q)
    return T, relative_action(T, pose_to_matrix(tp, tq))


def check_round_trip(cache: Path, manifest: dict, tol: float = 1e-3) -> int:
    """Assert every cached frame's pose and action equal the reference from its bag; returns N."""
    actions = np.load(cache / "actions.npy", mmap_mode="r")
    poses = np.load(cache / "poses.npy", mmap_mode="r")
    stamps = np.load(cache / "stamp_ns.npy")
    scan = np.load(cache / "scan.npy")
    demo = np.load(cache / "demo.npy")
    ann_ns = np.asarray([d["annotation_ns"] for d in manifest["demos"]], np.int64)
    n = 0
    for entry in manifest["bags"]:
        rows = np.flatnonzero(scan == entry["scan"])
        if not len(rows):
            continue
        T, ref = reference_actions(Path(entry["path"]), stamps[rows], ann_ns[demo[rows]],
                                   entry.get("max_pose_gap_ms_used", manifest["options"]["max_pose_gap_ms"]))
        got = np.asarray(actions[rows], np.float64)
        err = np.abs(got - ref)
        err[:, 3:] = np.minimum(err[:, 3:], 360.0 - err[:, 3:])  # Euler wrap
        assert err.max() < tol, f"{entry['path']}: max action error {err.max()}"
        assert np.abs(np.asarray(poses[rows], np.float64) - T).max() < tol
        n += len(rows)
    assert n == manifest["totals"]["frames"]
    return n
