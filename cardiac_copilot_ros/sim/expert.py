"""Scripted sonographers: probe trajectories from a random start to a standard plane.

A demonstration starts at a random pose around the acoustic window: the target pose moved
by an offset ``o`` (pose = target @ U(o), mm / deg) drawn uniformly in
``+-max_offset_mm`` for x and y (lateral, elevation), ``+-max_offset_mm / 5`` for z (probe
pressure) and ``+-max_offset_deg`` for roll, pitch and yaw. The expert then moves like a
person does (docs/SIMULATOR.md):

1. a short look at the start image (pause);
2. coarse move: translation to near the window with an overshoot, part of the rotation;
3. translation correction, pause;
4. a search sweep: tilting back and forth about one axis, then settling;
5. two to four fine rotation tweaks (some overshoot), each followed by a pause;
6. a final approach to the target and a hold on it. The "target reached" annotation comes a
   short reaction time after the hold starts; the hold continues to the end of the scan.

Every segment follows a minimum-jerk profile; physiological tremor (8-12 Hz, ~0.15 mm /
0.15 deg) and a slow drift (0.2-0.8 Hz, ~0.6 mm / 0.6 deg, a third of that in the hold) are
added on top. Segment durations are scaled to the requested scan length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..planes import Plane, parse_plane
from ..pose import action_to_matrix
from .phantom import Subject

#: Default limits of the random start offset (mm, deg).
MAX_OFFSET_MM = 40.0
MAX_OFFSET_DEG = 40.0


@dataclass
class Demonstration:
    """A probe trajectory sampled at the pose rate, in the base frame (mm)."""

    subject_id: str
    plane: str                 #: canonical plane name
    target_pose: np.ndarray    #: (4, 4) true target pose
    start_offset: np.ndarray   #: (6,) offset of the start pose from the target (mm, deg)
    pose_rate_hz: float
    t_s: np.ndarray            #: (N,) sample times from 0
    offsets: np.ndarray        #: (N, 6) pose = target @ U(offset)
    reach_time_s: float        #: annotation time (the expert confirms the plane)
    hold_start_s: float        #: time the probe arrives at the target

    @property
    def poses(self) -> np.ndarray:
        """(N, 4, 4) probe poses at the pose rate."""
        return self.target_pose @ action_to_matrix(self.offsets)

    @property
    def duration_s(self) -> float:
        return float(self.t_s[-1])

    def offset_at(self, t_s: float | np.ndarray) -> np.ndarray:
        """Offsets (mm, deg) at arbitrary times (linear between pose samples, clamped)."""
        t = np.asarray(t_s, dtype=np.float64)
        out = np.stack([np.interp(t, self.t_s, self.offsets[:, k]) for k in range(6)], axis=-1)
        return out

    def pose_at(self, t_s: float | np.ndarray) -> np.ndarray:
        """Probe pose(s) (..., 4, 4) at arbitrary times."""
        return self.target_pose @ action_to_matrix(self.offset_at(t_s))


def _min_jerk(tau: np.ndarray) -> np.ndarray:
    return tau ** 3 * (10.0 - 15.0 * tau + 6.0 * tau * tau)


def _rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(np.random.SeedSequence([0xE4BE, int(rng_or_seed)]))


def random_start_offset(rng: np.random.Generator, max_offset_mm: float = MAX_OFFSET_MM,
                        max_offset_deg: float = MAX_OFFSET_DEG) -> np.ndarray:
    """A random start offset (mm, deg) within the documented limits."""
    lim = np.array([max_offset_mm, max_offset_mm, max_offset_mm / 5.0,
                    max_offset_deg, max_offset_deg, max_offset_deg])
    return rng.uniform(-1.0, 1.0, 6) * lim


def _waypoints(rng: np.random.Generator, o0: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
    """(offset, move weight, pause weight after) for each segment, in seconds at 'natural' pace."""
    t0, r0 = o0[:3], o0[3:]
    wps: list[tuple[np.ndarray, float, float]] = []
    # coarse translation with overshoot, part of the rotation
    over = rng.uniform(0.08, 0.25)
    o1 = np.concatenate([-over * t0 + rng.normal(0, 1.5, 3), r0 * rng.uniform(0.45, 0.8, 3)])
    wps.append((o1, 2.5 + np.linalg.norm(t0) / 25.0, rng.uniform(0.2, 0.6)))
    # translation correction
    o2 = np.concatenate([rng.normal(0, 1.2, 3), o1[3:]])
    wps.append((o2, 1.2, rng.uniform(0.3, 0.8)))
    # search sweep about one rotation axis, then settle with less rotation error
    axis = 3 + int(rng.integers(0, 3))
    amp = rng.uniform(7.0, 14.0)
    for sign in (1.0, -1.0):
        o = o2.copy()
        o[axis] += sign * amp
        wps.append((o, 0.9, rng.uniform(0.05, 0.2)))
    o3 = np.concatenate([o2[:3] * 0.7, o2[3:] * rng.uniform(0.25, 0.5, 3)])
    wps.append((o3, 0.9, rng.uniform(0.3, 0.7)))
    # fine tweaks: rotation first, small translation touch-ups, sometimes overshooting
    o = o3
    for _ in range(int(rng.integers(2, 5))):
        o = np.concatenate([o[:3] * rng.uniform(0.2, 0.6) + rng.normal(0, 0.3, 3),
                            o[3:] * rng.uniform(-0.3, 0.45, 3)])
        wps.append((o, 0.7, rng.uniform(0.2, 0.6)))
    # final approach
    wps.append((np.zeros(6), 0.8, 0.0))
    return wps


class _Tremor:
    """Band-limited hand tremor and drift as sums of sinusoids (deterministic per rng)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.f_t = rng.uniform(8.0, 12.0, (3, 6))
        self.p_t = rng.uniform(0, 2 * np.pi, (3, 6))
        self.a_t = np.array([0.15, 0.15, 0.05, 0.15, 0.15, 0.15]) / np.sqrt(3) * rng.uniform(0.6, 1.4)
        self.f_d = rng.uniform(0.2, 0.8, (3, 6))
        self.p_d = rng.uniform(0, 2 * np.pi, (3, 6))
        self.a_d = np.array([0.6, 0.6, 0.2, 0.6, 0.6, 0.6]) / np.sqrt(3) * rng.uniform(0.6, 1.4)

    def __call__(self, t: np.ndarray, drift_scale: np.ndarray) -> np.ndarray:
        tt = t[:, None, None]
        trem = np.sin(2 * np.pi * self.f_t * tt + self.p_t).sum(axis=1) * self.a_t
        drift = np.sin(2 * np.pi * self.f_d * tt + self.p_d).sum(axis=1) * self.a_d
        return trem + drift * drift_scale[:, None]


def demonstration(subject: Subject, plane: str | int | Plane, rng_or_seed: np.random.Generator | int,
                  duration_s: float = 50.0, pose_rate_hz: float = 250.0,
                  max_offset_mm: float = MAX_OFFSET_MM, max_offset_deg: float = MAX_OFFSET_DEG,
                  start_offset: np.ndarray | None = None) -> Demonstration:
    """One scripted expert scan of ``plane`` on ``subject``.

    Args:
        rng_or_seed: a numpy Generator or an int seed (same seed -> same trajectory).
        duration_s: scan length; the hold on the target fills the last ~10% (0.6-4 s).
        pose_rate_hz: sample rate of the returned trajectory.
        start_offset: fixed start offset (mm, deg) instead of a random one.
    """
    if duration_s < 0.5:
        raise ValueError(f"duration_s must be >= 0.5 s, got {duration_s}")
    if not 1.0 <= pose_rate_hz <= 10000.0:
        raise ValueError(f"pose_rate_hz must be in [1, 10000], got {pose_rate_hz}")
    rng = _rng(rng_or_seed)
    name = parse_plane(plane).name
    o0 = (np.asarray(start_offset, dtype=np.float64) if start_offset is not None
          else random_start_offset(rng, max_offset_mm, max_offset_deg))
    if o0.shape != (6,):
        raise ValueError("start_offset must have 6 values (mm, deg)")
    wps = _waypoints(rng, o0)
    lead = rng.uniform(0.3, 1.0)
    hold = float(min(np.clip(0.1 * duration_s, 0.6, 4.0), 0.3 * duration_s))
    natural = lead + sum(m + p for _, m, p in wps)
    scale = (duration_s - hold) / natural

    n = int(np.floor(duration_s * pose_rate_hz)) + 1
    t = np.arange(n) / pose_rate_hz
    offsets = np.empty((n, 6))
    offsets[:] = o0
    cur, tc = o0, lead * scale
    for target, move, pause in wps:
        t_end = tc + move * scale
        sel = t >= tc
        tau = np.clip((t[sel] - tc) / (t_end - tc), 0.0, 1.0)
        offsets[sel] = cur + (target - cur) * _min_jerk(tau)[:, None]
        cur, tc = target, t_end + pause * scale
    hold_start = tc
    reach = min(hold_start + min(0.3, hold / 3.0), duration_s)
    drift_scale = np.where(t >= hold_start, 0.3, 1.0)
    offsets = offsets + _Tremor(rng)(t, drift_scale)
    return Demonstration(subject_id=subject.subject_id, plane=name,
                         target_pose=subject.target_pose(name), start_offset=o0,
                         pose_rate_hz=float(pose_rate_hz), t_s=t, offsets=offsets,
                         reach_time_s=float(reach), hold_start_s=float(hold_start))
