"""Recording core for ``recorder_node`` (rclpy-free): episode bags that lose nothing.

Pieces, each usable and tested without a ROS graph:

* CDR helpers: read the header stamp of a serialized message without deserializing it, parse and
  build ``geometry_msgs/PoseStamped`` bytes (the recorder subscribes serialized).
* :class:`PoseSynchronizer`: a pose buffer that yields the probe pose interpolated at each
  image stamp (``probe_pose_sync``), or a reason why not (``gap``, ``stale``, ``no_pose``).
* Storage files: :class:`McapFile` (the ``mcap`` library's writer, chunks flushed on demand so a
  killed process leaves everything up to the last flush readable) and :class:`Sqlite3File`
  (committed on flush). Both write rosbag2 storage that ``ros2 bag info/play`` accepts.
* :class:`EpisodeWriter`: one rosbag2 bag directory per episode, split into several storage
  files by size/duration, ``metadata.yaml`` (rosbag2 version 9) written at the start, rewritten
  at every flush and at the close.
* :class:`Recorder`: a writer thread with a bounded queue (overflow is counted, never blocks the
  caller), periodic flush, split, disk-space guard and statistics.
* :func:`recover_bag`: turns a bag left by a crash (MCAP without summary/footer) into a
  finalized bag with everything that reached the disk.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import code_version
from .pose import slerp

#: rosbag2 metadata version written (Jazzy).
BAG_VERSION = 9
#: The disk guard plans for this much data at the measured write rate (checks run every second;
#: one may come late).
DISK_GUARD_SECONDS = 2.0
#: Prefix of the recorder's custom_data keys in metadata.yaml.
META_PREFIX = "cardiac_copilot."
#: rosbag2's way of writing an infinite QoS duration.
_INFINITE = {"sec": 9223372036, "nsec": 854775807}

SESSION_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


class RecordingError(RuntimeError):
    """An episode could not be started, written or recovered; the message says why."""


# ---------------------------------------------------------------------------------------
# Names and labels
# ---------------------------------------------------------------------------------------


def validate_session_label(label: str) -> str:
    """Return ``label`` if it is a short pseudonym, else raise ``ValueError`` with the reason.

    Allowed: 1-32 characters of ``[A-Za-z0-9_-]`` starting with a letter or digit (no path
    separators, spaces or dots). Runs of 6 or more digits are refused: they look like a record
    number or a date of birth, and bag names must not carry patient identifiers.
    """
    if not isinstance(label, str) or not SESSION_LABEL_RE.match(label):
        raise ValueError(f"session_label {label!r} must be 1-32 characters of [A-Za-z0-9_-] "
                         "starting with a letter or digit (a short pseudonym, no spaces or paths)")
    if re.search(r"\d{6,}", label):
        raise ValueError(f"session_label {label!r} contains 6 or more digits in a row; that looks "
                         "like a record number or date: use a pseudonym")
    return label


def episode_name(session_label: str, when_s: float | None = None) -> str:
    """Bag directory name: UTC time and the session label, e.g. ``20260105T143012Z_s01``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when_s is None else when_s))
    return f"{stamp}_{validate_session_label(session_label)}"


