"""Final-approach survey: read the target from several poses around the plane, as sonographers rock the
probe (issue 13 item 3; rclpy-free).

A learned guidance has a bias that changes with the pose it is read at. Where the closed loop comes to
rest is where the guidance (nearly) vanishes: a fixed point of the model, a few millimetres off the plane
when its bias happens to vanish there too. Read from a handful of poses around that point, the biases
no longer agree: their robust mean is closer to the true target (validation subjects 8000-8011, session
5: from the loop's resting poses, median target error 3.1 -> 2.5 mm, within 5 mm / 5 deg 72 -> 85 %),
and their scatter says how far to trust it (the scatter separates the misses from the hits better than
the model's own uncertainty: AUC 0.85 against 0.65).

:func:`survey_offsets` gives the poses: a two-level design on the six axes (rows of a Hadamard matrix),
so that every axis is visited on both sides equally often and the first-order bias of each axis cancels
in the mean. :func:`survey_target` turns the target estimates read there into one target with its
scatter. The servo (:class:`..servo.ServoController`, ``survey_poses``) drives the probe through the
survey; :mod:`..rollout` simulates the same. Poses are 4x4 with translation in mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .pose import rotation_to_rotvec, rotvec_to_rotation

#: Survey sizes that have a balanced design (every axis half +, half -).
SURVEY_SIZES = (4, 8, 12)
#: What a survey pose reads: the target the guidance implies there (with the guidance node's fusion, the
#: fused target: smooth, it remembers the poses before) or each frame's own target estimate before fusion
#: (guidance_node's ``frame_target_pose``: noisier, but it says how much the model's reads disagree).
SURVEY_READS = ("guidance", "frame_target")


def _hadamard(n: int) -> np.ndarray:
    if n == 12:   # Paley construction (q = 11)
        q = 11
        residues = {(i * i) % q for i in range(1, q)}
        chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
        Q = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
        S = np.zeros((12, 12), int)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
        H = S + np.eye(12, dtype=int)
        return H * H[0][None, :] * H[:, 0][:, None]   # normalise: first row and column all +1
    H = np.array([[1]])
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def survey_offsets(n: int, step_mm: float, step_deg: float, z_factor: float = 1.0 / 3.0) -> np.ndarray:
    """(n, 6) offsets (mm, deg; probe frame: pose = centre @ U(offset)) of an ``n``-pose survey.

    Every axis takes +-``step`` (z: ``z_factor`` times ``step_mm``, the elevation direction where the
    image changes fastest) and is on each side in half of the poses; n in :data:`SURVEY_SIZES`.
    For n = 4 the six axes share three balanced columns (y with roll, z with pitch, x with yaw).
    """
    if n not in SURVEY_SIZES:
        raise ValueError(f"survey size must be one of {SURVEY_SIZES}, got {n!r}")
    H = _hadamard(n)
    if n == 4:   # three balanced columns; the rotations take them in another order (roll with y, ...)
        cols = H[:, 1:4]
        signs = np.concatenate([cols, cols[:, [1, 2, 0]]], axis=1)
    else:
        signs = H[:, 1:7]
    scale = np.array([step_mm, step_mm, z_factor * step_mm, step_deg, step_deg, step_deg], np.float64)
    return signs.astype(np.float64) * scale


@dataclass(frozen=True)
class SurveyTarget:
    """The surveyed target: robust mean of the estimates, and their scatter around it."""

    T_mm: np.ndarray        # (4, 4) base frame, translation in mm
    spread_mm: float        # root mean square distance of the estimates from the mean [mm]
    spread_deg: float       # root mean square rotation angle of the estimates from the mean [deg]
    n: int


def survey_target(estimates: Sequence[np.ndarray]) -> SurveyTarget:
    """Robust mean (per-axis median of the translation and of the rotation residuals about a chordal
    mean) and scatter of target pose estimates (each 4x4, mm, base frame). ValueError if empty or
    not finite."""
    Ts = np.asarray(estimates, dtype=np.float64).reshape(-1, 4, 4)
    if len(Ts) == 0 or not np.all(np.isfinite(Ts)):
        raise ValueError("survey_target needs at least one finite 4x4 estimate")
    t = np.median(Ts[:, :3, 3], axis=0)
    u, _, vt = np.linalg.svd(Ts[:, :3, :3].sum(0))
    R0 = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    residuals = rotation_to_rotvec(Ts[:, :3, :3] @ R0.T)            # (n, 3) rad, base axes
    R = rotvec_to_rotation(np.median(residuals, axis=0)) @ R0
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    d = np.linalg.norm(Ts[:, :3, 3] - t, axis=1)
    phi = np.linalg.norm(rotation_to_rotvec(Ts[:, :3, :3] @ R.T), axis=1)
    return SurveyTarget(T, float(np.sqrt(np.mean(d ** 2))), float(np.degrees(np.sqrt(np.mean(phi ** 2)))), len(Ts))


__all__ = ["SURVEY_READS", "SURVEY_SIZES", "SurveyTarget", "survey_offsets", "survey_target"]
