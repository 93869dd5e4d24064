"""``cardiac-copilot import DIR --out BAGS``: folders of frames plus a pose table -> rosbag2 bags.

The most common way published datasets ship (frames + a table of poses) becomes one bag per
scan in the layout the simulator writes, so ``dataset build`` reads it through the one bag path.

Layout: ``DIR/<subject>/<scan>/poses.csv`` beside the scan's images (PNG / JPG files named in
the ``frame`` column), or beside one video file readable by OpenCV (``frame`` = the 0-based
frame index in the video). Columns ``frame,t,x,y,z,qx,qy,qz,qw,plane``: ``t`` in seconds,
position of the tracked frame in metres and its orientation as a unit quaternion in the base
frame, ``plane`` empty except on the rows where the expert confirmed a view. Options:
``--position-unit mm``; ``--euler AXES --angle-unit deg|rad`` with columns ``roll,pitch,yaw``
(angles about x, y, z) instead of the quaternion; ``--fps`` instead of ``t``;
``--probe-calibration`` (written to the bag's ``/tf_static``, applied by ``dataset build``).

Each bag: ``/us/image/compressed`` (sensor_msgs/CompressedImage: PNG / JPG bytes copied as they
are, other formats and video frames encoded as PNG), ``/probe_pose`` (PoseStamped, header stamp =
the frame's stamp), ``/annotations`` (std_msgs/String with the view's canonical name at the
frame's stamp), ``/tf_static`` with a calibration, and ``custom_data``
``cardiac_copilot.subject_id`` = the subject folder's name. Every table is read and checked
before anything is written; the bags are written into a temporary folder under ``--out`` and
renamed into place only when all of them are complete.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from .. import bagio, code_version
from ..planes import UnknownPlaneError, ViewsFileError, parse_plane, use_views_files, view_names
from .calibration import TF_MESSAGE_TYPE, TF_STATIC_TOPIC, CalibrationError, ProbeCalibration, load_calibration

#: Exit code for bad input.
EXIT_ERROR = 1
POSES_CSV = "poses.csv"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".mpg", ".mpeg", ".m4v", ".webm", ".wmv")
POSITION_UNITS = {"m": 1.0, "mm": 1e-3}
ANGLE_UNITS = ("deg", "rad")
#: Relative stamps (all below this many seconds) are put after this epoch (2023-11-14).
EPOCH_S = 1_700_000_000
RELATIVE_BELOW_S = 100_000_000
QUAT_NORM_TOL = 1e-3
IMAGE_FRAME = "us_image"
BASE_FRAME = "panda_link0"


class ImportDataError(RuntimeError):
    """Bad input to the importer; the message names the file (and line)."""


@dataclass
class ImportOptions:
    """Options of ``cardiac-copilot import`` (the CLI flags, same names)."""

    position_unit: str = "m"
    euler: str | None = None
    angle_unit: str | None = None
    fps: float | None = None
    probe_calibration: str | None = None
    base_frame: str = BASE_FRAME
    image_frame: str = IMAGE_FRAME
    storage: str = "mcap"
    table: str = POSES_CSV

    def validate(self) -> None:
        if self.position_unit not in POSITION_UNITS:
            raise ImportDataError(f"--position-unit must be one of {', '.join(POSITION_UNITS)}, "
                                  f"got {self.position_unit!r}")
        if self.euler is not None:
            euler_axes(self.euler)
            if self.angle_unit not in ANGLE_UNITS:
                raise ImportDataError("--euler needs --angle-unit deg or rad (roll, pitch, yaw columns)")
        elif self.angle_unit is not None:
            raise ImportDataError("--angle-unit applies to Euler angles: pass --euler AXES too")
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= 10_000):
            raise ImportDataError(f"--fps must be in (0, 10000] frames/s, got {self.fps}")
        if self.storage not in bagio.STORAGES:
            raise ImportDataError(f"--storage must be one of {', '.join(bagio.STORAGES)}")

    def columns(self) -> list[str]:
        """Required columns of the pose table."""
        return (["frame"] + ([] if self.fps else ["t"]) + ["x", "y", "z"]
                + (["roll", "pitch", "yaw"] if self.euler else ["qx", "qy", "qz", "qw"]))


def euler_axes(axes: str) -> tuple[int, int, int]:
    """Column order for a transforms3d Tait-Bryan axes string (``sxyz``, ``rzyx``, ...): the
    indices into (roll, pitch, yaw) = angles about (x, y, z) of the first, second and third
    rotation. Proper Euler sequences (an axis twice) have no roll/pitch/yaw reading: refused."""
    from transforms3d.euler import euler2mat

    try:
        euler2mat(0.0, 0.0, 0.0, axes)
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ImportDataError(f"--euler {axes!r} is not a transforms3d axes string "
                              "(e.g. sxyz, szyx, rzyx, rxyz)") from None
    if len(set(axes[1:])) != 3:
        raise ImportDataError(f"--euler {axes!r} repeats an axis; roll, pitch, yaw need three different axes "
                              "(e.g. sxyz, rzyx)")
    return tuple("xyz".index(c) for c in axes[1:])  # type: ignore[return-value]


def canonical_view(text: str) -> str:
    """The canonical name of a confirmed view (any spelling or alias of a view of
    :mod:`cardiac_copilot_ros.planes`, user views included), or :class:`UnknownPlaneError`."""
    return parse_plane(text).name


# ---------------------------------------------------------------------------------------
# Reading tables
# ---------------------------------------------------------------------------------------


@dataclass
class Scan:
    """One scan folder and its checked table."""

    subject: str
    name: str
    folder: Path
    table: Path
    video: Path | None = None
    lines: list[int] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)
    stamp_ns: list[int] = field(default_factory=list)
    positions_m: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    quats_xyzw: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    views: list[str | None] = field(default_factory=list)


def find_scans(root: Path, table: str = POSES_CSV) -> list[Scan]:
    """``root/<subject>/<scan>/<table>`` folders, sorted."""
    if not root.is_dir():
        raise ImportDataError(f"no such directory: {root}")
    hits = sorted(p for p in root.glob(f"*/*/{table}") if p.is_file())
    if not hits:
        elsewhere = sorted(root.rglob(table))[:3]
        where = (f"; found {', '.join(str(p.relative_to(root)) for p in elsewhere)} at another depth"
                 if elsewhere else "")
        raise ImportDataError(f"no {root}/<subject>/<scan>/{table} found{where} (layout: one folder per subject, "
                              f"one per scan inside it, each with {table} beside its images or video)")
    return [Scan(subject=p.parent.parent.name, name=p.parent.name, folder=p.parent, table=p) for p in hits]


def _video_of(folder: Path) -> Path | None:
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if len(videos) > 1:
        raise ImportDataError(f"{folder}: several video files ({', '.join(p.name for p in videos)}); "
                              "keep one video per scan folder")
    return videos[0] if videos else None


def _seconds_to_ns(text: str) -> int:
    d = Decimal(text)
    if not d.is_finite():
        raise InvalidOperation
    return int((d * 1_000_000_000).to_integral_value())


def read_table(scan: Scan, opts: ImportOptions) -> Scan:
    """Read and check ``scan.table``; fills the scan's rows. Errors name file and line."""
    from transforms3d.euler import euler2mat
    from transforms3d.quaternions import mat2quat

    path = scan.table
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportDataError(f"cannot read {path}: {exc}") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise ImportDataError(f"{path}: empty file (expected a header line {','.join(opts.columns())},plane)")
    header = [h.strip().lower() for h in header]
    missing = [c for c in opts.columns() if c not in header]
    if missing:
        raise ImportDataError(f"{path}:1: missing column(s) {', '.join(missing)} (header {','.join(header)}; "
                              f"expected {','.join(opts.columns())},plane)")
    col = {c: header.index(c) for c in header}
    scan.video = _video_of(scan.folder)
    unit = POSITION_UNITS[opts.position_unit]
    order = euler_axes(opts.euler) if opts.euler else None
    angle = (math.pi / 180.0) if opts.angle_unit == "deg" else 1.0
    pos, quat = [], []
    prev_t: int | None = None
    prev_frame = -1
    for row in reader:
        line = reader.line_num
        if not any(v.strip() for v in row):
            continue
        where = f"{path}:{line}"
        if len(row) < len(header):
            raise ImportDataError(f"{where}: {len(row)} values, the header has {len(header)} columns")
        cell = {c: row[i].strip() for c, i in col.items()}

        def num(c: str, cell: dict[str, str] = cell, where: str = where) -> float:
            try:
                v = float(cell[c])
            except ValueError:
                raise ImportDataError(f"{where}: column {c}: {cell[c]!r} is not a number") from None
            if not math.isfinite(v):
                raise ImportDataError(f"{where}: column {c}: {cell[c]!r} is not finite")
            return v

        frame = cell["frame"]
        if not frame:
            raise ImportDataError(f"{where}: column frame is empty")
        if scan.video is not None:
            try:
                index = int(frame)
            except ValueError:
                raise ImportDataError(f"{where}: column frame: {frame!r} is not a frame index of the video "
                                      f"{scan.video.name} (0-based integer)") from None
            if index <= prev_frame:
                raise ImportDataError(f"{where}: frame {index} is not after the previous row's {prev_frame} "
                                      "(rows in video order)")
            prev_frame = index
        elif not (scan.folder / frame).is_file():
            raise ImportDataError(f"{where}: image {frame!r} not found in {scan.folder}")
        if opts.fps:
            t_ns = int(round((prev_frame if scan.video is not None else len(scan.frames)) * 1e9 / opts.fps))
        else:
            try:
                t_ns = _seconds_to_ns(cell["t"])
            except (InvalidOperation, ValueError):
                raise ImportDataError(f"{where}: column t: {cell['t']!r} is not a time in seconds") from None
        if prev_t is not None and t_ns <= prev_t:
            raise ImportDataError(f"{where}: t {t_ns / 1e9:.9g} s is not after the previous row's "
                                  f"{prev_t / 1e9:.9g} s (rows in time order, one per frame)")
        prev_t = t_ns
        p = [num(c) * unit for c in ("x", "y", "z")]
        if order is not None:
            rpy = [num(c) * angle for c in ("roll", "pitch", "yaw")]
            w, x, y, z = mat2quat(euler2mat(*(rpy[k] for k in order), axes=opts.euler))
            q = [x, y, z, w]
        else:
            q = [num(c) for c in ("qx", "qy", "qz", "qw")]
            n = math.sqrt(sum(v * v for v in q))
            if abs(n - 1.0) > QUAT_NORM_TOL:
                raise ImportDataError(f"{where}: quaternion ({', '.join(cell[c] for c in ('qx', 'qy', 'qz', 'qw'))}) "
                                      f"has norm {n:.6g}, not 1 (columns qx,qy,qz,qw; Euler angles need --euler)")
            q = [v / n for v in q]
        view = cell.get("plane", "")
        if view:
            try:
                view = canonical_view(view)
            except UnknownPlaneError:
                raise ImportDataError(f"{where}: plane {view!r} is not a known view (known: "
                                      f"{', '.join(view_names())}; add views with --views FILE); leave it "
                                      "empty on rows without a confirmed view") from None
        scan.lines.append(line)
        scan.frames.append(frame)
        scan.stamp_ns.append(t_ns)
        scan.views.append(view or None)
        pos.append(p)
        quat.append(q)
    if not scan.frames:
        raise ImportDataError(f"{path}: no rows")
    if not any(scan.views):
        raise ImportDataError(f"{path}: no row names a confirmed view in column plane ("
                              f"{', '.join(view_names())}); dataset build needs at least one per scan")
    scan.positions_m = np.asarray(pos, dtype=np.float64)
    scan.quats_xyzw = np.asarray(quat, dtype=np.float64)
    if max(scan.stamp_ns) < RELATIVE_BELOW_S * 1_000_000_000:  # times from the scan start: give them a date
        scan.stamp_ns = [EPOCH_S * 1_000_000_000 + t for t in scan.stamp_ns]
    return scan