def free_disk_mb(path: str | Path) -> float:
    """Free space (MiB) on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 2**20


# ---------------------------------------------------------------------------------------
# CDR helpers (little- and big-endian plain CDR, as rmw writes it)
# ---------------------------------------------------------------------------------------


def _endian(data: bytes | memoryview) -> str:
    if len(data) < 12:
        raise ValueError(f"serialized message too short ({len(data)} bytes)")
    kind = data[1]
    if kind in (0, 2):
        return ">"
    if kind in (1, 3):
        return "<"
    raise ValueError(f"unknown CDR encapsulation {bytes(data[:2]).hex()}")


def cdr_header_stamp_ns(data: bytes | memoryview) -> int:
    """The ``header.stamp`` (ns) of a serialized message whose first field is a std_msgs/Header."""
    sec, nanosec = struct.unpack_from(_endian(data) + "iI", data, 4)
    return sec * 1_000_000_000 + nanosec


def set_cdr_header_stamp(data: bytearray, stamp_ns: int) -> None:
    """Overwrite the header stamp of a serialized message in place (benches, tests)."""
    struct.pack_into(_endian(data) + "iI", data, 4, int(stamp_ns // 1_000_000_000),
                     int(stamp_ns % 1_000_000_000))


def parse_pose_stamped_cdr(data: bytes | memoryview) -> tuple[int, str, np.ndarray, np.ndarray]:
    """Serialized geometry_msgs/PoseStamped -> (stamp ns, frame_id, position m (3,), quat xyzw (4,))."""
    end = _endian(data)
    sec, nanosec, n = struct.unpack_from(end + "iII", data, 4)
    off = 16 + n
    if n == 0 or off > len(data):
        raise ValueError("malformed PoseStamped: bad frame_id length")
    frame_id = bytes(data[16:off - 1]).decode("utf-8", errors="replace")
    off = 4 + ((off - 4 + 7) & ~7)
    vals = struct.unpack_from(end + "7d", data, off)
    return (sec * 1_000_000_000 + nanosec, frame_id, np.array(vals[:3]), np.array(vals[3:]))


def serialize_pose_stamped_cdr(stamp_ns: int, frame_id: str, position_m: Iterable[float],
                               quat_xyzw: Iterable[float]) -> bytes:
    """geometry_msgs/PoseStamped -> little-endian CDR bytes, identical to rclpy's serializer."""
    fid = frame_id.encode("utf-8") + b"\x00"
    head = struct.pack("<4siII", b"\x00\x01\x00\x00", int(stamp_ns // 1_000_000_000),
                       int(stamp_ns % 1_000_000_000), len(fid)) + fid
    pad = (-(len(head) - 4)) % 8
    vals = [float(v) for v in position_m] + [float(v) for v in quat_xyzw]
    return head + b"\x00" * pad + struct.pack("<7d", *vals)


# ---------------------------------------------------------------------------------------
# Pose synchronisation
# ---------------------------------------------------------------------------------------

SYNC_REASONS = ("synced", "gap", "stale", "no_pose")


@dataclasses.dataclass
class SyncResult:
    """The pose at one image stamp, or why there is none.

    ``status``: ``synced`` (interpolated between poses at most ``max_gap`` apart), ``gap`` (the
    poses around the stamp are too far apart), ``stale`` (no pose at/after the stamp arrived in
    time, or the last pose before it is older than ``max_pose_age``), ``no_pose`` (no pose
    before the stamp). ``position``/``quat`` hold the interpolated pose when synced, else the
    nearest pose known (or ``None``).
    """

    key: Any
    stamp_ns: int
    status: str
    position: np.ndarray | None
    quat: np.ndarray | None
    gap_ns: int = 0


class PoseSynchronizer:
    """Pose buffer + interpolation at image stamps for ``probe_pose_sync``.

    Feed poses with :meth:`add_pose` and image stamps with :meth:`add_image`; each returns the
    images it could resolve. An image waits for a pose stamped at or after it until
    ``max_pose_age_ns`` of receipt time has passed (:meth:`expire`). Not thread-safe: call from
    one thread (the node's executor).

    Pose stamps must increase. A pose stamped at or before the last one, or further ahead of it
    than ``max_jump_ns`` plus the receipt time elapsed since it (a future-stamped pose), is
    rejected and counted in ``poses_out_of_order``: one bad stamp never poisons the buffer.
    When ``reanchor_after`` rejected poses in a row form a consistent stream of their own (the
    pose source restarted or its clock jumped; or the very first pose was the bad one), the
    buffer restarts on that stream (counted in ``pose_restarts``).
    """

    def __init__(self, max_gap_ns: int = 20_000_000, max_pose_age_ns: int = 100_000_000,
                 history_ns: int = 5_000_000_000, max_jump_ns: int = 1_000_000_000,
                 reanchor_after: int = 10) -> None:
        self.max_gap_ns = int(max_gap_ns)
        self.max_pose_age_ns = int(max_pose_age_ns)
        self.history_ns = int(history_ns)
        self.max_jump_ns = int(max_jump_ns)
        self.reanchor_after = max(1, int(reanchor_after))
        self.frame_id = ""
        self._stamps: list[int] = []
        self._pos: list[np.ndarray] = []
        self._quat: list[np.ndarray] = []
        self._last_recv: int | None = None
        #: consecutive rejected poses that are consistent among themselves: (stamp, pos, quat, frame, recv)
        self._rejected: list[tuple[int, np.ndarray, np.ndarray, str, int | None]] = []
        self._pending: collections.deque[tuple[Any, int, int]] = collections.deque()
        self.counts = dict.fromkeys(SYNC_REASONS, 0)
        self.poses_out_of_order = 0
        self.pose_restarts = 0

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(SYNC_REASONS, 0)
        self.poses_out_of_order = 0
        self.pose_restarts = 0

    def reset(self, keep_history: bool = False) -> None:
        """Start over (an episode start): no counts, no waiting images, no rejected poses.

        The pose buffer is emptied too, unless ``keep_history`` and it is consistent (no pose was
        rejected since the last accepted one): then the poses just before the start still serve
        the episode's first images.
        """
        if not keep_history or self._rejected:
            self._stamps, self._pos, self._quat = [], [], []
            self._last_recv = None
        self._rejected = []
        self._pending.clear()
        self.reset_counts()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _fits(self, stamp_ns: int, last_ns: int, now_ns: int | None, last_recv: int | None) -> bool:
        """Is ``stamp_ns`` a plausible successor of the pose stamped ``last_ns``?"""
        allowed = self.max_jump_ns
        if now_ns is not None and last_recv is not None:
            allowed += max(0, now_ns - last_recv)
        return 0 < stamp_ns - last_ns <= allowed

    def add_pose(self, stamp_ns: int, position_m: np.ndarray, quat_xyzw: np.ndarray,
                 frame_id: str = "", now_ns: int | None = None) -> list[SyncResult]:
        """Add a pose received at ``now_ns`` (monotonic receipt time, optional).

        Out-of-order and future-stamped poses are counted and ignored (see the class notes).
        """
        stamp_ns = int(stamp_ns)
        pos = np.asarray(position_m, dtype=np.float64)
        quat = np.asarray(quat_xyzw, dtype=np.float64)
        if self._stamps and not self._fits(stamp_ns, self._stamps[-1], now_ns, self._last_recv):
            self.poses_out_of_order += 1
            if self._rejected and self._fits(stamp_ns, self._rejected[-1][0], now_ns, self._rejected[-1][4]):
                self._rejected.append((stamp_ns, pos, quat, frame_id, now_ns))
            else:
                self._rejected = [(stamp_ns, pos, quat, frame_id, now_ns)]
            if len(self._rejected) < self.reanchor_after:
                return []
            # a consistent stream of its own: the source restarted or its clock jumped
            self.pose_restarts += 1
            run, self._rejected = self._rejected, []
            self._stamps = [r[0] for r in run]
            self._pos = [r[1] for r in run]
            self._quat = [r[2] for r in run]
            self._last_recv = now_ns
            if frame_id:
                self.frame_id = frame_id
        else:
            self._rejected = []
            self._stamps.append(stamp_ns)
            self._pos.append(pos)
            self._quat.append(quat)
            self._last_recv = now_ns
            if frame_id:
                self.frame_id = frame_id
        if len(self._stamps) > 64 and self._stamps[-1] - self._stamps[0] > 2 * self.history_ns:
            cut = bisect.bisect_left(self._stamps, self._stamps[-1] - self.history_ns)
            del self._stamps[:cut], self._pos[:cut], self._quat[:cut]
        out = []
        while self._pending and self._pending[0][1] <= self._stamps[-1]:
            key, t, _ = self._pending.popleft()
            out.append(self._resolve(key, t, final=True))
        return out

    def add_image(self, key: Any, stamp_ns: int, now_ns: int) -> list[SyncResult]:
        """Add an image stamp (received at ``now_ns``); returns it resolved if a later pose is known."""
        stamp_ns = int(stamp_ns)
        if self._stamps and self._stamps[-1] >= stamp_ns and not self._pending:
            return [self._resolve(key, stamp_ns, final=True)]
        self._pending.append((key, stamp_ns, int(now_ns)))
        if self._stamps and self._stamps[-1] >= stamp_ns:  # out-of-order image stamps
            return self.expire(now_ns, force_stamp=stamp_ns)
        return []

    def expire(self, now_ns: int, force_stamp: int | None = None) -> list[SyncResult]:
        """Resolve images that waited longer than ``max_pose_age_ns`` (or are now bracketed)."""
        out = []
        keep: collections.deque[tuple[Any, int, int]] = collections.deque()
        last = self._stamps[-1] if self._stamps else None
        for key, t, recv in self._pending:
            if last is not None and last >= t:
                out.append(self._resolve(key, t, final=True))
            elif now_ns - recv > self.max_pose_age_ns:
                out.append(self._resolve(key, t, final=True))
            else:
                keep.append((key, t, recv))
        self._pending = keep
        return out

    def flush(self) -> list[SyncResult]:
        """Resolve every waiting image now (episode end)."""
        out = [self._resolve(k, t, final=True) for k, t, _ in self._pending]
        self._pending.clear()
        return out

    def _resolve(self, key: Any, t: int, final: bool) -> SyncResult:
        stamps = self._stamps
        if not stamps or t < stamps[0]:
            res = SyncResult(key, t, "no_pose", None, None)
            if stamps:
                res.position, res.quat = self._pos[0], self._quat[0]
        else:
            hi = bisect.bisect_left(stamps, t)
            if hi < len(stamps) and stamps[hi] == t:
                res = SyncResult(key, t, "synced", self._pos[hi], self._quat[hi])
            elif hi >= len(stamps):
                lo = len(stamps) - 1
                res = SyncResult(key, t, "stale", self._pos[lo], self._quat[lo], gap_ns=t - stamps[lo])
            else:
                lo = hi - 1
                gap = stamps[hi] - stamps[lo]
                w = (t - stamps[lo]) / gap
                pos = self._pos[lo] * (1.0 - w) + self._pos[hi] * w
                quat = slerp(self._quat[lo], self._quat[hi], np.float64(w))
                status = "synced" if gap <= self.max_gap_ns else "gap"
                if status == "synced" and t - stamps[lo] > self.max_pose_age_ns:
                    status = "stale"
                res = SyncResult(key, t, status, pos, quat, gap_ns=gap)
        self.counts[res.status] += 1
        return res


# ---------------------------------------------------------------------------------------
# rosbag2 storage files
# ---------------------------------------------------------------------------------------


def qos_profile_dict(reliability: str = "reliable", durability: str = "volatile",
                     history: str = "keep_last", depth: int = 10) -> dict[str, Any]:
    """One offered QoS profile as rosbag2 version 9 metadata writes it."""
    return {"history": history, "depth": int(depth), "reliability": reliability,
            "durability": durability, "deadline": dict(_INFINITE), "lifespan": dict(_INFINITE),
            "liveliness": "automatic", "liveliness_lease_duration": dict(_INFINITE),
            "avoid_ros_namespace_conventions": False}


def _yaml_dump(obj: Any) -> str:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    buf = io.StringIO()
    yaml.dump(obj, buf)
    return buf.getvalue()


def _yaml_load(text: str) -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(text)


@dataclasses.dataclass
class TopicSpec:
    """A topic to record: name (fully resolved), type, offered QoS profiles (rosbag2 v9 dicts)."""

    name: str
    msgtype: str
    qos_profiles: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def msgdef(self) -> tuple[str, str]:
        """(ros2msg definition text, RIHS01 hash) from the Jazzy typestore."""
        return _msgdef(self.msgtype)


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    return code_version()


@functools.cache
def _msgdef(msgtype: str) -> tuple[str, str]:
    from .bagio import TYPESTORE

    text, _ = TYPESTORE.generate_msgdef(msgtype, ros_version=2)
    return text, TYPESTORE.hash_rihs01(msgtype)


class McapFile:
    """One rosbag2 MCAP storage file written with the ``mcap`` library.

    :meth:`flush` finalizes the open chunk and writes it (with its message indexes) to the
    file: after a crash every message up to the last flush is in a complete chunk.
    """

    suffix = ".mcap"

    def __init__(self, path: Path, compression: str = "none", chunk_size: int = 4 * 2**20) -> None:
        from mcap.writer import CompressionType, Writer

        comp = {"none": CompressionType.NONE, "zstd": CompressionType.ZSTD,
                "lz4": CompressionType.LZ4}
        if compression not in comp:
            raise RecordingError(f"unknown MCAP compression {compression!r}; choose {sorted(comp)}")
        self.path = Path(path)
        self._fh = open(self.path, "xb")
        self._w = Writer(self._fh, chunk_size=chunk_size, compression=comp[compression])
        self._w.start(profile="ros2", library=f"cardiac_copilot_ros {_code_version()}")
        self._fh.flush()
        #: end of the data known to be on disk in complete records (the last flush)
        self.good_offset = self._fh.tell()
        self._schemas: dict[str, int] = {}

    def add_topic(self, spec: TopicSpec, qos_text: str) -> int:
        if spec.msgtype not in self._schemas:
            text, _ = spec.msgdef()
            self._schemas[spec.msgtype] = self._w.register_schema(spec.msgtype, "ros2msg", text.encode())
        _, rihs = spec.msgdef()
        return self._w.register_channel(spec.name, "cdr", self._schemas[spec.msgtype],
                                        {"offered_qos_profiles": qos_text, "topic_type_hash": rihs})

    def write(self, channel: int, log_ns: int, data: bytes) -> None:
        self._w.add_message(channel, log_time=log_ns, data=data, publish_time=log_ns)

    def flush(self, fsync: bool) -> None:
        self._w.flush()
        self._fh.flush()
        if fsync:
            os.fsync(self._fh.fileno())
        self.good_offset = self._fh.tell()

    def size_bytes(self) -> int:
        return self._fh.tell()

    def salvage(self, serialized_metadata: str) -> None:
        """Finalize after a failed write: cut the file back to the last flush (complete chunks),
        append the rosbag2 metadata record, DataEnd and a footer without summary (valid MCAP,
        readers scan it). Writes a few hundred bytes; no data is rewritten."""
        from mcap.data_stream import RecordBuilder
        from mcap.records import DataEnd, Footer, Metadata
        from mcap.writer import MCAP0_MAGIC

        try:
            self._fh.close()  # flushing what failed fails again; the descriptor is closed anyway
        except OSError:
            pass
        b = RecordBuilder()
        Metadata(name="rosbag2", metadata={"serialized_metadata": serialized_metadata}).write(b)
        DataEnd(data_section_crc=0).write(b)
        Footer(summary_start=0, summary_offset_start=0, summary_crc=0).write(b)
        with open(self.path, "r+b") as fh:
            fh.truncate(self.good_offset)
            fh.seek(self.good_offset)
            fh.write(b.end() + MCAP0_MAGIC)
            fh.flush()
            os.fsync(fh.fileno())

    def close(self, serialized_metadata: str) -> None:
        self._w.add_metadata("rosbag2", {"serialized_metadata": serialized_metadata})
        self._w.finish()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


_SQLITE_SCHEMA = """
CREATE TABLE schema(schema_version INTEGER PRIMARY KEY, ros_distro TEXT NOT NULL);
CREATE TABLE metadata(id INTEGER PRIMARY KEY, metadata_version INTEGER NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
  serialization_format TEXT NOT NULL, offered_qos_profiles TEXT NOT NULL,
  type_description_hash TEXT NOT NULL);
CREATE TABLE message_definitions(id INTEGER PRIMARY KEY, topic_type TEXT NOT NULL,
  encoding TEXT NOT NULL, encoded_message_definition TEXT NOT NULL, type_description_hash TEXT NOT NULL);
CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL, timestamp INTEGER NOT NULL,
  data BLOB NOT NULL);
CREATE INDEX timestamp_idx ON messages (timestamp ASC);
"""


class Sqlite3File:
    """One rosbag2 sqlite3 storage file (schema version 4, as rosbag2 Jazzy); committed on flush."""

    suffix = ".db3"

    def __init__(self, path: Path, ros_distro: str = "jazzy", fsync: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise RecordingError(f"{self.path} exists already")
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        # commits are atomic either way; NORMAL/OFF only choose how hard they wait for the disk
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.executescript(_SQLITE_SCHEMA)
        self._db.execute("INSERT INTO schema VALUES (4, ?)", (ros_distro,))
        self._db.commit()
        self._types: set[str] = set()
        self._n_topics = 0

    def add_topic(self, spec: TopicSpec, qos_text: str) -> int:
        text, rihs = spec.msgdef()
        if spec.msgtype not in self._types:
            self._db.execute("INSERT INTO message_definitions (topic_type, encoding, "
                             "encoded_message_definition, type_description_hash) VALUES (?, ?, ?, ?)",
                             (spec.msgtype, "ros2msg", text, rihs))
            self._types.add(spec.msgtype)
        self._n_topics += 1
        self._db.execute("INSERT INTO topics VALUES (?, ?, ?, ?, ?, ?)",
                         (self._n_topics, spec.name, spec.msgtype, "cdr", qos_text, rihs))
        return self._n_topics

    def write(self, channel: int, log_ns: int, data: bytes) -> None:
        self._db.execute("INSERT INTO messages (topic_id, timestamp, data) VALUES (?, ?, ?)",
                         (channel, log_ns, data))

    def flush(self, fsync: bool) -> None:
        self._db.commit()

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def salvage(self, serialized_metadata: str) -> None:
        """Finalize after a failed write: drop the uncommitted rows, write the metadata row."""
        try:
            self._db.rollback()
        except sqlite3.Error:
            pass
        self.close(serialized_metadata)

    def close(self, serialized_metadata: str) -> None:
        self._db.execute("INSERT INTO metadata (metadata_version, metadata) VALUES (?, ?)",
                         (BAG_VERSION, serialized_metadata))
        self._db.commit()
        self._db.close()


STORAGE_FILES: dict[str, type] = {"mcap": McapFile, "sqlite3": Sqlite3File}
#: Disk space an open episode holds back (a file in the bag directory) so that a write that
#: fails for lack of space can still finalize the bag and write metadata.yaml.
RESERVE_BYTES = 1 * 2**20
RESERVE_NAME = ".cardiac_copilot_reserve"
#: MCAP chunk size: data buffered in memory before it is written.
CHUNK_BYTES = 4 * 2**20


# ---------------------------------------------------------------------------------------
# Episode bags
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _FileStats:
    path: str
    count: int = 0
    bytes: int = 0
    start_ns: int | None = None
    end_ns: int = 0
    opened_ns: int = 0


class EpisodeWriter:
    """One rosbag2 bag (a directory) per episode, split into files by size or duration.

    ``metadata.yaml`` is written at :meth:`open` (so a crashed bag is recognisable), rewritten
    at every :meth:`flush` with the counts up to that flush and finally at :meth:`close`.

    A write that fails (disk full, file too large, I/O error) marks the writer broken (``error``);
    :meth:`close` then frees the space held back at :meth:`open` (``RESERVE_BYTES``) and
    finalizes the bag with everything up to the last flush (``salvaged``, ``lost`` per topic).
    """

    def __init__(self, bag_dir: str | Path, topics: list[TopicSpec], storage: str = "mcap",
                 custom_data: dict[str, str] | None = None, max_file_size_mb: float = 0.0,
                 max_file_duration_s: float = 0.0, compression: str = "none",
                 fsync: bool = True) -> None:
        if storage not in STORAGE_FILES:
            raise RecordingError(f"unknown storage {storage!r}; choose one of {sorted(STORAGE_FILES)}")
        self.bag_dir = Path(bag_dir)
        self.storage = storage
        self.topics = list(topics)
        self.custom_data = {k: str(v) for k, v in (custom_data or {}).items()}
        self.max_file_bytes = int(max_file_size_mb * 2**20) if max_file_size_mb > 0 else 0
        self.max_file_ns = int(max_file_duration_s * 1e9) if max_file_duration_s > 0 else 0
        self.compression = compression
        self.fsync = fsync
        self.ros_distro = os.environ.get("ROS_DISTRO", "jazzy") or "jazzy"
        self.files: list[_FileStats] = []
        self.counts: dict[str, int] = {t.name: 0 for t in self.topics}
        self._file: McapFile | Sqlite3File | None = None
        self._channels: dict[str, int] = {}
        self.closed = False
        self.error: BaseException | None = None
        self.salvaged = False
        self.lost: dict[str, int] = {}
        self._flushed_counts: dict[str, int] = dict(self.counts)
        self._flushed_file: _FileStats | None = None

    # -- life cycle --
    def open(self) -> EpisodeWriter:
        try:
            self.bag_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise RecordingError(f"bag {self.bag_dir} exists already, not overwriting") from None
        except OSError as exc:
            raise RecordingError(f"cannot create bag {self.bag_dir}: {exc}") from exc
        try:
            with open(self.bag_dir / RESERVE_NAME, "wb") as fh:
                try:
                    os.posix_fallocate(fh.fileno(), 0, RESERVE_BYTES)
                except (AttributeError, OSError):
                    fh.write(bytes(RESERVE_BYTES))
            self._open_file()
            self.write_metadata()
        except Exception as exc:
            shutil.rmtree(self.bag_dir, ignore_errors=True)  # nothing recorded yet
            if isinstance(exc, RecordingError):
                raise
            raise RecordingError(f"cannot start bag {self.bag_dir}: {exc}") from exc
        return self

    def _open_file(self, first_ns: int = 0) -> None:
        name = f"{self.bag_dir.name}_{len(self.files)}{STORAGE_FILES[self.storage].suffix}"
        path = self.bag_dir / name
        try:
            if self.storage == "mcap":
                new: McapFile | Sqlite3File = McapFile(path, compression=self.compression)
            else:
                new = Sqlite3File(path, ros_distro=self.ros_distro, fsync=self.fsync)
            channels = {t.name: new.add_topic(t, _yaml_dump(t.qos_profiles).strip()) for t in self.topics}
        except BaseException:
            path.unlink(missing_ok=True)  # a file that never opened is not part of the bag
            raise
        self._file, self._channels = new, channels
        self.files.append(_FileStats(path=name, opened_ns=first_ns))
        self._snapshot()

    def _snapshot(self) -> None:
        """Remember what is on disk: the counts and the open file's statistics at this flush."""
        self._flushed_counts = dict(self.counts)
        self._flushed_file = dataclasses.replace(self.files[-1])

    def add_topic(self, spec: TopicSpec) -> None:
        """Declare a topic after the start (e.g. a type discovered late)."""
        if spec.name in self.counts:
            return
        self.topics.append(spec)
        self.counts[spec.name] = 0
        assert self._file is not None
        self._channels[spec.name] = self._file.add_topic(spec, _yaml_dump(spec.qos_profiles).strip())

    def write(self, topic: str, log_ns: int, data: bytes) -> bool:
        """Write one serialized message; returns True when this write started a new file (split)."""
        if self._file is None:
            raise RecordingError("episode is closed")
        if self.error is not None:
            raise RecordingError(f"episode stopped by a write error: {self.error}")
        split = False
        cur = self.files[-1]
        try:
            if cur.count and (
                    (self.max_file_bytes and cur.bytes + len(data) > self.max_file_bytes)
                    or (self.max_file_ns and log_ns - (cur.start_ns or log_ns) >= self.max_file_ns)):
                self._roll()
                cur = self.files[-1]
                split = True
            self._file.write(self._channels[topic], log_ns, data)
        except BaseException as exc:
            self.error = exc
            raise
        cur.count += 1
        cur.bytes += len(data)
        cur.start_ns = log_ns if cur.start_ns is None else min(cur.start_ns, log_ns)
        cur.end_ns = max(cur.end_ns, log_ns)
        self.counts[topic] += 1
        return split

    def _roll(self) -> None:
        assert self._file is not None
        self._file.close(self._serialized_metadata())  # fails: the old file is salvaged
        self._file = None
        self._snapshot()
        self._open_file()  # fails: the closed files are the bag
        self.write_metadata()

    def flush(self) -> None:
        if self._file is not None and self.error is None:
            try:
                self._file.flush(self.fsync)
                self._snapshot()
                self.write_metadata()
            except BaseException as exc:
                self.error = exc
                raise

    def size_bytes(self) -> int:
        """Bytes of message data written so far (all files)."""
        return sum(f.bytes for f in self.files)

    def close(self) -> None:
        """Finalize the bag (after a write error: as it was at the last flush)."""
        self._release_reserve()
        if self.closed:
            return
        if self.error is None and self._file is not None:
            try:
                self._file.close(self._serialized_metadata())
                self._file = None
                self.closed = True
                self.write_metadata()
                return
            except Exception as exc:
                self.error = exc
        self._salvage()

    def _release_reserve(self) -> None:
        try:
            (self.bag_dir / RESERVE_NAME).unlink(missing_ok=True)
        except OSError:
            pass

    def _salvage(self) -> None:
        """Finalize the bag as it was at the last flush (the reserve is free by now)."""
        kept = self._flushed_counts
        self.lost = {t: n - kept.get(t, 0) for t, n in self.counts.items() if n > kept.get(t, 0)}
        self.counts = {t: kept.get(t, 0) for t in self.counts}
        f, self._file = self._file, None
        if f is not None and self._flushed_file is not None:
            self.files[-1] = dataclasses.replace(self._flushed_file)
        self.closed = True
        if f is not None:
            f.salvage(self._serialized_metadata())
        self.write_metadata()
        self.salvaged = True

    # -- metadata --
    def metadata(self) -> dict[str, Any]:
        starts = [f.start_ns for f in self.files if f.start_ns is not None]
        start = min(starts) if starts else 0
        end = max((f.end_ns for f in self.files), default=0)
        files = [{"path": f.path, "starting_time": {"nanoseconds_since_epoch": f.start_ns or 0},
                  "duration": {"nanoseconds": max(0, f.end_ns - (f.start_ns or 0))},
                  "message_count": f.count} for f in self.files]
        topics = []
        for t in self.topics:
            _, rihs = t.msgdef()
            topics.append({"topic_metadata": {
                "name": t.name, "type": t.msgtype, "serialization_format": "cdr",
                "offered_qos_profiles": t.qos_profiles, "type_description_hash": rihs},
                "message_count": self.counts[t.name]})
        return {"rosbag2_bagfile_information": {
            "version": BAG_VERSION, "storage_identifier": self.storage,
            "relative_file_paths": [f.path for f in self.files],
            "duration": {"nanoseconds": max(0, end - start)},
            "starting_time": {"nanoseconds_since_epoch": start},
            "message_count": sum(self.counts.values()),
            "topics_with_message_count": topics,
            "compression_format": "", "compression_mode": "",
            "files": files,
            "custom_data": dict(self.custom_data) or None,
            "ros_distro": self.ros_distro}}

    def _serialized_metadata(self) -> str:
        return _yaml_dump(self.metadata()["rosbag2_bagfile_information"]).strip()

    def write_metadata(self) -> None:
        """Atomically (re)write metadata.yaml."""
        tmp = self.bag_dir / "metadata.yaml.tmp"
        tmp.write_text(_yaml_dump(self.metadata()), encoding="utf-8")
        tmp.replace(self.bag_dir / "metadata.yaml")


# ---------------------------------------------------------------------------------------
# Crash recovery
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecoveryReport:
    """What :func:`recover_bag` found: per-topic counts, files rewritten, whether it was needed."""

    bag: Path
    counts: dict[str, int]
    rewritten: list[str]
    already_finalized: bool


def read_mcap_stream(path: str | Path) -> tuple[dict[int, Any], dict[int, Any], list[Any], bool]:
    """Read an MCAP file sequentially as far as it is intact.

    Returns ``(schemas, channels, messages, complete)``: records up to the first truncated or
    corrupt record (a chunk whose CRC fails is dropped whole); ``complete`` is True when the
    footer was reached.
    """
    from mcap.records import Channel, Footer, Message, Schema
    from mcap.stream_reader import StreamReader

    schemas: dict[int, Any] = {}
    channels: dict[int, Any] = {}
    messages: list[Any] = []
    complete = False
    with open(path, "rb") as fh:
        reader = StreamReader(fh, validate_crcs=True)
        try:
            for rec in reader.records:
                if isinstance(rec, Schema):
                    schemas[rec.id] = rec
                elif isinstance(rec, Channel):
                    channels[rec.id] = rec
                elif isinstance(rec, Message):
                    messages.append(rec)
                elif isinstance(rec, Footer):
                    complete = True
        except Exception:
            pass
    return schemas, channels, messages, complete


def unfinished_bag_reason(path: str | Path) -> str | None:
    """Why the bag at ``path`` looks like a recording that never closed (the recorder was killed,
    crashed or lost power), or ``None``. Such a bag is what :func:`recover_bag` repairs."""
    bag = Path(path)
    if not bag.is_dir():
        return None
    try:
        info = (_yaml_load((bag / "metadata.yaml").read_text(encoding="utf-8")) or {}).get(
            "rosbag2_bagfile_information", {})
        state = (info.get("custom_data") or {}).get(META_PREFIX + "recorder.state")
    except Exception:
        state = None
    if state == "recording":
        return f"its metadata.yaml says {META_PREFIX}recorder.state: recording (the recording never closed)"
    for f in sorted(bag.glob("*.mcap")):
        try:
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - 8))
                tail = fh.read(8)
        except OSError:
            continue
        if tail != b"\x89MCAP0\r\n":
            return f"{f.name} ends without an MCAP footer (the writer did not finish)"
    return None


