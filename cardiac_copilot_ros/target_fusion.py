"""Target estimation over time: fuse per-frame target estimates into one target pose (rclpy-free).

While the patient is still, the target plane stands still in ``base_frame``; every frame gives
an estimate of it: ``T_target = T_probe(image stamp) @ U(a)`` (a = the model's action, mm/deg).
:class:`TargetFusion` keeps a window of these estimates and returns their robust weighted mean
on SE(3) with its spread:

* **weights**: recency (exponential forgetting, time constant ``time_constant_s``, relative to
  the newest estimate) times the model's per-axis uncertainty where the bundle gives it
  (``action_scale`` b, mm/deg: information ``1/b^2`` per axis, rotated from the probe frame at
  the image into the base frame), else a default scale (``default_scale_mm`` / ``_deg``);
  times a robust agreement weight (Cauchy, ``1 / (1 + (d/c_mm)^2 + (phi/c_deg)^2)`` on the
  translation residual d and rotation residual phi), iterated (IRLS);
* **mean**: translation = information-weighted mean; rotation = iterative weighted mean on SO(3)
  (Gauss-Newton on left residuals ``log(R_i R^T)`` in base-frame axes; the Euler uncertainty
  of (roll, pitch, yaw) is taken as a rotation about the probe's x, y, z axes, exact for small
  angles);
* **outliers**: once ``min_estimates`` are in, a new estimate farther from the fused target than
  ``max(gate_mm, gate_sigma * spread)`` (or the same in degrees) is rejected and counted;
* **resets** (the window is cleared and fusion restarts from the newest estimates): on a key
  change (the plane, or anything else that changes what is estimated), on a gap of more than
  ``max_gap_s`` between estimates (or time going backwards), when ``reset_after_outliers``
  consecutive estimates are rejected (they agree with each other but not with the fused target:
  the patient moved; the fusion restarts from those that agree with the newest), and on demand.

Spread: the weighted scatter of the estimates around the fused pose, as per-axis standard
deviations in base-frame axes (``std_mm``, ``std_deg``) and a 6x6 covariance in m and rad
(x, y, z, rotation about x, y, z; the layout of geometry_msgs/PoseWithCovariance). It is the
spread of the frames, not the (smaller) standard error of their mean: errors along one approach
are correlated, so sqrt(N) would be a promise the data do not keep. With fewer than
``min_estimates`` estimates the spread is infinite (not yet known).

Times are seconds on any clock (the image stamps); poses are 4x4 with translation in mm.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import numpy as np

from .pose import rotation_to_rotvec, rotvec_to_rotation

C = TypeVar("C")


@dataclass(frozen=True)
class FusionConfig:
    """Parameters of the fusion, with defaults tuned on the simulator. Units are in the names."""

    time_constant_s: float = 1.5        # recency: weight exp(-age / tau)
    window_s: float = 6.0               # estimates older than this (vs the newest) are dropped
    max_estimates: int = 200            # at most this many in the window
    max_gap_s: float = 1.0              # no estimate for longer -> reset
    min_estimates: int = 3              # before outlier gating and a finite spread
    robust_mm: float = 10.0             # Cauchy scale of the agreement weight (translation)
    robust_deg: float = 10.0            # Cauchy scale of the agreement weight (rotation)
    gate_mm: float = 20.0               # outlier gate floor (translation)
    gate_deg: float = 20.0              # outlier gate floor (rotation)
    gate_sigma: float = 4.0             # outlier gate in units of the current spread
    reset_after_outliers: int = 6       # consecutive rejections -> reset (the patient moved)
    default_scale_mm: float = 10.0      # uncertainty assumed without the model's action_scale
    default_scale_deg: float = 10.0
    irls_iterations: int = 3

    def validate(self) -> FusionConfig:
        """Raise ValueError naming the first bad field; return self."""
        check_positive_fields(self)
        for name in ("max_estimates", "min_estimates", "reset_after_outliers", "irls_iterations"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.min_estimates > self.max_estimates:
            raise ValueError("min_estimates must be <= max_estimates")
        return self

    def updated(self, **changes: object) -> FusionConfig:
        """A validated copy with ``changes`` applied (ValueError if invalid)."""
        return updated_config(self, "fusion", changes)


def check_positive_fields(config: object) -> None:
    """Raise ValueError naming the first field of the dataclass ``config`` that is not a finite number > 0."""
    for f in fields(config):
        v = getattr(config, f.name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{f.name} must be a finite number > 0, got {v!r}")


def updated_config(config: C, what: str, changes: dict[str, object]) -> C:
    """A copy of the frozen dataclass ``config`` with ``changes``, validated (``config.validate()``);
    ValueError naming unknown ``what`` parameters or the first bad value."""
    unknown = set(changes) - {f.name for f in fields(config)}
    if unknown:
        raise ValueError(f"unknown {what} parameters: {sorted(unknown)}")
    return replace(config, **changes).validate()


@dataclass(frozen=True)
class FusedTarget:
    """The fused target pose and its spread."""

    T_mm: np.ndarray          # (4, 4) base frame, translation in mm
    stamp_s: float            # stamp of the newest estimate in the window
    n: int                    # estimates in the window
    n_eff: float              # effective number (Kish) under the final weights
    std_mm: np.ndarray        # (3,) spread along the base x, y, z axes [mm] (inf until min_estimates)
    std_deg: np.ndarray       # (3,) spread of the rotation about the base x, y, z axes [deg]
    covariance: np.ndarray    # (6, 6) in m^2 / rad^2: x, y, z, rot x, rot y, rot z

    @property
    def spread_mm(self) -> float:
        """Total translation spread [mm]: sqrt of the trace of the translation covariance."""
        return float(np.sqrt(np.sum(self.std_mm ** 2)))

    @property
    def spread_deg(self) -> float:
        """Total rotation spread [deg]."""
        return float(np.sqrt(np.sum(self.std_deg ** 2)))

    @property
    def known(self) -> bool:
        """Whether the spread is known (enough estimates)."""
        return bool(np.all(np.isfinite(self.std_mm)) and np.all(np.isfinite(self.std_deg)))


@dataclass(frozen=True)
class FusionUpdate:
    """What :meth:`TargetFusion.add` did with one estimate."""

    accepted: bool
    reset: str | None              # why the fusion was reset before/with this estimate, else None
    fused: FusedTarget | None      # the fused target after the update
    residual_mm: float = 0.0       # the estimate vs the fused target before the update
    residual_deg: float = 0.0


@dataclass
class _Estimate:
    stamp_s: float
    T: np.ndarray
    info_t: np.ndarray   # (3, 3) base-frame information of the translation [1/mm^2]
    info_r: np.ndarray   # (3, 3) base-frame information of the rotation [1/deg^2]


@dataclass
class FusionCounters:
    """Monotonic counters for diagnostics."""

    estimates: int = 0
    accepted: int = 0
    outliers: int = 0
    resets: int = 0
    resets_key: int = 0
    resets_gap: int = 0
    resets_disagreement: int = 0
    resets_requested: int = 0


def pose_residual(T_a: np.ndarray, T_b: np.ndarray) -> tuple[float, float]:
    """Translation distance [mm] and rotation angle [deg] between two poses (base frame)."""
    d = float(np.linalg.norm(T_a[:3, 3] - T_b[:3, 3]))
    phi = float(np.degrees(np.linalg.norm(rotation_to_rotvec(T_a[:3, :3] @ T_b[:3, :3].T))))
    return d, phi


def _project_rotation(M: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(M)
    R = u @ vt
    if np.linalg.det(R) < 0:
        u[:, -1] *= -1
        R = u @ vt
    return R


class TargetFusion:
    """Robust, recency- and uncertainty-weighted fusion of target pose estimates (module docstring).

    Not thread-safe: callers serialise access (the guidance node holds a lock).
    """

    def __init__(self, config: FusionConfig | None = None) -> None:
        self.config = (config or FusionConfig()).validate()
        self.counters = FusionCounters()
        self._buf: deque[_Estimate] = deque()
        self._rejected: list[_Estimate] = []
        self._key: object = None
        self._fused: FusedTarget | None = None
        self.last_reset: str | None = None

    # ------------------------------------------------------------------ state
    @property
    def fused(self) -> FusedTarget | None:
        """The current fused target (None before the first estimate or after a reset)."""
        return self._fused

    @property
    def key(self) -> object:
        return self._key

    def configure(self, config: FusionConfig) -> None:
        self.config = config.validate()

    def reset(self, reason: str = "requested", key_change: bool = False) -> None:
        """Forget every estimate (e.g. the patient was repositioned); ``key_change``: counted as a
        change of what is estimated (a plane switch announced before its first frame)."""
        self._clear(reason)
        if key_change:
            self.counters.resets_key += 1
        else:
            self.counters.resets_requested += 1

    def _clear(self, reason: str) -> None:
        self._buf.clear()
        self._rejected = []
        self._fused = None
        self.counters.resets += 1
        self.last_reset = reason

    # ------------------------------------------------------------------ input
    def _estimate(self, stamp_s: float, T_probe: np.ndarray, action_T: np.ndarray,
                  scale: np.ndarray | None) -> _Estimate:
        cfg = self.config
        T = T_probe @ action_T
        if scale is None:
            b = np.array([cfg.default_scale_mm] * 3 + [cfg.default_scale_deg] * 3)
        else:
            b = np.asarray(scale, dtype=np.float64).reshape(-1)
            if b.shape != (6,):
                raise ValueError(f"action_scale must have 6 values, got shape {b.shape}")
            # a non-finite or non-positive scale says nothing: fall back to the default there
            default = np.array([cfg.default_scale_mm] * 3 + [cfg.default_scale_deg] * 3)
            b = np.where(np.isfinite(b) & (b > 0), b, default)
            b = np.maximum(b, 1e-3)
        Rp = T_probe[:3, :3]
        info_t = Rp @ np.diag(1.0 / b[:3] ** 2) @ Rp.T
        info_r = Rp @ np.diag(1.0 / b[3:] ** 2) @ Rp.T
        return _Estimate(float(stamp_s), T, info_t, info_r)

    def add(self, stamp_s: float, T_probe_mm: np.ndarray, action_T: np.ndarray,
            action_scale: np.ndarray | None = None, key: object = None) -> FusionUpdate:
        """Add the estimate ``T_probe_mm @ action_T`` (both 4x4, mm) taken at ``stamp_s``.

        ``action_T`` is U(a) for the frame's action a; ``action_scale`` its per-axis Laplace
        scale (mm, deg) or None; ``key`` identifies what is estimated (e.g. the plane): a
        different key than the previous estimate's resets the fusion.
        """
        cfg = self.config
        T_probe = np.asarray(T_probe_mm, dtype=np.float64)
        A = np.asarray(action_T, dtype=np.float64)
        if T_probe.shape != (4, 4) or A.shape != (4, 4) or not (np.all(np.isfinite(T_probe))
                                                              and np.all(np.isfinite(A))):
            raise ValueError("probe pose and action must be finite 4x4 matrices")
        if not math.isfinite(stamp_s):
            raise ValueError("stamp must be finite")
        est = self._estimate(stamp_s, T_probe, A, action_scale)
        self.counters.estimates += 1
        reset: str | None = None
        if key != self._key:
            if self._buf:
                reset = "key changed"
                self.counters.resets_key += 1
                self._clear(reset)
            self._key = key
        elif self._buf:
            newest = max(e.stamp_s for e in self._buf)
            gap = est.stamp_s - newest
            if gap > cfg.max_gap_s or gap < -cfg.window_s:
                reset = f"gap of {gap:.2f} s between estimates"
                self.counters.resets_gap += 1
                self._clear(reset)

        res_mm = res_deg = 0.0
        fused = self._fused
        if fused is not None and len(self._buf) >= cfg.min_estimates:
            res_mm, res_deg = pose_residual(est.T, fused.T_mm)
            gate_mm = max(cfg.gate_mm, cfg.gate_sigma * fused.spread_mm)
            gate_deg = max(cfg.gate_deg, cfg.gate_sigma * fused.spread_deg)
            if res_mm > gate_mm or res_deg > gate_deg:
                self.counters.outliers += 1
                self._rejected.append(est)
                if len(self._rejected) < cfg.reset_after_outliers:
                    return FusionUpdate(False, None, fused, res_mm, res_deg)
                # persistent disagreement: restart from the rejected ones that agree with the newest
                agreeing = [e for e in self._rejected
                            if all(a <= g for a, g in zip(pose_residual(e.T, est.T), (gate_mm, gate_deg), strict=True))]
                reset = f"{len(self._rejected)} consecutive estimates disagree with the fused target"
                self.counters.resets_disagreement += 1
                self._clear(reset)
                self._buf.extend(agreeing[:-1])
        self._rejected = []
        self._buf.append(est)
        self.counters.accepted += 1
        newest = max(e.stamp_s for e in self._buf)
        while self._buf and (len(self._buf) > cfg.max_estimates or newest - self._buf[0].stamp_s > cfg.window_s):
            self._buf.popleft()
        self._fused = self._fuse()
        return FusionUpdate(True, reset, self._fused, res_mm, res_deg)

    # ------------------------------------------------------------------ the mean
    def _fuse(self) -> FusedTarget:
        cfg = self.config
        buf = list(self._buf)
        n = len(buf)
        stamps = np.array([e.stamp_s for e in buf])
        newest = float(stamps.max())
        P = np.stack([e.T[:3, 3] for e in buf])
        Rs = np.stack([e.T[:3, :3] for e in buf])
        It = np.stack([e.info_t for e in buf])
        Ir = np.stack([e.info_r for e in buf])
        w_rec = np.exp(-np.clip(newest - stamps, 0.0, None) / cfg.time_constant_s)
        robust = np.ones(n)
        R_mean = _project_rotation(np.einsum("n,nij->ij", w_rec, Rs))
        t_mean = P[-1]
        for _ in range(int(cfg.irls_iterations)):
            w = w_rec * robust
            Wt = w[:, None, None] * It
            t_mean = np.linalg.solve(Wt.sum(0), np.einsum("nij,nj->i", Wt, P))
            Wr = w[:, None, None] * Ir
            Wr_sum = Wr.sum(0)
            for _gn in range(4):
                r = np.degrees(rotation_to_rotvec(Rs @ R_mean.T))   # (n, 3) deg, base axes
                delta = np.linalg.solve(Wr_sum, np.einsum("nij,nj->i", Wr, r))
                R_mean = rotvec_to_rotation(np.radians(delta)) @ R_mean
                if np.linalg.norm(delta) < 1e-6:
                    break
            d = np.linalg.norm(P - t_mean, axis=1)
            phi = np.degrees(np.linalg.norm(rotation_to_rotvec(Rs @ R_mean.T), axis=1))
            robust = 1.0 / (1.0 + (d / cfg.robust_mm) ** 2 + (phi / cfg.robust_deg) ** 2)
        w = w_rec * robust
        wn = w / w.sum()
        n_eff = float(w.sum() ** 2 / np.sum(w ** 2))
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R_mean, t_mean
        if n >= cfg.min_estimates:
            res = np.concatenate([(P - t_mean) / 1000.0, rotation_to_rotvec(Rs @ R_mean.T)], axis=1)
            cov = np.einsum("n,ni,nj->ij", wn, res, res) * (n / max(n - 1, 1))
            std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
            std_mm, std_deg = std[:3] * 1000.0, np.degrees(std[3:])
        else:
            cov = np.diag([np.inf] * 6)
            std_mm, std_deg = np.full(3, np.inf), np.full(3, np.inf)
        return FusedTarget(T, newest, n, n_eff, std_mm, std_deg, cov)


__all__ = ["FusedTarget", "FusionConfig", "FusionCounters", "FusionUpdate", "TargetFusion", "check_positive_fields",
           "pose_residual", "updated_config"]
