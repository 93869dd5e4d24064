"""rosbag2 bags -> compact training cache (``cardiac-copilot dataset build``).

For every bag (one scan of one subject): images are paired with the probe pose at their
``header.stamp`` (linear position / slerp orientation between the two poses around it; a
frame is dropped and counted when those poses are more than ``max_pose_gap_ms`` apart or the
frame lies outside the pose stream); annotations (plane names, bag log time) split the scan
into demonstrations; every frame gets the ground-truth action ``U^-1(T_t^-1 T_T)`` (mm, deg)
to its demonstration's target pose ``T_T`` = the probe pose at the annotation time (the
nearest pose when the annotation falls up to ``annotation_tolerance_s`` before the first or
after the last pose). The largest pose gap is never less than 1.5 x the pose stream's median
period. Tool poses become image-frame poses through the probe calibration (``calibration.py``:
``--probe-calibration`` file, else the bag's ``/tf_static``, else none) before interpolation.

Demonstration boundaries: demonstration ``j`` holds the frames with stamps in
``(end_{j-1}, end_j]`` where ``end_j = min(t_j + hold, (t_j + t_{j+1}) / 2)``: the frames up to
the annotation plus the hold at the plane just after it (``hold_ms``, default 1 s, never past
half way to the next annotation). Frames after the last ``end`` have no target and are dropped
and counted (``after_last_annotation``).

The cache (see docs/DATA.md) is written to a temporary directory beside ``out`` and renamed
into place only when complete, so an interrupted build never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import bagio, code_version
from ..images import ImageFormatError, compressed_msg_to_gray, image_msg_to_array, resize_gray, to_gray_u8
from ..planes import UnknownPlaneError, parse_plane, view_names
from ..pose import ACTION_AXES, ACTION_UNITS, interpolate_poses, pose_to_matrix, relative_action
from .calibration import (
    TF_MESSAGE_TYPE,
    TF_STATIC_TOPIC,
    CalibrationError,
    ProbeCalibration,
    calibration_from_tf,
    load_calibration,
    static_transforms,
)

#: Cache format identifiers (bump FORMAT_VERSION on incompatible layout changes).
FORMAT = "cardiac_copilot_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Array files of the cache: name -> (dtype, per-frame shape or None for images).
ARRAYS: dict[str, str] = {
    "images": "uint8", "poses": "float32", "actions": "float32", "plane": "int64",
    "subject": "int64", "scan": "int64", "demo": "int64", "stamp_ns": "int64",
}
SPLITS = ("train", "val", "test")

#: Frame skip reasons (each dropped image is counted under exactly one).
SKIP_REASONS = ("bad_image", "before_first_pose", "after_last_pose", "pose_gap",
                "after_last_annotation", "no_target_pose")

_IMAGE_TYPES = (bagio.IMAGE_TYPE, bagio.COMPRESSED_IMAGE_TYPE)


class DatasetError(RuntimeError):
    """Bad input or a failed build; the message says what and which bag."""


@dataclass
class BuildOptions:
    """Options of ``dataset build`` (the CLI flags, same names)."""

    image_topic: str = bagio.IMAGE_TOPIC
    pose_topic: str = bagio.POSE_TOPIC
    annotation_topic: str = bagio.ANNOTATION_TOPIC
    size: int = 224
    crop: tuple[int, int, int, int] | None = None
    max_pose_gap_ms: float = 20.0
    hold_ms: float = 1000.0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    split_file: str | None = None
    workers: int = 1
    skip_bad_bags: bool = False
    #: an annotation before the first / after the last pose takes the nearest pose within this
    annotation_tolerance_s: float = 0.5
    #: YAML file with the tool <- image calibration (else the bag's /tf_static, else none)
    probe_calibration: str | None = None
    #: frame whose pose the pose topic carries (for /tf_static chains; default: the parent of
    #: the image frame's static transform)
    tool_frame: str | None = None

    def validate(self) -> None:
        if not 8 <= self.size <= 2048:
            raise DatasetError(f"--size must be in 8..2048 px, got {self.size}")
        if self.crop is not None:
            if len(self.crop) != 4 or self.crop[2] <= 0 or self.crop[3] <= 0 or min(self.crop[:2]) < 0:
                raise DatasetError(f"--crop must be x,y,w,h with w, h > 0 and x, y >= 0, got {self.crop}")
        if self.max_pose_gap_ms <= 0:
            raise DatasetError(f"--max-pose-gap-ms must be > 0, got {self.max_pose_gap_ms}")
        if not 0 <= self.annotation_tolerance_s <= 3600:
            raise DatasetError(f"--annotation-tolerance-s must be in 0..3600 s, got {self.annotation_tolerance_s}")
        if self.hold_ms < 0:
            raise DatasetError(f"--hold-ms must be >= 0, got {self.hold_ms}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise DatasetError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DatasetError("--val-fraction + --test-fraction must be < 1")
        if self.workers < 1:
            raise DatasetError(f"--workers must be >= 1, got {self.workers}")


# ---------------------------------------------------------------------------------------
# Finding bags and topics
# ---------------------------------------------------------------------------------------


def _is_bag_dir(p: Path) -> bool:
    return p.is_dir() and (p / "metadata.yaml").is_file()


def find_bags(paths: Iterable[str | Path]) -> list[Path]:
    """Bag directories under ``paths`` (a bag directory, a single .mcap/.db3 file, or any
    directory searched recursively, e.g. a ``simulate`` output); sorted, without duplicates."""
    found: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DatasetError(f"no such bag or directory: {p}")
        if _is_bag_dir(p) or (p.is_file() and p.suffix in (".mcap", ".db3")):
            found[p.resolve()] = None
            continue
        if p.is_file():
            raise DatasetError(f"not a rosbag2 bag: {p} (expected a bag directory with metadata.yaml, "
                               "a .mcap/.db3 file, or a directory of bags)")
        hits = sorted(m.parent for m in p.rglob("metadata.yaml") if _is_bag_dir(m.parent))
        # a bag inside a bag directory is not a separate bag (cannot happen with rosbag2, but be safe)
        hits = [h for h in hits if not any(o != h and o in h.parents for o in hits)]
        if not hits:
            raise DatasetError(f"no rosbag2 bags (directories with metadata.yaml) found under {p}")
        for h in hits:
            found[h.resolve()] = None
    return sorted(found)


def _describe(conns: Sequence[Any]) -> str:
    return ", ".join(sorted({f"{c.topic} [{c.msgtype}]" for c in conns})) or "none"


def resolve_topic(conns: Sequence[Any], requested: str, types: Sequence[str], role: str,
                  bag: Path) -> tuple[str, str]:
    """The topic to read for ``role``: ``requested`` if present (checking its type), else the
    bag's only topic of one of ``types``; a :class:`DatasetError` otherwise."""
    by_topic: dict[str, set[str]] = {}
    for c in conns:
        by_topic.setdefault(c.topic, set()).add(c.msgtype)
    if requested in by_topic:
        have = by_topic[requested]
        if len(have) != 1 or next(iter(have)) not in types:
            raise DatasetError(f"{bag}: {role} topic {requested} has type {', '.join(sorted(have))}; "
                               f"expected {' or '.join(types)}")
        return requested, next(iter(have))
    cands = sorted(t for t, ty in by_topic.items() if len(ty) == 1 and next(iter(ty)) in types)
    if role == "pose" and bagio.POSE_SYNC_TOPIC in cands and len(cands) > 1:
        cands.remove(bagio.POSE_SYNC_TOPIC)  # recorder bags: raw poses beat the resampled copy
    if len(cands) == 1:
        return cands[0], next(iter(by_topic[cands[0]]))
    if not cands:
        raise DatasetError(f"{bag}: no {role} topic: {requested} is absent and no topic has type "
                           f"{' or '.join(types)} (topics: {_describe(conns)}); "
                           f"pass --{role}-topic")
    raise DatasetError(f"{bag}: {role} topic {requested} is absent and several topics could be it: "
                       f"{', '.join(cands)}; choose one with --{role}-topic")


