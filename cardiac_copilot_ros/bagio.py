"""rosbag2 I/O without a ROS install (the ``rosbags`` library), shared by the simulator,
the dataset builder and the recorder.

Bags are written as real rosbag2 bags (MCAP storage by default, sqlite3 selectable) that
``ros2 bag info`` / ``ros2 bag play`` and independent MCAP readers accept. Messages use the
ROS 2 Jazzy definitions; readers also accept Humble bags (the definitions are embedded).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from .images import image_fields

#: Message definitions used for writing and for messages built in the core.
TYPESTORE = get_typestore(Stores.ROS2_JAZZY)

#: Default topic names: the simulator writes them, the recorder's defaults match.
IMAGE_TOPIC = "/us/image"
COMPRESSED_IMAGE_TOPIC = "/us/image/compressed"
POSE_TOPIC = "/probe_pose"
POSE_SYNC_TOPIC = "/probe_pose_sync"
ANNOTATION_TOPIC = "/annotations"

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
POSE_TYPE = "geometry_msgs/msg/PoseStamped"
STRING_TYPE = "std_msgs/msg/String"

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


class BagError(RuntimeError):
    """A bag could not be read or written; the message names the bag."""


def ns_to_stamp(stamp_ns: int) -> Any:
    """Nanoseconds -> builtin_interfaces/Time (rosbags message class)."""
    Time = TYPESTORE.types["builtin_interfaces/msg/Time"]
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time (any flavour with sec/nanosec) -> nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _header(stamp_ns: int, frame_id: str) -> Any:
    Header = TYPESTORE.types["std_msgs/msg/Header"]
    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


def make_image(stamp_ns: int, frame_id: str, image: np.ndarray) -> Any:
    """A sensor_msgs/Image (mono8 for 2-D uint8, rgb8 for HxWx3 uint8, mono16 for uint16)."""
    fields = image_fields(image)
    fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
    return TYPESTORE.types[IMAGE_TYPE](header=_header(stamp_ns, frame_id), **fields)


def make_pose_stamped(stamp_ns: int, frame_id: str, position_m: np.ndarray,
                      quat_xyzw: np.ndarray) -> Any:
    """A geometry_msgs/PoseStamped (position in metres, quaternion x, y, z, w)."""
    t = TYPESTORE.types
    p = np.asarray(position_m, dtype=float)
    q = np.asarray(quat_xyzw, dtype=float)
    pose = t["geometry_msgs/msg/Pose"](
        position=t["geometry_msgs/msg/Point"](x=float(p[0]), y=float(p[1]), z=float(p[2])),
        orientation=t["geometry_msgs/msg/Quaternion"](x=float(q[0]), y=float(q[1]),
                                                      z=float(q[2]), w=float(q[3])))
    return t[POSE_TYPE](header=_header(stamp_ns, frame_id), pose=pose)


def make_string(text: str) -> Any:
    """A std_msgs/String."""
    return TYPESTORE.types[STRING_TYPE](data=text)


class BagWriter:
    """Write a rosbag2 bag; use as a context manager so the bag is always closed.

    >>> with BagWriter(path) as bag:
    ...     img = bag.add_topic(IMAGE_TOPIC, IMAGE_TYPE)
    ...     bag.write(img, stamp_ns, make_image(...))
    """

    def __init__(self, path: str | Path, storage: str = "mcap") -> None:
        if storage not in STORAGES:
            raise BagError(f"unknown storage {storage!r}; choose one of {sorted(STORAGES)}")
        self.path = Path(path)
        self.storage = storage
        try:
            self._writer = Writer(self.path, version=9, storage_plugin=STORAGES[storage])
        except Exception as exc:  # rosbags raises WriterError for an existing path
            raise BagError(f"cannot create bag {self.path}: {exc}") from exc
        self._types: dict[int, str] = {}  # connection id -> msgtype (Connection is unhashable)
        self.counts: dict[str, int] = {}

    def open(self) -> BagWriter:
        self._writer.open()
        return self

    def __enter__(self) -> BagWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_topic(self, topic: str, msgtype: str) -> Any:
        """Declare a topic; returns the connection to pass to :meth:`write`."""
        conn = self._writer.add_connection(topic, msgtype, typestore=TYPESTORE)
        self._types[conn.id] = msgtype
        self.counts[topic] = 0
        return conn

    def set_metadata(self, key: str, value: str) -> None:
        """Store a key/value in the bag's metadata.yaml custom_data."""
        self._writer.set_custom_data(key, value)

    def write(self, conn: Any, log_time_ns: int, msg: Any) -> None:
        """Serialize (CDR) and write one message."""
        self.write_raw(conn, log_time_ns, TYPESTORE.serialize_cdr(msg, self._types[conn.id]))

    def write_raw(self, conn: Any, log_time_ns: int, data: bytes | memoryview) -> None:
        """Write one already CDR-serialized message."""
        self._writer.write(conn, int(log_time_ns), data)
        self.counts[conn.topic] += 1

    def close(self) -> None:
        self._writer.close()


def open_reader(paths: str | Path | Iterable[str | Path]) -> AnyReader:
    """An opened rosbags AnyReader over one or more bags, with a clear error for bad input."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise BagError(f"bag not found: {p}")
    reader = AnyReader(paths, default_typestore=TYPESTORE)
    try:
        reader.open()
    except Exception as exc:
        raise BagError(f"cannot read bag {', '.join(map(str, paths))}: {exc}") from exc
    return reader


def read_messages(path: str | Path, topics: Iterable[str] | None = None
                  ) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(topic, log_time_ns, message)`` from one bag in log-time order."""
    reader = open_reader(path)
    try:
        conns = [c for c in reader.connections if topics is None or c.topic in set(topics)]
        for conn, log_ns, raw in reader.messages(connections=conns):
            yield conn.topic, log_ns, reader.deserialize(raw, conn.msgtype)
    finally:
        reader.close()
