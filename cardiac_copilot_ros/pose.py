"""The paper's pose algebra, message-free and vectorised over leading axes.

Conventions (used everywhere in this package, written down once here):

* A probe pose is a 4x4 homogeneous matrix ``T`` (base frame <- probe frame) with the
  translation in **millimetres**.
* An action ``a`` is a 6-vector ``(x, y, z, roll, pitch, yaw)``: translation in **mm**,
  rotation as Euler angles in **degrees** in the convention :data:`EULER_AXES` =
  ``'sxyz'`` (static axes, rotate about x by roll, then about the fixed y by pitch, then
  about the fixed z by yaw): ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)``.
* ``U(a)`` = :func:`action_to_matrix`, ``U^-1`` = :func:`matrix_to_action`.
* The ground truth action from the current pose ``T_t`` to the target ``T_T`` is
  ``U^-1(T_t^-1 T_T)`` = :func:`relative_action`: the target pose expressed in the current
  probe frame.
* Quaternions follow ROS order ``(x, y, z, w)``.

ROS messages use metres and radians (REP-103); the adapters in
``cardiac_copilot_ros.nodes.conversions`` convert at the boundary.
"""

from __future__ import annotations

import numpy as np

#: The one Euler convention of the package, as a transforms3d axes string.
EULER_AXES = "sxyz"

#: Units of the six action axes, for tables, plots and dataset files.
ACTION_UNITS = ("mm", "mm", "mm", "deg", "deg", "deg")
#: Names of the six action axes.
ACTION_AXES = ("x", "y", "z", "roll", "pitch", "yaw")

_EPS = np.finfo(np.float64).eps * 4.0


def _as_float(a: np.ndarray | list | tuple) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    return arr


def euler_to_rotation(rpy_deg: np.ndarray) -> np.ndarray:
    """(..., 3) roll, pitch, yaw in degrees -> (..., 3, 3) rotation, ``Rz @ Ry @ Rx``."""
    rpy = np.deg2rad(_as_float(rpy_deg))
    if rpy.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) Euler angles, got shape {rpy.shape}")
    cr, cp, cy = np.cos(rpy[..., 0]), np.cos(rpy[..., 1]), np.cos(rpy[..., 2])
    sr, sp, sy = np.sin(rpy[..., 0]), np.sin(rpy[..., 1]), np.sin(rpy[..., 2])
    rot = np.empty(rpy.shape[:-1] + (3, 3))
    rot[..., 0, 0] = cy * cp
    rot[..., 0, 1] = cy * sp * sr - sy * cr
    rot[..., 0, 2] = cy * sp * cr + sy * sr
    rot[..., 1, 0] = sy * cp
    rot[..., 1, 1] = sy * sp * sr + cy * cr
    rot[..., 1, 2] = sy * sp * cr - cy * sr
    rot[..., 2, 0] = -sp
    rot[..., 2, 1] = cp * sr
    rot[..., 2, 2] = cp * cr
    return rot