def recover_hint(path: str | Path) -> str:
    """`` (the bag was not closed: <why>); repair it with ...`` for an unfinished bag, else ``""``
    (appended to error messages)."""
    why = unfinished_bag_reason(path)
    if why is None:
        return ""
    return (f" (the bag was not closed: {why}); repair it with `cardiac-copilot dataset recover {path}` "
            "(Python: cardiac_copilot_ros.recording.recover_bag) and run this again")


def recover_bag(path: str | Path) -> RecoveryReport:
    """Finalize a bag left by a crash so every reader accepts it; a no-op for a closed bag.

    MCAP files without a footer are read with the mcap stream reader up to the last complete
    chunk and rewritten as finalized MCAP (the damaged original is kept as ``*.mcap.crashed``);
    sqlite3 files keep their committed rows. ``metadata.yaml`` is rewritten from what was
    found, keeping the provisional one's custom_data and adding ``cardiac_copilot.recovered``.
    """
    bag = Path(path)
    if not bag.is_dir():
        raise RecordingError(f"not a bag directory: {bag}")
    (bag / RESERVE_NAME).unlink(missing_ok=True)  # the space an open episode held back
    meta_path = bag / "metadata.yaml"
    old: dict[str, Any] = {}
    if meta_path.exists():
        old = (_yaml_load(meta_path.read_text(encoding="utf-8")) or {}).get("rosbag2_bagfile_information", {})
    files = sorted(bag.glob("*.mcap")) or sorted(bag.glob("*.db3"))
    if not files:
        raise RecordingError(f"no .mcap or .db3 storage file in {bag}")
    storage = "mcap" if files[0].suffix == ".mcap" else "sqlite3"
    known = {t["topic_metadata"]["name"]: t["topic_metadata"]
             for t in old.get("topics_with_message_count", []) or []}
    custom = dict(old.get("custom_data") or {})
    rewritten: list[str] = []
    all_finalized = True
    stats: list[_FileStats] = []
    counts: dict[str, int] = {}
    types: dict[str, str] = {}
    qos: dict[str, Any] = {}
    for f in files:
        st = _FileStats(path=f.name)
        if storage == "mcap":
            schemas, channels, messages, complete = read_mcap_stream(f)
            if not complete:
                all_finalized = False
                tmp = f.with_name(f.name + ".recovering")
                from mcap.writer import CompressionType, Writer

                with open(tmp, "wb") as fh:
                    w = Writer(fh, compression=CompressionType.NONE)
                    w.start(profile="ros2", library=f"cardiac_copilot_ros {code_version()} recover_bag")
                    sid = {k: w.register_schema(s.name, s.encoding, s.data) for k, s in schemas.items()}
                    cid = {k: w.register_channel(c.topic, c.message_encoding, sid.get(c.schema_id, 0),
                                                 dict(c.metadata)) for k, c in channels.items()}
                    for m in messages:
                        if m.channel_id in cid:
                            w.add_message(cid[m.channel_id], log_time=m.log_time, data=m.data,
                                          publish_time=m.publish_time, sequence=m.sequence)
                    w.finish()
                    fh.flush()
                    os.fsync(fh.fileno())
                f.replace(f.with_name(f.name + ".crashed"))
                tmp.replace(f)
                rewritten.append(f.name)
            for c in channels.values():
                types[c.topic] = schemas[c.schema_id].name if c.schema_id in schemas else ""
                if "offered_qos_profiles" in c.metadata:
                    qos[c.topic] = _yaml_load(c.metadata["offered_qos_profiles"]) or []
            for m in messages:
                topic = channels[m.channel_id].topic if m.channel_id in channels else None
                if topic is None:
                    continue
                counts[topic] = counts.get(topic, 0) + 1
                st.count += 1
                st.start_ns = m.log_time if st.start_ns is None else min(st.start_ns, m.log_time)
                st.end_ns = max(st.end_ns, m.log_time)
        else:
            db = sqlite3.connect(str(f))
            try:
                finalized = db.execute("SELECT COUNT(*) FROM metadata").fetchone()[0] > 0
                all_finalized &= finalized
                tmap = {}
                for tid, name, ttype, qtext in db.execute(
                        "SELECT id, name, type, offered_qos_profiles FROM topics"):
                    tmap[tid] = name
                    types[name] = ttype
                    qos[name] = _yaml_load(qtext) or []
                for tid, n, lo, hi in db.execute(
                        "SELECT topic_id, COUNT(*), MIN(timestamp), MAX(timestamp) FROM messages "
                        "GROUP BY topic_id"):
                    counts[tmap[tid]] = counts.get(tmap[tid], 0) + n
                    st.count += n
                    st.start_ns = lo if st.start_ns is None else min(st.start_ns, lo)
                    st.end_ns = max(st.end_ns, hi)
            finally:
                db.close()
        stats.append(st)
    if all_finalized and meta_path.exists() and custom.get(META_PREFIX + "recorder.state") in ("closed", "recovered"):
        return RecoveryReport(bag, counts, rewritten, True)
    topics = []
    for name in sorted(set(types) | set(known)):
        msgtype = types.get(name) or known.get(name, {}).get("type", "")
        spec = TopicSpec(name, msgtype, qos.get(name, known.get(name, {}).get("offered_qos_profiles", [])))
        topics.append(spec)
    ew = EpisodeWriter(bag, topics, storage=storage, custom_data=custom)
    ew.files = stats
    ew.counts = {t.name: counts.get(t.name, 0) for t in topics}
    ew.custom_data[META_PREFIX + "recovered"] = "true"
    ew.custom_data[META_PREFIX + "recorder.state"] = "recovered"
    ew.write_metadata()
    return RecoveryReport(bag, counts, rewritten, False)


# ---------------------------------------------------------------------------------------
# Recorder: writer thread, bounded queue, split, disk guard, statistics
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecorderConfig:
    """Settings of :class:`Recorder` (the node maps its parameters onto these)."""

    output_dir: str = "bags"
    session_label: str = "session"
    storage: str = "mcap"
    compression: str = "none"
    max_bag_size_mb: float = 0.0
    max_bag_duration_s: float = 0.0
    min_free_disk_mb: float = 1024.0
    flush_period_s: float = 1.0
    max_queue_mb: float = 512.0
    fsync: bool = True


class Recorder:
    """Episode bags written by one background thread; callers never block on disk I/O.

    :meth:`submit` enqueues a serialized message (returns False and counts a drop when the
    queue is over ``max_queue_mb`` or no episode is open). :meth:`start_episode` /
    :meth:`stop_episode` run on the writer thread in queue order, so every message submitted
    before a stop is in the bag.
    """

    def __init__(self, config: RecorderConfig, log: Callable[[str, str], None] | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.config = config
        self._log = log or (lambda level, text: None)
        self._clock_ns = clock_ns
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple] = collections.deque()
        self._queued_bytes = 0
        self._episode: EpisodeWriter | None = None
        self._accepting = False
        self.state = "idle"
        self.last_stop_reason = ""
        self.episodes: list[Path] = []
        self.dropped: dict[str, int] = collections.defaultdict(int)
        self.written: dict[str, int] = collections.defaultdict(int)
        self.splits = 0
        self.bag_size_bytes = 0
        self.free_disk_mb = free_disk_mb(config.output_dir)
        self.errors = 0
        #: bytes of message data written per second (peak-following average over disk checks)
        self.write_rate_bps = 0.0
        self._bytes_written = 0
        self._rate_mark = (time.monotonic(), 0)
        self._margin_warned = False
        self._running = True
        self._thread = threading.Thread(target=self._run, name="recorder-writer", daemon=True)
        self._thread.start()

    # -- API for the node --
    @property
    def recording(self) -> bool:
        return self._accepting

    @property
    def bag_path(self) -> Path | None:
        ep = self._episode
        return ep.bag_dir if ep is not None else None

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def needed_free_disk_mb(self) -> float:
        """Free space (MiB) the disk guard needs to stop before the disk is full: what can reach
        the disk before the next check (``DISK_GUARD_SECONDS`` at the measured write rate, the
        queue, the MCAP chunk buffered in memory) plus the reserve that finalizes the bag."""
        return (self.write_rate_bps * DISK_GUARD_SECONDS + self._queued_bytes + CHUNK_BYTES
                + RESERVE_BYTES) / 2**20

    @property
    def effective_min_free_disk_mb(self) -> float:
        """The disk guard's threshold: ``max(min_free_disk_mb, needed_free_disk_mb())``."""
        return max(self.config.min_free_disk_mb, self.needed_free_disk_mb())

    def submit(self, topic: str, log_ns: int, data: bytes) -> bool:
        """Queue one serialized message for the open episode; never blocks."""
        if not self._accepting:
            return False
        size = len(data)
        with self._cv:
            if self._queued_bytes + size > self.config.max_queue_mb * 2**20:
                self.dropped[topic] += 1
                return False
            self._queue.append(("msg", topic, log_ns, data))
            self._queued_bytes += size
            self._cv.notify()
        return True

    def start_episode(self, topics: list[TopicSpec], custom_data: dict[str, str],
                      timeout_s: float = 10.0) -> tuple[bool, str]:
        """Open a new bag; returns (ok, bag path or the reason it did not start)."""
        return self._command("start", (topics, custom_data), timeout_s)

    def stop_episode(self, reason: str = "requested", timeout_s: float = 30.0) -> tuple[bool, str]:
        """Close the open bag after every message queued before; returns (ok, bag path or reason)."""
        self._accepting = False
        return self._command("stop", reason, timeout_s)

    def add_topic(self, spec: TopicSpec) -> None:
        """Declare a topic in the open episode (in queue order)."""
        with self._cv:
            self._queue.append(("cmd", "add_topic", spec, None))
            self._cv.notify()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Close any open episode and stop the thread."""
        if self._thread.is_alive():
            self.stop_episode("shutdown", timeout_s)
            self._running = False
            with self._cv:
                self._cv.notify()
            self._thread.join(timeout_s)

    def _command(self, name: str, arg: Any, timeout_s: float) -> tuple[bool, str]:
        done = threading.Event()
        box: dict[str, Any] = {}
        with self._cv:
            self._queue.append(("cmd", name, arg, (done, box)))
            self._cv.notify()
        if not done.wait(timeout_s):
            return False, f"{name}_episode timed out after {timeout_s:g} s (writer busy)"
        return box["ok"], box["msg"]

    # -- writer thread --
    def _run(self) -> None:
        last_flush = time.monotonic()
        last_disk = 0.0
        while True:
            with self._cv:
                if not self._queue:
                    if not self._running:
                        return
                    self._cv.wait(0.1)
                batch = list(self._queue)
                self._queue.clear()
            for item in batch:
                if item[0] == "msg":
                    self._queued_bytes -= len(item[3])
                    self._write(item[1], item[2], item[3])
                else:
                    self._do_command(item)
            now = time.monotonic()
            if now - last_disk >= 1.0:
                last_disk = now
                self._check_disk()
            if self._episode is not None and now - last_flush >= self.config.flush_period_s:
                last_flush = now
                self._guarded(self._episode.flush, "flush")
                self.bag_size_bytes = self._episode.size_bytes() if self._episode else 0

    def _write(self, topic: str, log_ns: int, data: bytes) -> None:
        ep = self._episode
        if ep is None:
            self.dropped[topic] += 1
            return
        try:
            if ep.write(topic, log_ns, data):
                self.splits += 1
                self._log("info", f"split {ep.bag_dir.name}: new file {ep.files[-1].path}")
            self.written[topic] += 1
            self._bytes_written += len(data)
        except Exception as exc:
            self.dropped[topic] += 1
            self.errors += 1
            self._log("error", f"write to {ep.bag_dir} failed: {exc}; stopping the episode")
            self._finish("write_error")

    def _guarded(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except Exception as exc:
            self.errors += 1
            self._log("error", f"{what} failed: {exc}; stopping the episode")
            if self._episode is not None:
                self._finish("write_error" if what == "flush" or isinstance(exc, OSError) else f"{what}_error")

    def _measure_rate(self) -> None:
        now, n = time.monotonic(), self._bytes_written
        t0, n0 = self._rate_mark
        if now - t0 >= 0.5:
            inst = (n - n0) / (now - t0)
            # rises at once, decays slowly: the guard plans for the recent peak
            self.write_rate_bps = max(inst, 0.8 * self.write_rate_bps + 0.2 * inst)
            self._rate_mark = (now, n)

    def _check_disk(self) -> None:
        self._measure_rate()
        try:
            self.free_disk_mb = free_disk_mb(self.config.output_dir)
        except OSError:
            return
        if self._episode is None:
            return
        needed = self.needed_free_disk_mb()
        if needed > self.config.min_free_disk_mb and self.write_rate_bps > 0 and not self._margin_warned:
            self._margin_warned = True
            self._log("warning", f"min_free_disk_mb {self.config.min_free_disk_mb:g} is below what the disk "
                                 f"guard needs at {self.write_rate_bps / 2**20:.1f} MiB/s ({needed:.0f} MiB: "
                                 f"{DISK_GUARD_SECONDS:g} s of data, the queue, a {CHUNK_BYTES // 2**20} MiB "
                                 f"chunk and the {RESERVE_BYTES // 2**20} MiB reserve); the guard follows the "
                                 "measured rate instead (see min_free_disk_mb_effective)")
        margin = self.effective_min_free_disk_mb
        if self.free_disk_mb < margin:
            self._log("error", f"disk guard: {self.free_disk_mb:.0f} MiB free < {margin:.0f} MiB "
                               f"(min_free_disk_mb {self.config.min_free_disk_mb:g}, or what "
                               f"{DISK_GUARD_SECONDS:g} s at the measured write rate needs); stopping the episode")
            self.last_stop_reason = "disk_guard"
            self._accepting = False
            self._finish("disk_guard")

    def _do_command(self, item: tuple) -> None:
        _, name, arg, reply = item
        ok, msg = True, ""
        if name == "start":
            ok, msg = self._start(*arg)
        elif name == "stop":
            if self._episode is None:
                ok, msg = False, "no episode is recording"
            else:
                msg = str(self._finish(arg))
        elif name == "add_topic" and self._episode is not None:
            self._guarded(lambda: self._episode.add_topic(arg), "add_topic")
        if reply is not None:
            reply[1].update(ok=ok, msg=msg)
            reply[0].set()

    def _start(self, topics: list[TopicSpec], custom_data: dict[str, str]) -> tuple[bool, str]:
        if self._episode is not None:
            return False, f"an episode is already recording: {self._episode.bag_dir}"
        cfg = self.config
        try:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            self.free_disk_mb = free_disk_mb(cfg.output_dir)
        except OSError as exc:
            return False, f"cannot use output_dir: {exc}"
        if self.free_disk_mb < self.effective_min_free_disk_mb:
            self.state = "idle"
            self.last_stop_reason = "disk_guard"
            return False, (f"disk guard: only {self.free_disk_mb:.0f} MiB free in the output "
                           f"directory, min_free_disk_mb is {cfg.min_free_disk_mb:g}"
                           + (f" (the guard needs {self.effective_min_free_disk_mb:.0f} MiB at the "
                              "measured write rate)" if self.effective_min_free_disk_mb > cfg.min_free_disk_mb
                              else ""))
        name = episode_name(cfg.session_label, self._clock_ns() / 1e9)
        bag = Path(cfg.output_dir) / name
        n = 1
        while bag.exists():
            n += 1
            bag = Path(cfg.output_dir) / f"{name}-{n}"
        data = dict(custom_data)
        data[META_PREFIX + "recorder.state"] = "recording"
        try:
            self._episode = EpisodeWriter(bag, topics, storage=cfg.storage, custom_data=data,
                                          max_file_size_mb=cfg.max_bag_size_mb,
                                          max_file_duration_s=cfg.max_bag_duration_s,
                                          compression=cfg.compression, fsync=cfg.fsync).open()
        except Exception as exc:
            self._episode = None
            return False, f"cannot start episode: {exc}"
        self.written.clear()
        self.dropped.clear()
        self.splits = 0
        self._margin_warned = False
        self.state = "recording"
        self.last_stop_reason = ""
        self._accepting = True
        self.episodes.append(bag)
        self._log("info", f"episode started: {bag}")
        return True, str(bag)

    def _finish(self, reason: str) -> Path | None:
        ep = self._episode
        self._accepting = False
        if ep is None:
            return None
        if ep.error is not None:
            reason = "write_error"  # whatever stopped it, data after the last flush is lost
        self._set_close_metadata(ep, reason)
        for key, value in self._extra_stats().items():
            ep.custom_data[META_PREFIX + key] = value
        try:
            ep.close()
        except Exception as exc:
            self.errors += 1
            self._log("error", f"closing {ep.bag_dir} failed: {exc}; repair it with "
                               f"`cardiac-copilot dataset recover {ep.bag_dir}`")
        if ep.salvaged:
            reason = "write_error"
            self._set_close_metadata(ep, reason)
            try:
                ep.write_metadata()
            except OSError:
                pass
            self._log("error", f"{ep.bag_dir}: write failed ({ep.error}); the bag is finalized with what "
                               f"was flushed before ({sum(ep.counts.values())} messages; lost "
                               f"{sum(ep.lost.values())} written after the last flush)")
        self.bag_size_bytes = sum(p.stat().st_size for p in ep.bag_dir.iterdir() if p.is_file())
        self._episode = None
        self.state = "idle"
        self.last_stop_reason = reason
        self._log("info", f"episode closed ({reason}): {ep.bag_dir} "
                          f"({sum(ep.counts.values())} messages, {self.bag_size_bytes / 2**20:.1f} MiB)")
        return ep.bag_dir

    def _set_close_metadata(self, ep: EpisodeWriter, reason: str) -> None:
        ep.custom_data[META_PREFIX + "recorder.state"] = "closed"
        ep.custom_data[META_PREFIX + "recorder.stop_reason"] = reason
        stats: dict[str, Any] = {"written": dict(self.written), "dropped": dict(self.dropped),
                                 "splits": self.splits}
        if ep.error is not None:
            stats["write_error"] = " ".join(str(ep.error).split())
            stats["lost_after_last_flush"] = dict(ep.lost)
        ep.custom_data[META_PREFIX + "recorder.stats"] = json.dumps(stats, sort_keys=True)

    #: Set by the owner: extra custom_data written at close (e.g. sync statistics).
    extra_stats: Callable[[], dict[str, str]] | None = None

    def _extra_stats(self) -> dict[str, str]:
        try:
            return dict(self.extra_stats()) if self.extra_stats else {}
        except Exception:
            return {}