def bag_sha256(bag: Path) -> tuple[str, dict[str, str]]:
    """sha256 of every file of a bag (name -> hex) and one digest over all of them."""
    files = sorted(f for f in bag.rglob("*") if f.is_file()) if bag.is_dir() else [bag]
    per: dict[str, str] = {}
    for f in files:
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        per[f.relative_to(bag).as_posix() if bag.is_dir() else f.name] = h.hexdigest()
    total = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in per.items()).encode()).hexdigest()
    return total, per


# ---------------------------------------------------------------------------------------
# One bag -> arrays
# ---------------------------------------------------------------------------------------


def prepare_image(gray: np.ndarray, size: int, crop: tuple[int, int, int, int] | None) -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8: crop ROI (x, y, w, h) first, then
    :func:`images.resize_gray` (cv2.INTER_AREA when shrinking; the runtime uses the same)."""
    if crop is not None:
        x, y, w, h = crop
        if x + w > gray.shape[1] or y + h > gray.shape[0]:
            raise DatasetError(f"--crop {x},{y},{w},{h} lies outside the {gray.shape[1]} x "
                               f"{gray.shape[0]} px image")
        gray = gray[y:y + h, x:x + w]
    return resize_gray(gray, (size, size))


def _decode(msg: Any, msgtype: str) -> np.ndarray:
    if msgtype == bagio.COMPRESSED_IMAGE_TYPE:
        return compressed_msg_to_gray(msg)
    return to_gray_u8(image_msg_to_array(msg), str(msg.encoding))


def demo_ends(annotation_ns: np.ndarray, hold_ns: int) -> np.ndarray:
    """End stamp (inclusive) of each demonstration for sorted annotation times."""
    t = np.asarray(annotation_ns, dtype=np.int64)
    ends = t + int(hold_ns)
    if len(t) > 1:
        mid = t[:-1] + (t[1:] - t[:-1]) // 2
        ends[:-1] = np.minimum(ends[:-1], mid)
    return ends


def _subject_of(reader: Any, bag: Path) -> tuple[str, str]:
    custom: dict[str, str] = {}
    for r in getattr(reader, "readers", []):
        meta = getattr(getattr(r, "storage", None), "metadata", None)
        custom.update(getattr(meta, "custom", None) or {})
    for key, source in (("cardiac_copilot.subject_id", "custom_data subject_id"),
                        ("cardiac_copilot.session_label", "custom_data session_label")):
        if str(custom.get(key, "")).strip():
            return str(custom[key]).strip(), source
    name = bag.name if bag.is_dir() else bag.stem
    return name, "bag name"


def effective_max_gap_ns(pose_ns: np.ndarray, max_pose_gap_ms: float) -> tuple[int, int | None]:
    """(largest gap between two poses a frame or an annotation is interpolated from, median pose
    period) in ns: ``max(--max-pose-gap-ms, 1.5 x the median period)``, so a pose stream that
    comes once per frame (or at any steady rate) is never a gap at its own rate."""
    configured = int(round(max_pose_gap_ms * 1e6))
    d = np.diff(np.asarray(pose_ns, dtype=np.int64))
    d = d[d > 0]
    if not len(d):
        return configured, None
    period = int(np.median(d))
    return max(configured, int(round(1.5 * period))), period


def _annotation_problem(label: str, t_ns: int, ps: np.ndarray, t0_ns: int, gap_ns: int,
                        opts: BuildOptions) -> str:
    """Why an annotation has no target pose, and the option that fixes it (one line)."""
    at = f"annotation {label!r} at t={(t_ns - t0_ns) / 1e9:.3f} s (from the scan start)"
    tol = f"--annotation-tolerance-s is {opts.annotation_tolerance_s:g} s"
    if t_ns > ps[-1]:
        d = (t_ns - int(ps[-1])) / 1e9
        return (f"{at} falls {d:.3f} s after the last pose (t={(int(ps[-1]) - t0_ns) / 1e9:.3f} s) and {tol}: "
                f"raise it above {d:.3f} to take the last pose as the target, or check the clocks")
    if t_ns < ps[0]:
        d = (int(ps[0]) - t_ns) / 1e9
        return (f"{at} falls {d:.3f} s before the first pose (t={(int(ps[0]) - t0_ns) / 1e9:.3f} s) and {tol}: "
                f"raise it above {d:.3f} to take the first pose as the target, or check the clocks")
    hi = int(np.searchsorted(ps, t_ns))
    g = (int(ps[hi]) - int(ps[hi - 1])) / 1e6
    return (f"{at} falls in a {g:.1f} ms gap of the pose stream (largest gap used {gap_ns / 1e6:.1f} ms): "
            f"raise --max-pose-gap-ms above {g:.1f} to interpolate across it")


def _calibration(opts: BuildOptions, tf_msgs: list[Any], image_frame: str, bag: Path) -> ProbeCalibration | None:
    try:
        if opts.probe_calibration:
            return load_calibration(opts.probe_calibration)
        return calibration_from_tf(static_transforms(tf_msgs), image_frame, opts.tool_frame)
    except CalibrationError as exc:
        raise DatasetError(f"{bag}: {exc}") from None


def read_bag(bag: Path, opts: BuildOptions, chunk_path: Path) -> dict[str, Any]:
    """Read one bag; write its kept images to ``chunk_path`` (.npy) and return everything else.

    Raises :class:`DatasetError` for a bag that cannot be read or lacks a needed topic.
    """
    from ..recording import recover_hint  # an unfinished recording: the error says how to repair it

    try:
        return _read_bag(bag, opts, chunk_path)
    except DatasetError:
        raise
    except bagio.BagError as exc:
        raise DatasetError(f"corrupt or unreadable bag: {_one_line(exc)}{recover_hint(bag)}") from None
    except Exception as exc:  # rosbags/mcap/sqlite raise many types for damaged files
        raise DatasetError(f"corrupt or unreadable bag {bag}: {type(exc).__name__}: {_one_line(exc)}"
                           f"{recover_hint(bag)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _read_bag(bag: Path, opts: BuildOptions, chunk_path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    reader = bagio.open_reader(bag)
    skips = dict.fromkeys(SKIP_REASONS, 0)
    ignored: list[dict[str, Any]] = []
    try:
        conns = list(reader.connections)
        img_topic, img_type = resolve_topic(conns, opts.image_topic, _IMAGE_TYPES, "image", bag)
        pose_topic, _ = resolve_topic(conns, opts.pose_topic, (bagio.POSE_TYPE,), "pose", bag)
        ann_topic, _ = resolve_topic(conns, opts.annotation_topic, (bagio.STRING_TYPE,), "annotation", bag)
        subject, subject_source = _subject_of(reader, bag)
        wanted = [c for c in conns if c.topic in (img_topic, pose_topic, ann_topic)
                  or (c.topic == TF_STATIC_TOPIC and c.msgtype == TF_MESSAGE_TYPE)]
        tf_msgs: list[Any] = []
        image_frame: str | None = None
        img_stamps: list[int] = []
        images: list[np.ndarray] = []
        pose_stamps: list[int] = []
        pose_vals: list[tuple[float, ...]] = []
        anns: list[tuple[int, str]] = []
        n_images = 0
        bad_msgs = {"pose": 0, "annotation": 0}
        for conn, log_ns, raw in reader.messages(connections=wanted):
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except Exception:  # one damaged message: count it, keep the rest of the bag
                msg = None
            if conn.msgtype == TF_MESSAGE_TYPE:  # /tf_static: probe calibration
                if msg is not None:
                    tf_msgs.append(msg)
                continue
            if conn.topic == img_topic:
                n_images += 1
                try:
                    if msg is None:
                        raise ImageFormatError("undecodable message")
                    img = prepare_image(_decode(msg, conn.msgtype), opts.size, opts.crop)
                except ImageFormatError:
                    skips["bad_image"] += 1
                    continue
                img_stamps.append(bagio.stamp_to_ns(msg.header.stamp))
                images.append(img)
                if image_frame is None:
                    image_frame = str(msg.header.frame_id)
            elif msg is None:
                bad_msgs["pose" if conn.topic == pose_topic else "annotation"] += 1
            elif conn.topic == pose_topic:
                p, q = msg.pose.position, msg.pose.orientation
                pose_stamps.append(bagio.stamp_to_ns(msg.header.stamp))
                pose_vals.append((p.x, p.y, p.z, q.x, q.y, q.z, q.w))
            else:
                anns.append((int(log_ns), str(msg.data)))
    finally:
        reader.close()

    topic_counts = {"image": n_images, "pose": len(pose_stamps), "annotation": len(anns)}
    if n_images == 0:
        raise DatasetError(f"{bag}: image topic {img_topic} has no messages")
    if not pose_stamps:
        raise DatasetError(f"{bag}: pose topic {pose_topic} has no messages (images without poses)")
    if not anns:
        raise DatasetError(f"{bag}: annotation topic {ann_topic} has no messages (no target planes)")

    # poses: sorted by stamp, unusable ones (zero / non-finite quaternion) left out
    ps = np.asarray(pose_stamps, dtype=np.int64)
    pv = np.asarray(pose_vals, dtype=np.float64)
    qn = np.linalg.norm(pv[:, 3:], axis=1)
    good = np.all(np.isfinite(pv), axis=1) & (qn > 1e-9)
    bad_pose_msgs = int((~good).sum()) + bad_msgs["pose"]
    order = np.argsort(ps[good], kind="stable")
    ps, pv = ps[good][order], pv[good][order]
    if len(ps) == 0:
        raise DatasetError(f"{bag}: no valid pose on {pose_topic} (all quaternions zero or not finite)")
    calib = _calibration(opts, tf_msgs, image_frame or "", bag)
    if calib is not None:  # tool poses -> image-frame poses, before interpolation
        pv = np.concatenate(calib.apply(pv[:, :3], pv[:, 3:]), axis=1)
    gap_ns, period_ns = effective_max_gap_ns(ps, opts.max_pose_gap_ms)

    # annotations -> demonstrations with a target pose
    plane_of: list[int] = []
    ann_ns: list[int] = []
    labels: list[str] = []
    for t, text in sorted(anns):
        try:
            plane_of.append(parse_plane(text).index)
            ann_ns.append(t)
            labels.append(text)
        except UnknownPlaneError:
            ignored.append({"time_ns": t, "text": text, "reason": "not a plane name"})
    if not ann_ns:
        raise DatasetError(f"{bag}: no annotation on {ann_topic} names a known view "
                           f"({', '.join(view_names())}; add views with --views FILE); "
                           f"got {sorted({a[1] for a in anns})[:5]}")
    a_ns = np.asarray(ann_ns, dtype=np.int64)
    tpos, tquat, tvalid = interpolate_poses(a_ns, ps, pv[:, :3], pv[:, 3:], max_gap_ns=gap_ns)
    # outside the pose stream: the nearest pose (which interpolate_poses holds) within the tolerance
    tol_ns = int(round(opts.annotation_tolerance_s * 1e9))
    off_ns = np.maximum(ps[0] - a_ns, a_ns - ps[-1])
    snapped = ~tvalid & (off_ns > 0) & (off_ns <= tol_ns)
    tvalid = tvalid | snapped
    targets = pose_to_matrix(tpos, tquat)
    t0_ns = min(int(ps[0]), min(img_stamps, default=int(ps[0])))
    for j in np.flatnonzero(~tvalid):
        detail = _annotation_problem(labels[j], int(a_ns[j]), ps, t0_ns, gap_ns, opts)
        ignored.append({"time_ns": int(a_ns[j]), "text": labels[j], "reason": "no probe pose at this time",
                        "detail": f"{bag}: {detail}"})

    # frames: pose at stamp, demonstration, action
    st = np.asarray(img_stamps, dtype=np.int64)
    order = np.argsort(st, kind="stable")
    st = st[order]
    fpos, fquat, fvalid = interpolate_poses(st, ps, pv[:, :3], pv[:, 3:], max_gap_ns=gap_ns)
    before = st < ps[0]
    after = st > ps[-1]
    skips["before_first_pose"] = int(before.sum())
    skips["after_last_pose"] = int(after.sum())
    skips["pose_gap"] = int((~fvalid & ~before & ~after).sum())
    ends = demo_ends(a_ns, int(round(opts.hold_ms * 1e6)))
    demo_of = np.searchsorted(ends, st, side="left")
    no_target = demo_of >= len(ends)
    skips["after_last_annotation"] = int((fvalid & no_target).sum())
    demo_c = np.minimum(demo_of, len(ends) - 1)
    bad_target = fvalid & ~no_target & ~tvalid[demo_c]
    skips["no_target_pose"] = int(bad_target.sum())
    keep = fvalid & ~no_target & ~bad_target

    T = pose_to_matrix(fpos[keep], fquat[keep])
    d = demo_of[keep]
    actions = relative_action(T, targets[d]) if len(d) else np.zeros((0, 6))
    # renumber the demonstrations that kept frames
    used = np.unique(d)
    local = np.searchsorted(used, d)
    demos = [{"plane": int(plane_of[j]), "label": labels[j], "annotation_ns": int(a_ns[j]),
              "frames": int((d == j).sum())} for j in used]
    kept_images = [images[i] for i in order[keep]]
    arr = (np.stack(kept_images) if kept_images
           else np.zeros((0, opts.size, opts.size), np.uint8))
    np.save(chunk_path, arr)
    sha, files = bag_sha256(bag)
    return {
        "path": str(bag), "sha256": sha, "files": files, "subject_id": subject,
        "subject_source": subject_source,
        "topics": {"image": img_topic, "image_type": img_type, "pose": pose_topic, "annotation": ann_topic},
        "messages": topic_counts, "bad_pose_messages": bad_pose_msgs,
        "frames_read": n_images, "frames_kept": int(keep.sum()), "skips": skips,
        "annotations_ignored": ignored, "bad_annotation_messages": bad_msgs["annotation"], "demos": demos,
        "annotations_nearest_pose": int(snapped.sum()),
        "pose_period_ms": None if period_ns is None else round(period_ns / 1e6, 3),
        "max_pose_gap_ms_used": round(gap_ns / 1e6, 3),
        "largest_pose_gap_ms": round(float(np.diff(ps).max()) / 1e6, 3) if len(ps) > 1 else None,
        "image_frame": image_frame, "calibration": calib.as_dict() if calib is not None else None,
        "seconds": round(time.perf_counter() - t0, 3),
        # arrays (removed before the manifest)
        "_chunk": str(chunk_path), "_poses": T.astype(np.float32), "_actions": actions.astype(np.float32),
        "_stamp_ns": st[keep], "_demo_local": local.astype(np.int64),
        "_plane": np.asarray([plane_of[j] for j in d], dtype=np.int64).reshape(-1),
        "_targets": targets[used],
    }


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def read_split_file(path: str | Path) -> dict[str, str]:
    """A split file -> {subject: split}. JSON ``{"train": [...], "val": [...], "test": [...]}``
    (any subset of the keys), or a cache manifest (its ``splits`` are reused)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read split file {p}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("splits"), dict):
        data = data["splits"]
    if not isinstance(data, dict) or not set(data) <= set(SPLITS):
        raise DatasetError(f"split file {p}: expected a JSON object with keys among {', '.join(SPLITS)}")
    forced: dict[str, str] = {}
    for split, subjects in data.items():
        if not isinstance(subjects, list):
            raise DatasetError(f"split file {p}: {split} must be a list of subject ids")
        for s in subjects:
            s = str(s)
            if s in forced and forced[s] != split:
                raise DatasetError(f"split file {p}: subject {s!r} is in both {forced[s]} and {split}")
            forced[s] = split
    return forced