def rotation_to_euler(rot: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation -> (..., 3) roll, pitch, yaw in degrees (inverse of the above).

    At the singularity (pitch = +-90 deg) yaw is set to 0 and roll absorbs the remaining
    rotation, as transforms3d does; the result is finite, never NaN.
    """
    rot = _as_float(rot)
    if rot.shape[-2:] != (3, 3):
        raise ValueError(f"expected (..., 3, 3) rotation, got shape {rot.shape}")
    cos_pitch = np.hypot(rot[..., 0, 0], rot[..., 1, 0])
    regular = cos_pitch > _EPS
    pitch = np.arctan2(-np.clip(rot[..., 2, 0], -1.0, 1.0), cos_pitch)
    roll = np.where(regular, np.arctan2(rot[..., 2, 1], rot[..., 2, 2]),
                    np.arctan2(-rot[..., 1, 2], rot[..., 1, 1]))
    yaw = np.where(regular, np.arctan2(rot[..., 1, 0], rot[..., 0, 0]), 0.0)
    return np.rad2deg(np.stack([roll, pitch, yaw], axis=-1))


def action_to_matrix(a: np.ndarray) -> np.ndarray:
    """U(a): (..., 6) action (mm, deg) -> (..., 4, 4) homogeneous matrix (translation mm)."""
    a = _as_float(a)
    if a.shape[-1] != 6:
        raise ValueError(f"expected (..., 6) action, got shape {a.shape}")
    T = np.zeros(a.shape[:-1] + (4, 4))
    T[..., :3, :3] = euler_to_rotation(a[..., 3:])
    T[..., :3, 3] = a[..., :3]
    T[..., 3, 3] = 1.0
    return T


def matrix_to_action(T: np.ndarray) -> np.ndarray:
    """U^-1(T): (..., 4, 4) homogeneous matrix (mm) -> (..., 6) action (mm, deg)."""
    T = _as_float(T)
    if T.shape[-2:] != (4, 4):
        raise ValueError(f"expected (..., 4, 4) matrix, got shape {T.shape}")
    return np.concatenate([T[..., :3, 3], rotation_to_euler(T[..., :3, :3])], axis=-1)


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms (..., 4, 4), exact (R^T, -R^T t)."""
    T = _as_float(T)
    out = np.zeros_like(T)
    rt = np.swapaxes(T[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rt, T[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


def relative_action(T_from: np.ndarray, T_to: np.ndarray) -> np.ndarray:
    """The action taking probe pose ``T_from`` to ``T_to``, in the ``T_from`` probe frame.

    ``U^-1(T_from^-1 @ T_to)``; this is the paper's ground truth when ``T_to`` is the target.
    """
    return matrix_to_action(invert(T_from) @ _as_float(T_to))


def compose_actions(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """``U^-1(U(a1) @ U(a2))``: do ``a1`` then ``a2`` (expressed in the frame after ``a1``). Eq. 6."""
    return matrix_to_action(action_to_matrix(a1) @ action_to_matrix(a2))


def apply_action(T: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The pose reached from ``T`` by action ``a``: ``T @ U(a)``."""
    return _as_float(T) @ action_to_matrix(a)


# ---------------------------------------------------------------------------------------
# Quaternions (ROS order x, y, z, w) and rotation vectors
# ---------------------------------------------------------------------------------------


def quat_to_rotation(q_xyzw: np.ndarray) -> np.ndarray:
    """(..., 4) quaternion (x, y, z, w) -> (..., 3, 3). The quaternion is normalised first.

    Raises ValueError for a zero or non-finite quaternion.
    """
    q = _as_float(q_xyzw)
    if q.shape[-1] != 4:
        raise ValueError(f"expected (..., 4) quaternion, got shape {q.shape}")
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if not np.all(np.isfinite(q)) or np.any(norm < 1e-9):
        raise ValueError("quaternion is zero or not finite")
    x, y, z, w = np.moveaxis(q / norm, -1, 0)
    rot = np.empty(q.shape[:-1] + (3, 3))
    rot[..., 0, 0] = 1 - 2 * (y * y + z * z)
    rot[..., 0, 1] = 2 * (x * y - z * w)
    rot[..., 0, 2] = 2 * (x * z + y * w)
    rot[..., 1, 0] = 2 * (x * y + z * w)
    rot[..., 1, 1] = 1 - 2 * (x * x + z * z)
    rot[..., 1, 2] = 2 * (y * z - x * w)
    rot[..., 2, 0] = 2 * (x * z - y * w)
    rot[..., 2, 1] = 2 * (y * z + x * w)
    rot[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return rot


def rotation_to_quat(rot: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation -> (..., 4) unit quaternion (x, y, z, w) with w >= 0."""
    rot = _as_float(rot)
    m = rot
    # Shepperd's method, branch-free over the batch: pick the largest of 4 candidates.
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = np.stack([
        tr, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], axis=-1)
    best = np.argmax(cands, axis=-1)
    q = np.empty(rot.shape[:-2] + (4,))
    # w largest
    s0 = np.sqrt(np.maximum(1.0 + tr, 1e-300)) * 2
    q0 = np.stack([(m[..., 2, 1] - m[..., 1, 2]) / s0, (m[..., 0, 2] - m[..., 2, 0]) / s0,
                   (m[..., 1, 0] - m[..., 0, 1]) / s0, 0.25 * s0], axis=-1)
    s1 = np.sqrt(np.maximum(1.0 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], 1e-300)) * 2
    q1 = np.stack([0.25 * s1, (m[..., 0, 1] + m[..., 1, 0]) / s1,
                   (m[..., 0, 2] + m[..., 2, 0]) / s1, (m[..., 2, 1] - m[..., 1, 2]) / s1], axis=-1)
    s2 = np.sqrt(np.maximum(1.0 + m[..., 1, 1] - m[..., 0, 0] - m[..., 2, 2], 1e-300)) * 2
    q2 = np.stack([(m[..., 0, 1] + m[..., 1, 0]) / s2, 0.25 * s2,
                   (m[..., 1, 2] + m[..., 2, 1]) / s2, (m[..., 0, 2] - m[..., 2, 0]) / s2], axis=-1)
    s3 = np.sqrt(np.maximum(1.0 + m[..., 2, 2] - m[..., 0, 0] - m[..., 1, 1], 1e-300)) * 2
    q3 = np.stack([(m[..., 0, 2] + m[..., 2, 0]) / s3, (m[..., 1, 2] + m[..., 2, 1]) / s3,
                   0.25 * s3, (m[..., 1, 0] - m[..., 0, 1]) / s3], axis=-1)
    allq = np.stack([q0, q1, q2, q3], axis=-2)
    q = np.take_along_axis(allq, best[..., None, None], axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., 3:4] < 0, -q, q)


def rotation_to_rotvec(rot: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation -> (..., 3) rotation vector (axis * angle, radians), angle in [0, pi]."""
    q = rotation_to_quat(rot)  # w >= 0 so the angle is in [0, pi]
    xyz, w = q[..., :3], q[..., 3]
    s = np.linalg.norm(xyz, axis=-1)
    angle = 2.0 * np.arctan2(s, w)
    # angle / sin(angle/2) -> 2 as s -> 0
    scale = np.where(s > 1e-12, angle / np.maximum(s, 1e-300), 2.0)
    return xyz * scale[..., None]


def rotvec_to_rotation(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vector (radians) -> (..., 3, 3) rotation (Rodrigues)."""
    v = _as_float(rotvec)
    angle = np.linalg.norm(v, axis=-1)
    half = angle / 2.0
    # sin(half)/angle -> 1/2 as angle -> 0
    k = np.where(angle > 1e-12, np.sin(half) / np.maximum(angle, 1e-300), 0.5 - angle**2 / 48.0)
    q = np.concatenate([v * k[..., None], np.cos(half)[..., None]], axis=-1)
    return quat_to_rotation(q)


def rotation_angle_deg(rot: np.ndarray) -> np.ndarray:
    """Geodesic angle of rotation(s) (..., 3, 3) in degrees, in [0, 180]."""
    return np.rad2deg(np.linalg.norm(rotation_to_rotvec(rot), axis=-1))


def pose_error(T_a: np.ndarray, T_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translation distance (mm) and geodesic rotation angle (deg) between poses."""
    d = invert(T_a) @ _as_float(T_b)
    return np.linalg.norm(d[..., :3, 3], axis=-1), rotation_angle_deg(d[..., :3, :3])


# ---------------------------------------------------------------------------------------
# ROS units (m, quaternion, rotation vector) without messages
# ---------------------------------------------------------------------------------------


def pose_to_matrix(position_m: np.ndarray, quat_xyzw: np.ndarray) -> np.ndarray:
    """Position (..., 3) in metres and quaternion (..., 4) xyzw -> (..., 4, 4) with mm."""
    p = _as_float(position_m)
    rot = quat_to_rotation(quat_xyzw)
    T = np.zeros(rot.shape[:-2] + (4, 4))
    T[..., :3, :3] = rot
    T[..., :3, 3] = p * 1000.0
    T[..., 3, 3] = 1.0
    return T


def matrix_to_pose(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 4, 4) with mm -> (position (..., 3) in metres, quaternion (..., 4) xyzw)."""
    T = _as_float(T)
    return T[..., :3, 3] / 1000.0, rotation_to_quat(T[..., :3, :3])


def action_to_twist(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Action (mm, deg) -> (linear m, angular rotation vector rad) as DESIGN.md's guidance.

    The twist reaches the target in one second to first order: linear is the target position
    in the probe frame, angular the rotation vector of the target orientation.
    """
    a = _as_float(a)
    return a[..., :3] / 1000.0, rotation_to_rotvec(euler_to_rotation(a[..., 3:]))


def twist_to_action(linear_m: np.ndarray, angular_rad: np.ndarray) -> np.ndarray:
    """Inverse of :func:`action_to_twist`."""
    lin = _as_float(linear_m) * 1000.0
    rpy = rotation_to_euler(rotvec_to_rotation(angular_rad))
    return np.concatenate([lin, rpy], axis=-1)


# ---------------------------------------------------------------------------------------
# Interpolation of pose streams (dataset builder, recorder)
# ---------------------------------------------------------------------------------------


def slerp(q0: np.ndarray, q1: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spherical linear interpolation of quaternions (..., 4) xyzw at weights w (...,)."""
    q0 = _as_float(q0) / np.linalg.norm(q0, axis=-1, keepdims=True)
    q1 = _as_float(q1) / np.linalg.norm(q1, axis=-1, keepdims=True)
    w = _as_float(w)[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin_t = np.sin(theta)
    small = sin_t < 1e-6
    safe = np.where(small, 1.0, sin_t)
    a = np.where(small, 1.0 - w, np.sin((1.0 - w) * theta) / safe)
    b = np.where(small, w, np.sin(w * theta) / safe)
    q = a * q0 + b * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def interpolate_poses(query_ns: np.ndarray, stamps_ns: np.ndarray, positions: np.ndarray,
                      quats_xyzw: np.ndarray, max_gap_ns: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probe poses at ``query_ns`` from a stream sorted by ``stamps_ns``.

    Linear in position, slerp in orientation between the two poses around each query.
    Returns ``(positions (N, 3), quats (N, 4), valid (N,) bool)``. A query is invalid when it
    lies outside the stream or the two poses around it are more than ``max_gap_ns`` apart;
    invalid rows hold the nearest pose so arrays stay finite.
    """
    query = np.asarray(query_ns, dtype=np.int64)
    stamps = np.asarray(stamps_ns, dtype=np.int64)
    positions = _as_float(positions)
    quats = _as_float(quats_xyzw)
    n = len(stamps)
    if n == 0:
        raise ValueError("no poses to interpolate from")
    if np.any(np.diff(stamps) < 0):
        raise ValueError("pose stamps must be sorted")
    hi = np.searchsorted(stamps, query, side="left")
    exact = (hi < n) & (stamps[np.minimum(hi, n - 1)] == query)
    inside = (hi > 0) & (hi < n)
    lo = np.clip(hi - 1, 0, n - 1)
    hi_c = np.clip(hi, 0, n - 1)
    gap = (stamps[hi_c] - stamps[lo]).astype(np.float64)
    w = np.where(gap > 0, (query - stamps[lo]).astype(np.float64) / np.where(gap > 0, gap, 1.0), 0.0)
    w = np.clip(w, 0.0, 1.0)
    pos = positions[lo] * (1.0 - w[:, None]) + positions[hi_c] * w[:, None]
    q = slerp(quats[lo], quats[hi_c], w)
    valid = inside | exact
    if max_gap_ns is not None:
        valid &= exact | (gap <= max_gap_ns)
    pos = np.where(exact[:, None], positions[hi_c], pos)
    q = np.where(exact[:, None], quats[hi_c] / np.linalg.norm(quats[hi_c], axis=-1, keepdims=True), q)
    return pos, q, valid