# ---------------------------------------------------------------------------------------
# Writing bags
# ---------------------------------------------------------------------------------------


def _compressed(stamp_ns: int, frame_id: str, fmt: str, data: bytes) -> Any:
    T = bagio.TYPESTORE.types
    header = T["std_msgs/msg/Header"](stamp=bagio.ns_to_stamp(stamp_ns), frame_id=frame_id)
    return T[bagio.COMPRESSED_IMAGE_TYPE](header=header, format=fmt, data=np.frombuffer(data, dtype=np.uint8))


def _tf_static(stamp_ns: int, calib: ProbeCalibration) -> Any:
    T = bagio.TYPESTORE.types
    t, q = calib.translation_m, calib.quaternion_xyzw
    tf = T["geometry_msgs/msg/TransformStamped"](
        header=T["std_msgs/msg/Header"](stamp=bagio.ns_to_stamp(stamp_ns), frame_id=calib.parent_frame),
        child_frame_id=calib.child_frame,
        transform=T["geometry_msgs/msg/Transform"](
            translation=T["geometry_msgs/msg/Vector3"](x=t[0], y=t[1], z=t[2]),
            rotation=T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3])))
    return T[TF_MESSAGE_TYPE](transforms=[tf])


def _image_bytes(scan: Scan, k: int) -> tuple[str, bytes]:
    """(format, bytes) of an image file row: PNG / JPG as they are, others re-encoded as PNG."""
    import cv2

    f = scan.folder / scan.frames[k]
    where = f"{scan.table}:{scan.lines[k]}"
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise ImportDataError(f"{where}: cannot read image {f}: {exc.strerror or exc}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImportDataError(f"{where}: {f.name} is not a readable image")
    ext = f.suffix.lower()
    if ext == ".png":
        return "png", data
    if ext in (".jpg", ".jpeg"):
        return "jpeg", data
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ImportDataError(f"{where}: cannot encode {f.name} as PNG")
    return "png", buf.tobytes()


def _video_frames(scan: Scan):
    """(row index, PNG bytes) for the rows of a video scan, decoding the video once."""
    import cv2

    assert scan.video is not None
    cap = cv2.VideoCapture(str(scan.video))
    if not cap.isOpened():
        raise ImportDataError(f"{scan.video}: OpenCV cannot open this video")
    try:
        index, k = 0, 0
        while k < len(scan.frames):
            ok, img = cap.read()
            if not ok:
                raise ImportDataError(f"{scan.table}:{scan.lines[k]}: frame {scan.frames[k]} is past the end of "
                                      f"{scan.video.name} ({index} frames)")
            if index == int(scan.frames[k]):
                ok, buf = cv2.imencode(".png", img)
                if not ok:
                    raise ImportDataError(f"{scan.video}: cannot encode frame {index} as PNG")
                yield k, buf.tobytes()
                k += 1
            index += 1
    finally:
        cap.release()


def write_scan_bag(scan: Scan, dest: Path, opts: ImportOptions, calib: ProbeCalibration | None,
                   progress: Any = None) -> dict[str, Any]:
    """Write one scan as a bag at ``dest`` (a new directory); returns its summary."""
    image_frame = calib.child_frame if calib is not None else opts.image_frame
    frames = _video_frames(scan) if scan.video is not None else ((k, None) for k in range(len(scan.frames)))
    with bagio.BagWriter(dest, storage=opts.storage) as bag:
        c_img = bag.add_topic(bagio.COMPRESSED_IMAGE_TOPIC, bagio.COMPRESSED_IMAGE_TYPE)
        c_pose = bag.add_topic(bagio.POSE_TOPIC, bagio.POSE_TYPE)
        c_ann = bag.add_topic(bagio.ANNOTATION_TOPIC, bagio.STRING_TYPE)
        bag.set_metadata("cardiac_copilot.subject_id", scan.subject)
        bag.set_metadata("cardiac_copilot.session_label", scan.name)
        bag.set_metadata("cardiac_copilot.code_version", code_version())
        bag.set_metadata("cardiac_copilot.import.source", f"{scan.subject}/{scan.name}/{scan.table.name}")
        if calib is not None:
            c_tf = bag.add_topic(TF_STATIC_TOPIC, TF_MESSAGE_TYPE)
            bag.write(c_tf, scan.stamp_ns[0], _tf_static(scan.stamp_ns[0], calib))
        for k, png in frames:
            t = scan.stamp_ns[k]
            bag.write(c_pose, t, bagio.make_pose_stamped(t, opts.base_frame, scan.positions_m[k],
                                                         scan.quats_xyzw[k]))
            fmt, data = ("png", png) if png is not None else _image_bytes(scan, k)
            bag.write(c_img, t, _compressed(t, image_frame, fmt, data))
            if scan.views[k]:
                bag.write(c_ann, t, bagio.make_string(scan.views[k]))
            if progress is not None:
                progress.update(1)
    return {"subject": scan.subject, "scan": scan.name, "frames": len(scan.frames),
            "views": sum(v is not None for v in scan.views), "video": scan.video is not None}


def import_folder(root: str | Path, out: str | Path, opts: ImportOptions | None = None, force: bool = False,
                  progress: bool = True, log=None) -> list[dict[str, Any]]:
    """Import every ``root/<subject>/<scan>`` into ``out/<subject>/<scan>`` bags; returns summaries.

    All tables are checked first; bags go to a temporary folder inside ``out`` and are renamed
    into place at the end, so a failed import leaves ``out`` as it was.
    """
    from tqdm import tqdm

    opts = opts or ImportOptions()
    opts.validate()
    log = log or (lambda s: None)
    root, out = Path(root), Path(out)
    calib = None
    if opts.probe_calibration:
        try:
            calib = load_calibration(opts.probe_calibration)
        except CalibrationError as exc:
            raise ImportDataError(str(exc)) from None
    scans = [read_table(s, opts) for s in find_scans(root, opts.table)]
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise ImportDataError(f"--out {out} lies inside the input folder {root}; choose another place")
    dests = [out / s.subject / s.name for s in scans]
    for d in dests:
        if d.exists():
            if not force:
                raise ImportDataError(f"{d} already exists; use --force to replace it")
            if not (d / "metadata.yaml").is_file():
                raise ImportDataError(f"{d} exists and is not a bag (no metadata.yaml); refusing to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".import-partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    summaries = []
    bar = tqdm(total=sum(len(s.frames) for s in scans), desc="import", unit="frame", disable=not progress,
               leave=False)
    try:
        for k, s in enumerate(scans):
            bar.set_postfix(scan=f"{s.subject}/{s.name}")
            summaries.append(write_scan_bag(s, tmp / f"{k:06d}" / s.name, opts, calib, bar))
        for k, d in enumerate(dests):
            if d.exists():
                shutil.rmtree(d)
            d.parent.mkdir(parents=True, exist_ok=True)
            (tmp / f"{k:06d}" / d.name).rename(d)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for s, d in zip(summaries, dests, strict=True):
        s["bag"] = str(d)
    log(f"wrote {len(dests)} bag(s) under {out}")
    return summaries


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Turn a folder of frames plus poses into rosbag2 bags, one per scan: "
                          "DIR/<subject>/<scan>/poses.csv beside the scan's images (or one video), columns "
                          "frame,t,x,y,z,qx,qy,qz,qw,plane. Then: cardiac-copilot dataset build BAGS --out CACHE.")
    parser.add_argument("dir", type=Path, metavar="DIR", help="input folder: DIR/<subject>/<scan>/poses.csv")
    parser.add_argument("--out", required=True, type=Path, metavar="BAGS",
                        help="output folder; bags are written as BAGS/<subject>/<scan>")
    parser.add_argument("--force", action="store_true", help="replace existing bags of the same scans")
    parser.add_argument("--position-unit", choices=sorted(POSITION_UNITS), default="m",
                        help="unit of the x, y, z columns (default m)")
    parser.add_argument("--euler", default=None, metavar="AXES",
                        help="orientation as columns roll,pitch,yaw (angles about x, y, z) in this transforms3d "
                             "convention (sxyz: static axes, x first; rzyx: rotating axes, z first; ...) instead "
                             "of qx,qy,qz,qw")
    parser.add_argument("--angle-unit", choices=ANGLE_UNITS, default=None,
                        help="unit of roll, pitch, yaw (required with --euler)")
    parser.add_argument("--fps", type=float, default=None, metavar="HZ",
                        help="frame rate instead of a t column: t = video frame index / HZ, or for image files "
                             "row number (from 0) / HZ")
    parser.add_argument("--probe-calibration", default=None, metavar="YAML",
                        help="tool <- image calibration (docs/DATA.md), stored in each bag's /tf_static; the "
                             "poses are then the tool's")
    parser.add_argument("--base-frame", default=BASE_FRAME, help="frame_id of the poses (default %(default)s)")
    parser.add_argument("--image-frame", default=IMAGE_FRAME,
                        help="frame_id of the images without a calibration (default %(default)s)")
    parser.add_argument("--storage", choices=sorted(bagio.STORAGES), default="mcap", help="bag storage (mcap)")
    parser.add_argument("--table", default=POSES_CSV, metavar="NAME",
                        help="name of the pose table in each scan folder (default %(default)s)")
    parser.add_argument("--views", action="append", default=None, metavar="YAML",
                        help="user views file adding views / aliases to the built-in list (docs/DATA.md, "
                             "'Views'); repeatable")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def run(args: argparse.Namespace) -> int:
    try:
        use_views_files(getattr(args, "views", None))
    except ViewsFileError as exc:
        print(f"cardiac-copilot import: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    opts = ImportOptions(position_unit=args.position_unit, euler=args.euler, angle_unit=args.angle_unit,
                         fps=args.fps, probe_calibration=args.probe_calibration, base_frame=args.base_frame,
                         image_frame=args.image_frame, storage=args.storage, table=args.table)
    try:
        summaries = import_folder(args.dir, args.out, opts, force=args.force, progress=not args.quiet)
    except (ImportDataError, bagio.BagError, OSError) as exc:
        print(f"cardiac-copilot import: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    if not args.quiet:
        subjects = sorted({s["subject"] for s in summaries})
        print(f"imported {len(summaries)} scan(s) of {len(subjects)} subject(s): "
              f"{sum(s['frames'] for s in summaries)} frames, {sum(s['views'] for s in summaries)} confirmed "
              f"views -> {args.out}")
        print(f"next: cardiac-copilot dataset build {args.out} --out CACHE")
    return 0
