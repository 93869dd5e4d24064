"""Differentiable torch versions of the pose algebra in :mod:`cardiac_copilot_ros.pose`.

Same conventions (actions ``(x, y, z, roll, pitch, yaw)`` in mm and degrees, Euler axes
``'sxyz'``: ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)``), vectorised over leading axes. Every
function is TorchScript- and torch.export-compatible (they run inside model bundles for the
Dreamer refinement) and has finite gradients everywhere, including at the pitch = +-90 deg
singularity (the branch that is not taken gets safe inputs, so no NaN leaks through
``torch.where``).
"""

from __future__ import annotations

import torch

# Literals, not module constants: TorchScript does not read module-level floats.
# pi / 180 and 180 / pi:


def _eps(t: torch.Tensor) -> float:
    """pose.py's singularity threshold (4 eps), for the tensor's precision."""
    if t.dtype == torch.float64:
        return 8.881784197001252e-16
    return 4.76837158203125e-07


def euler_to_rotation(rpy_deg: torch.Tensor) -> torch.Tensor:
    """(..., 3) roll, pitch, yaw in degrees -> (..., 3, 3) rotation ``Rz @ Ry @ Rx``."""
    rpy = rpy_deg * 0.017453292519943295
    r = rpy[..., 0]
    p = rpy[..., 1]
    y = rpy[..., 2]
    cr, cp, cy = torch.cos(r), torch.cos(p), torch.cos(y)
    sr, sp, sy = torch.sin(r), torch.sin(p), torch.sin(y)
    row0 = torch.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], dim=-1)
    row1 = torch.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], dim=-1)
    row2 = torch.stack([-sp, cp * sr, cp * cr], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def rotation_to_euler(rot: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation -> (..., 3) roll, pitch, yaw in degrees (pose.py's convention).

    At the singularity (pitch = +-90 deg) yaw is 0 and roll absorbs the rest, as in pose.py.
    """
    r00 = rot[..., 0, 0]
    r10 = rot[..., 1, 0]
    r11 = rot[..., 1, 1]
    r12 = rot[..., 1, 2]
    r20 = rot[..., 2, 0]
    r21 = rot[..., 2, 1]
    r22 = rot[..., 2, 2]
    sq = r00 * r00 + r10 * r10
    eps = _eps(rot)
    regular = sq > eps * eps
    # sqrt with a floor: finite gradient at 0 (value differs from hypot by < 1e-15 only there).
    cos_pitch = torch.sqrt(torch.clamp(sq, min=1e-30))
    pitch = torch.atan2(-torch.clamp(r20, -1.0, 1.0), cos_pitch)
    zero = torch.zeros_like(r00)
    one = torch.ones_like(r00)
    # Safe inputs for the branch not taken (atan2(0, 0) has a NaN gradient).
    reg_y = torch.where(regular, r21, zero)
    reg_x = torch.where(regular, r22, one)
    sing_y = torch.where(regular, zero, -r12)
    sing_x = torch.where(regular, one, r11)
    yaw_y = torch.where(regular, r10, zero)
    yaw_x = torch.where(regular, r00, one)
    roll = torch.where(regular, torch.atan2(reg_y, reg_x), torch.atan2(sing_y, sing_x))
    yaw = torch.where(regular, torch.atan2(yaw_y, yaw_x), zero)
    return torch.stack([roll, pitch, yaw], dim=-1) * 57.29577951308232


def action_to_matrix(a: torch.Tensor) -> torch.Tensor:
    """U(a): (..., 6) action (mm, deg) -> (..., 4, 4) homogeneous matrix (mm)."""
    rot = euler_to_rotation(a[..., 3:6])
    top = torch.cat([rot, a[..., 0:3].unsqueeze(-1)], dim=-1)  # (..., 3, 4)
    bottom = torch.zeros_like(top[..., 0:1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def matrix_to_action(T: torch.Tensor) -> torch.Tensor:
    """U^-1(T): (..., 4, 4) homogeneous matrix (mm) -> (..., 6) action (mm, deg)."""
    return torch.cat([T[..., 0:3, 3], rotation_to_euler(T[..., 0:3, 0:3])], dim=-1)


def compose_actions(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """``U^-1(U(a1) @ U(a2))``: do ``a1`` then ``a2`` (in the frame after ``a1``). Eq. 6.

    Computed without 4x4 matrices (rotation product plus rotated translation), which is the
    same algebra with fewer operations.
    """
    r1 = euler_to_rotation(a1[..., 3:6])
    r2 = euler_to_rotation(a2[..., 3:6])
    rot = torch.matmul(r1, r2)
    trans = a1[..., 0:3] + torch.matmul(r1, a2[..., 0:3].unsqueeze(-1)).squeeze(-1)
    return torch.cat([trans, rotation_to_euler(rot)], dim=-1)


def invert_action(a: torch.Tensor) -> torch.Tensor:
    """``U^-1(U(a)^-1)``: the action that undoes ``a``."""
    rot = euler_to_rotation(a[..., 3:6])
    rt = rot.transpose(-1, -2)
    trans = -torch.matmul(rt, a[..., 0:3].unsqueeze(-1)).squeeze(-1)
    return torch.cat([trans, rotation_to_euler(rt)], dim=-1)