def split_subjects(subjects: Iterable[str], val_fraction: float, test_fraction: float, seed: int,
                   forced: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Assign every subject to exactly one of train/val/test, deterministic for ``seed``.

    The numbers follow the fractions of the subject count (rounded); a split with a non-zero
    fraction gets at least one subject while train keeps at least one (test gives way first).
    ``forced`` subjects go where they are told and count towards their split.
    """
    subjects = sorted(set(subjects))
    forced = {s: v for s, v in (forced or {}).items() if s in subjects}
    n = len(subjects)
    want = {"val": round(val_fraction * n), "test": round(test_fraction * n)}
    for name, frac in (("val", val_fraction), ("test", test_fraction)):
        if frac > 0:
            want[name] = max(want[name], 1)
    for name in ("test", "val"):
        while want["val"] + want["test"] > n - 1 and want[name] > 0:
            want[name] -= 1
    out: dict[str, list[str]] = {k: [s for s in subjects if forced.get(s) == k] for k in SPLITS}
    free = [subjects[i] for i in np.random.default_rng(seed).permutation(n) if subjects[i] not in forced]
    for name in ("val", "test"):
        need = max(0, want[name] - len(out[name]))
        while need and len(free) > (0 if out["train"] else 1):
            out[name].append(free.pop(0))
            need -= 1
    out["train"].extend(free)
    return {k: sorted(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------


def _json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest content without its own ``manifest_sha256`` field."""
    return _json_sha256({k: v for k, v in manifest.items() if k != "manifest_sha256"})


def _read_bag_job(args: tuple[Path, BuildOptions, Path]) -> dict[str, Any]:
    return read_bag(*args)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise DatasetError(f"{out} already exists; use --force to replace it")
        if not out.is_dir() or not ((out / MANIFEST).is_file() or not any(out.iterdir())):
            raise DatasetError(f"{out} exists and is not a training cache (no {MANIFEST}); "
                               "refusing to replace it even with --force")


def build_cache(inputs: Iterable[str | Path], out: str | Path, opts: BuildOptions | None = None,
                force: bool = False, progress: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the training cache at ``out`` from bags; returns the manifest.

    Raises :class:`DatasetError` for bad input (missing topics, corrupt bags unless
    ``skip_bad_bags``, no usable frame at all) and leaves nothing at ``out`` in that case.
    """
    opts = opts or BuildOptions()
    opts.validate()
    log = log or (lambda s: None)
    out = Path(out)
    _prepare_out(out, force)
    forced = read_split_file(opts.split_file) if opts.split_file else {}
    if opts.probe_calibration:
        try:
            calib = load_calibration(opts.probe_calibration)
        except CalibrationError as exc:
            raise DatasetError(str(exc)) from None
        log(f"probe calibration {calib.parent_frame} <- {calib.child_frame} from {opts.probe_calibration} "
            "(overrides any /tf_static in the bags)")
    bags = find_bags(inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "chunks").mkdir(parents=True)
    try:
        manifest = _build_into(tmp, bags, opts, forced, progress, log)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _read_all(bags: list[Path], opts: BuildOptions, chunks: Path, progress: bool,
              log: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    from tqdm import tqdm

    jobs = [(b, opts, chunks / f"{i:06d}.npy") for i, b in enumerate(bags)]
    results: dict[int, dict[str, Any]] = {}
    failed: list[dict[str, str]] = []
    bar = tqdm(total=len(jobs), desc="dataset build", unit="bag", disable=not progress, leave=False)

    def done(i: int, res: dict[str, Any] | None, err: DatasetError | None) -> None:
        if err is not None:
            if not opts.skip_bad_bags:
                raise err
            failed.append({"path": str(bags[i]), "error": str(err)})
            log(f"skipping bag: {err}")
        else:
            results[i] = res
        bar.update(1)
        bar.set_postfix(frames=sum(r["frames_kept"] for r in results.values()))

    try:
        if opts.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(min(opts.workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
                futs = {ex.submit(_read_bag_job, j): i for i, j in enumerate(jobs)}
                try:
                    for fut in as_completed(futs):
                        try:
                            done(futs[fut], fut.result(), None)
                        except DatasetError as err:
                            done(futs[fut], None, err)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
        else:
            for i, job in enumerate(jobs):
                try:
                    res = read_bag(*job)
                except DatasetError as err:
                    done(i, None, err)
                else:
                    done(i, res, None)
    finally:
        bar.close()
    return [results[i] for i in sorted(results)], failed


def _log_timing(results: list[dict[str, Any]], opts: BuildOptions, log: Callable[[str], None]) -> None:
    """One line each: annotations without a target, pose gaps raised to the pose rate, calibration."""
    for r in results:
        for a in r["annotations_ignored"]:
            if a.get("detail"):
                log(f"warning: {a['detail']}")
    raised = [r for r in results if r["max_pose_gap_ms_used"] > opts.max_pose_gap_ms + 1e-9]
    if raised:
        r = raised[0]
        log(f"max pose gap follows the pose rate in {len(raised)} bag(s) (e.g. {Path(r['path']).name}: poses "
            f"every {r['pose_period_ms']:.1f} ms (median) -> {r['max_pose_gap_ms_used']:.1f} ms instead of "
            f"--max-pose-gap-ms {opts.max_pose_gap_ms:g})")
    snapped = sum(r["annotations_nearest_pose"] for r in results)
    if snapped:
        log(f"{snapped} annotation(s) outside the pose stream took the nearest pose (within "
            f"--annotation-tolerance-s {opts.annotation_tolerance_s:g} s)")
    if opts.probe_calibration:
        other = [r for r in results if r["calibration"] and r["image_frame"]
                 and r["image_frame"].lstrip("/") != r["calibration"]["child_frame"]]
        if other:
            log(f"warning: the calibration's child_frame {other[0]['calibration']['child_frame']!r} is not the "
                f"images' frame_id {other[0]['image_frame']!r} in {len(other)} bag(s) (e.g. {other[0]['path']}): "
                "is it the calibration of this probe?")
    else:
        tf = [r for r in results if r["calibration"]]
        if tf:
            c = tf[0]["calibration"]
            log(f"probe calibration from the bags' {TF_STATIC_TOPIC} in {len(tf)} of {len(results)} bag(s) "
                f"(e.g. {c['parent_frame']} <- {c['child_frame']})")


def _timing_hint(results: list[dict[str, Any]], skips: dict[str, int]) -> str:
    """The cause and the fix when most frames lack a target pose or fall in pose gaps."""
    worst = max(("no_target_pose", "pose_gap"), key=lambda k: skips[k])
    if not skips[worst]:
        return ""
    if worst == "no_target_pose":
        details = [a["detail"] for r in results for a in r["annotations_ignored"] if a.get("detail")]
        return f"; {details[0]}" if details else ""
    r = max(results, key=lambda r: r["skips"]["pose_gap"])
    return (f"; {r['path']}: poses come every {r['pose_period_ms']} ms (median) with gaps up to "
            f"{r['largest_pose_gap_ms']} ms, more than the {r['max_pose_gap_ms_used']} ms allowed: raise "
            "--max-pose-gap-ms, or check that the pose stream has no dropouts")


def _build_into(tmp: Path, bags: list[Path], opts: BuildOptions, forced: dict[str, str], progress: bool,
                log: Callable[[str], None]) -> dict[str, Any]:
    results, failed = _read_all(bags, opts, tmp / "chunks", progress, log)
    total = sum(r["frames_kept"] for r in results)
    skips = {k: sum(r["skips"][k] for r in results) for k in SKIP_REASONS}
    if total == 0:
        read = sum(r["frames_read"] for r in results)
        detail = ", ".join(f"{k} {v}" for k, v in skips.items() if v) or "no bag could be read"
        outside = skips["before_first_pose"] + skips["after_last_pose"]
        hint = ("; image and pose header stamps do not overlap: are they stamped on the same clock?"
                if read and outside >= 0.9 * read else _timing_hint(results, skips))
        raise DatasetError(f"no usable frames: {read} images read from {len(results)} of {len(bags)} "
                           f"bag(s), none has both a probe pose and a target annotation ({detail}){hint}; "
                           "refusing to write an empty dataset")
    _log_timing(results, opts, log)
    with_frames = [r for r in results if r["frames_kept"] > 0]
    subjects = sorted({r["subject_id"] for r in with_frames})
    subject_index = {s: i for i, s in enumerate(subjects)}
    unknown_forced = sorted(set(forced) - set(subjects))
    if unknown_forced:
        log(f"split file names subjects not in these bags (ignored): {', '.join(unknown_forced[:10])}")
    splits = split_subjects(subjects, opts.val_fraction, opts.test_fraction, opts.seed, forced)

    # concatenate into the flat arrays
    size = opts.size
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(total, size, size))
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("poses", "actions", "plane", "subject", "scan",
                                                          "demo", "stamp_ns")}
    demos: list[dict[str, Any]] = []
    targets: list[np.ndarray] = []
    at = 0
    bag_entries = []
    # the views found, in registry order; the cache's plane column indexes this list
    found = sorted({int(d["plane"]) for r in results for d in r["demos"]})
    plane_names = [parse_plane(i).name for i in found]
    local = {g: i for i, g in enumerate(found)}
    for r in results:
        r["demos"] = [{**d, "plane": local[int(d["plane"])]} for d in r["demos"]]
        r["_plane"] = np.asarray([local[int(g)] for g in r["_plane"]], dtype=np.int64).reshape(-1)
    for scan_id, r in enumerate(results):
        n = r["frames_kept"]
        chunk = np.load(r["_chunk"], mmap_mode="r")
        images[at:at + n] = chunk
        del chunk
        os.remove(r["_chunk"])
        demo0 = len(demos)
        for k, d in enumerate(r["demos"]):
            idx = np.flatnonzero(r["_demo_local"] == k)
            demos.append({**d, "scan": scan_id, "subject": subject_index[r["subject_id"]],
                          "start": at + int(idx[0]), "count": int(len(idx))})
        targets.append(r["_targets"])
        cols["poses"].append(r["_poses"])
        cols["actions"].append(r["_actions"])
        cols["plane"].append(r["_plane"])
        cols["subject"].append(np.full(n, subject_index.get(r["subject_id"], -1), np.int64))
        cols["scan"].append(np.full(n, scan_id, np.int64))
        cols["demo"].append(r["_demo_local"] + demo0)
        cols["stamp_ns"].append(r["_stamp_ns"])
        at += n
        bag_entries.append({"scan": scan_id, **{k: v for k, v in r.items() if not k.startswith("_")}})
    images.flush()
    del images
    arrays: dict[str, np.ndarray] = {k: np.concatenate(v) for k, v in cols.items()}
    for k, v in arrays.items():
        np.save(tmp / f"{k}.npy", v.astype(ARRAYS[k], copy=False))
    np.save(tmp / "targets.npy", np.concatenate(targets).astype(np.float64))
    shutil.rmtree(tmp / "chunks", ignore_errors=True)

    # statistics
    split_of_subject = {s: k for k, v in splits.items() for s in v}
    frame_split = np.array([split_of_subject[s] for s in subjects])[arrays["subject"]]
    train_actions = arrays["actions"][frame_split == "train"].astype(np.float64)
    std = train_actions.std(axis=0)
    per_split = {k: int((frame_split == k).sum()) for k in SPLITS}
    plane_counts = {name: int((arrays["plane"] == p).sum()) for p, name in enumerate(plane_names)}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "input_size": [size, size],
        "crop": list(opts.crop) if opts.crop else None,
        "resize": "grayscale uint8, images.resize_gray (cv2.INTER_AREA when shrinking)",
        "topics": {"image": opts.image_topic, "pose": opts.pose_topic, "annotation": opts.annotation_topic},
        "options": {k: v for k, v in asdict(opts).items() if k not in ("workers",)},
        "arrays": {k: {"file": f"{k}.npy", "dtype": ARRAYS[k],
                       "shape": [total, size, size] if k == "images" else [total, *arrays[k].shape[1:]]}
                   for k in ARRAYS} | {"targets": {"file": "targets.npy", "dtype": "float64",
                                                   "shape": [len(demos), 4, 4]}},
        "units": {"poses": "4x4, translation mm (base frame <- probe frame)",
                  "actions": "x, y, z mm; roll, pitch, yaw deg ('sxyz')", "stamp_ns": "image header.stamp ns"},
        "bags": bag_entries,
        "skipped_bags": failed,
        "totals": {"frames": total, "images_read": sum(r["frames_read"] for r in results),
                   "bags": len(results), "bags_skipped": len(failed), "scans": len(results),
                   "demos": len(demos), "subjects": len(subjects), "skips": skips},
        "planes": plane_names,
        "plane_frames": plane_counts,
        "subjects": subject_index,
        "splits": splits,
        "split_frames": per_split,
        "split_file_unknown_subjects": unknown_forced,
        "demos": demos,
        "action_stats": {"split": "train", "axes": list(ACTION_AXES), "units": list(ACTION_UNITS),
                         "frames": int(len(train_actions)),
                         "mean": [round(float(x), 6) for x in train_actions.mean(axis=0)],
                         "std": [round(float(x), 6) for x in std]},
    }
    if any(not math.isfinite(x) for x in manifest["action_stats"]["mean"] + manifest["action_stats"]["std"]):
        raise DatasetError("action statistics are not finite; check the pose stream")
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest

