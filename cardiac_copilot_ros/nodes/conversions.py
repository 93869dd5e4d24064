"""rclpy message adapters: ROS messages (m, rad, quaternions) <-> the core's numpy (mm, deg).

Every node uses these at its boundary, so the core never sees a message and the nodes never
do pose algebra by hand. Functions that read messages validate them and raise
:class:`MessageError` (a ``ValueError``) with a clear reason on bad input (NaN, non-unit
quaternions, bad image sizes); they never return NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import (
    Point,
    Pose,
    PoseStamped,
    Quaternion,
    Transform,
    TransformStamped,
    Twist,
    TwistStamped,
    Vector3,
)
from std_msgs.msg import Header

from .. import images
from .. import pose as pose_alg

#: Largest accepted deviation of a quaternion's norm from 1 (beyond it the pose is rejected).
QUAT_NORM_TOLERANCE = 1e-3


class MessageError(ValueError):
    """A message cannot be converted (non-finite values, non-unit quaternion, bad image)."""


class ImageTooLargeMessageError(MessageError):
    """The image exceeds the size limits (found from its header before decoding)."""


def _image_error(exc: images.ImageFormatError) -> MessageError:
    cls = ImageTooLargeMessageError if isinstance(exc, images.ImageTooLargeError) else MessageError
    return cls(str(exc))


# ---------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(stamp_ns: int) -> Time:
    """Integer nanoseconds -> builtin_interfaces/Time."""
    stamp_ns = int(stamp_ns)
    return Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)


def copy_stamp(stamp: Any) -> Time:
    """A fresh builtin_interfaces/Time equal to ``stamp`` (messages must not share fields)."""
    return Time(sec=int(stamp.sec), nanosec=int(stamp.nanosec))


def make_header(stamp: Any, frame_id: str) -> Header:
    """std_msgs/Header with a copy of ``stamp`` (Time or int ns) and ``frame_id``."""
    t = ns_to_stamp(stamp) if isinstance(stamp, (int, np.integer)) else copy_stamp(stamp)
    return Header(stamp=t, frame_id=frame_id)


# ---------------------------------------------------------------------------------------
# Poses and transforms
# ---------------------------------------------------------------------------------------


def _checked_quat(q: Sequence[float], tolerance: float) -> np.ndarray:
    quat = np.asarray(q, dtype=np.float64)
    if not np.all(np.isfinite(quat)):
        raise MessageError(f"orientation is not finite: {quat.tolist()}")
    norm = float(np.linalg.norm(quat))
    if abs(norm - 1.0) > tolerance:
        raise MessageError(f"orientation quaternion is not unit (norm {norm:.6g}, tolerance {tolerance:g})")
    return quat / norm


def _checked_position(p: Sequence[float]) -> np.ndarray:
    pos = np.asarray(p, dtype=np.float64)
    if not np.all(np.isfinite(pos)):
        raise MessageError(f"position is not finite: {pos.tolist()}")
    return pos


def pose_msg_to_matrix(msg: Pose, quat_tolerance: float = QUAT_NORM_TOLERANCE) -> np.ndarray:
    """geometry_msgs/Pose (m, quaternion) -> 4x4 matrix with translation in mm.

    Raises :class:`MessageError` for non-finite values or a quaternion whose norm differs
    from 1 by more than ``quat_tolerance`` (slightly off-unit ones are renormalised).
    """
    p, q = msg.position, msg.orientation
    pos = _checked_position((p.x, p.y, p.z))
    quat = _checked_quat((q.x, q.y, q.z, q.w), quat_tolerance)
    return pose_alg.pose_to_matrix(pos, quat)


def transform_msg_to_matrix(msg: Transform, quat_tolerance: float = QUAT_NORM_TOLERANCE) -> np.ndarray:
    """geometry_msgs/Transform (m, quaternion) -> 4x4 matrix with translation in mm."""
    t, q = msg.translation, msg.rotation
    pos = _checked_position((t.x, t.y, t.z))
    quat = _checked_quat((q.x, q.y, q.z, q.w), quat_tolerance)
    return pose_alg.pose_to_matrix(pos, quat)


def _check_matrix(T_mm: np.ndarray) -> np.ndarray:
    T = np.asarray(T_mm, dtype=np.float64)
    if T.shape != (4, 4):
        raise MessageError(f"expected a 4x4 matrix, got shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise MessageError("matrix is not finite")
    return T


def matrix_to_pose_msg(T_mm: np.ndarray) -> Pose:
    """4x4 matrix (translation mm) -> geometry_msgs/Pose (m, unit quaternion xyzw)."""
    pos, quat = pose_alg.matrix_to_pose(_check_matrix(T_mm))
    return Pose(position=Point(x=float(pos[0]), y=float(pos[1]), z=float(pos[2])),
                orientation=Quaternion(x=float(quat[0]), y=float(quat[1]),
                                       z=float(quat[2]), w=float(quat[3])))


def matrix_to_pose_stamped(T_mm: np.ndarray, stamp: Any, frame_id: str) -> PoseStamped:
    """4x4 matrix (mm) -> geometry_msgs/PoseStamped in ``frame_id`` at ``stamp`` (Time or ns)."""
    return PoseStamped(header=make_header(stamp, frame_id), pose=matrix_to_pose_msg(T_mm))


def pose_stamped_to_matrix(msg: PoseStamped, quat_tolerance: float = QUAT_NORM_TOLERANCE
                           ) -> tuple[int, np.ndarray]:
    """geometry_msgs/PoseStamped -> (stamp ns, 4x4 matrix in mm)."""
    return stamp_to_ns(msg.header.stamp), pose_msg_to_matrix(msg.pose, quat_tolerance)


def matrix_to_transform_stamped(T_mm: np.ndarray, stamp: Any, parent_frame: str,
                                child_frame: str) -> TransformStamped:
    """4x4 matrix (parent <- child, mm) -> geometry_msgs/TransformStamped (m) for TF."""
    pos, quat = pose_alg.matrix_to_pose(_check_matrix(T_mm))
    tf = TransformStamped(header=make_header(stamp, parent_frame), child_frame_id=child_frame)
    tf.transform = Transform(
        translation=Vector3(x=float(pos[0]), y=float(pos[1]), z=float(pos[2])),
        rotation=Quaternion(x=float(quat[0]), y=float(quat[1]), z=float(quat[2]), w=float(quat[3])))
    return tf


# ---------------------------------------------------------------------------------------
# Actions <-> twists
# ---------------------------------------------------------------------------------------


def action_to_twist_msg(action: np.ndarray) -> Twist:
    """Action (x, y, z mm; roll, pitch, yaw deg) -> geometry_msgs/Twist (m, rotation vector rad).

    Raises :class:`MessageError` for a non-finite action, so a NaN twist is never built.
    """
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (6,):
        raise MessageError(f"expected a (6,) action, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise MessageError(f"action is not finite: {a.tolist()}")
    lin, ang = pose_alg.action_to_twist(a)
    return Twist(linear=Vector3(x=float(lin[0]), y=float(lin[1]), z=float(lin[2])),
                 angular=Vector3(x=float(ang[0]), y=float(ang[1]), z=float(ang[2])))


def action_to_twist_stamped(action: np.ndarray, stamp: Any, frame_id: str) -> TwistStamped:
    """Action (mm, deg) -> geometry_msgs/TwistStamped in ``frame_id`` at ``stamp`` (Time or ns)."""
    return TwistStamped(header=make_header(stamp, frame_id), twist=action_to_twist_msg(action))


def twist_msg_to_action(msg: Twist | TwistStamped) -> np.ndarray:
    """geometry_msgs/Twist or TwistStamped -> (6,) action (mm, deg); inverse of the above."""
    tw = msg.twist if isinstance(msg, TwistStamped) else msg
    lin = np.array([tw.linear.x, tw.linear.y, tw.linear.z], dtype=np.float64)
    ang = np.array([tw.angular.x, tw.angular.y, tw.angular.z], dtype=np.float64)
    if not (np.all(np.isfinite(lin)) and np.all(np.isfinite(ang))):
        raise MessageError("twist is not finite")
    return pose_alg.twist_to_action(lin, ang)


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def image_msg_to_gray(msg: Any, max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/Image (any encoding of :data:`images.ENCODINGS`) -> (H, W) uint8 gray.

    Raises :class:`MessageError` (with the reason from :mod:`images`) on bad input,
    :class:`ImageTooLargeMessageError` beyond ``max_pixels`` (width x height) or 8192 px per side.
    """
    try:
        arr = images.image_msg_to_array(msg, max_pixels)
        return images.to_gray_u8(arr, str(msg.encoding))
    except images.ImageFormatError as exc:
        raise _image_error(exc) from exc


def compressed_msg_to_gray(msg: Any, max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> (H, W) uint8 gray; :class:`MessageError` on bad data.

    The size is checked from the PNG/JPEG header before decoding (:class:`ImageTooLargeMessageError`).
    """
    try:
        return images.compressed_msg_to_gray(msg, max_pixels)
    except images.ImageFormatError as exc:
        raise _image_error(exc) from exc


def any_image_msg_to_gray(msg: Any, max_pixels: int | None = images.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image or CompressedImage -> (H, W) uint8 gray (dispatch on the message's fields)."""
    if hasattr(msg, "encoding"):
        return image_msg_to_gray(msg, max_pixels)
    return compressed_msg_to_gray(msg, max_pixels)


def gray_to_image_msg(gray: np.ndarray, stamp: Any, frame_id: str) -> Any:
    """(H, W) uint8 / uint16 or (H, W, 3) uint8 array -> sensor_msgs/Image (mono8/mono16/rgb8)."""
    from sensor_msgs.msg import Image

    fields = images.image_fields(gray)
    return Image(header=make_header(stamp, frame_id), **fields)


def gray_to_compressed_msg(gray: np.ndarray, stamp: Any, frame_id: str, fmt: str = "png") -> Any:
    """(H, W) uint8 array -> sensor_msgs/CompressedImage (``png`` or ``jpeg``)."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    ext = ".png" if fmt == "png" else ".jpg"
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(gray))
    if not ok:
        raise MessageError(f"cannot encode image as {fmt}")
    return CompressedImage(header=make_header(stamp, frame_id), format=fmt, data=buf.tobytes())
