"""Servo control law: guidance -> safe probe velocity commands (rclpy-free).

The guidance (DESIGN.md) is the target pose in the current probe frame as a twist that
reaches it in one second, first order: ``linear`` = target position [m], ``angular`` =
rotation vector to the target orientation [rad]. :class:`ServoController` turns it into
velocity commands in the probe frame (m/s, rad/s, MoveIt Servo's ``speed_units``):

``command = rate_limit(clamp(gain * lowpass(guidance)))``

* first-order low-pass on the guidance (time constant ``filter_tau_s``);
* gains [1/s], then the magnitudes of the linear and angular vectors are clamped to the speed
  limits (the vector is scaled, its direction kept);
* the change between consecutive commands is bounded by the acceleration limits times the
  control period: the output never steps while enabled (a disable or a fault may, see
  ``stop_mode``);
* watchdogs and gates, each a :class:`ServoConfig` field: guidance timeout and stamp age,
  non-finite input, probe pose watchdog, workspace limit around the pose at enable time,
  convergence ("plane reached") with hysteresis, and a confidence gate on guidance jumps.

"Plane reached" is honest: the low-passed guidance within tolerance for ``converge_hold_s``
**and** the guidance stable over that hold: the spread (standard deviation, all axes together)
of the raw guidance samples of the last ``converge_hold_s`` below ``converge_spread_linear_m`` /
``converge_spread_angular_rad`` (a low-passed value can sit at zero while the raw guidance
alternates +-7 mm), **and**, where the guidance node publishes it (:meth:`set_target_spread`,
from ``target_pose_cov``), the fused target's spread below ``converge_target_spread_m`` /
``_rad``. Otherwise the servo keeps following the guidance and says why in ``reason``.

Optional final-approach check (``verify_step_m`` > 0, off by default): a model that is
consistently wrong is stable at its fixed point, so before the first "plane reached" the servo
moves the probe ``verify_step_m`` sideways (probe x), lets it settle and compares the target
pose the guidance implies there (probe pose x U(guidance), base frame) with the one before the
step. A guidance that describes a target standing still gives the same target; one that moves
with the probe (a fixed point of the model) does not: then no "plane reached" (at most
``verify_attempts`` tries per enable), and the reason says by how much it moved.

Optional final-approach survey (``survey_poses`` > 0, off by default; it replaces the check): a model
whose fixed point has a local bias is caught by neither test. At the first convergence the servo visits
``survey_poses`` poses around the resting pose (:func:`..final_approach.survey_offsets`: +-``survey_step_m``
along probe x and y, a third of it along z, +-``survey_step_rad`` about each axis, every axis on both
sides equally often), holds each for ``survey_settle_s``, reads the target the guidance implies there for
``survey_read_s``, then servoes the probe (pose control, gain ``survey_gain``) to the robust mean of those
targets and holds it. "Plane reached" there if the per-pose targets scatter less than
``survey_tolerance_m`` / ``_rad``; otherwise a new survey around the mean (``survey_attempts`` per
enable), then it holds the mean without reporting reached; with ``survey_pool`` a repeated survey's mean
and scatter are taken over the estimates of all the surveys so far (a second survey judges 8 estimates, not
a fresh draw of 4). Which scatter decides is ``survey_gate``:
``guidance`` (the targets the guidance implies; with the guidance node's fusion they remember the poses
before, so they agree even where the model is wrong) or ``frame_target`` (the guidance node's per-frame
target estimates before fusion, :meth:`set_frame_target`, topic ``frame_target_pose``: noisier, but
their disagreement says where the model is wrong; validation subjects, session 7: AUC 0.80 against 0.63
for telling a surveyed target beyond 5 mm / 5 deg from one within). The guidance's target moving more than
``survey_release_m`` / ``_rad`` from the held one (the patient moved, the plane changed), a guidance
timeout or a confidence-gate pause ends the hold: the servo follows the guidance again.

Everything is driven by explicit times (seconds on any monotonic clock, e.g. the node's ROS
clock), so the same object runs inside the ROS node, in tests and in a closed-loop benchmark:
``controller.step(now_s, guidance, probe_pose)`` returns the :class:`ServoCommand` to publish.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum

import numpy as np

from .final_approach import SURVEY_READS, SURVEY_SIZES, SurveyTarget, survey_offsets, survey_target
from .pose import action_to_matrix, rotation_to_rotvec, rotvec_to_rotation

STOP_MODES = ("immediate", "ramp")
#: ``reason`` while the servo holds at a surveyed target whose survey failed (an honest "not reached").
HELD_NOT_REACHED = "holding at the surveyed target, not reached"
#: Per-frame target estimates kept for the final-approach survey (about 10 s at 30 Hz).
FRAME_TARGET_BUFFER = 300
#: A survey pose waits at most this much longer [s] for a per-frame target estimate (survey_gate frame_target).
FRAME_TARGET_WAIT_S = 1.0

#: Guidance beyond these magnitudes is implausible for a hand-held probe and is rejected.
MAX_PLAUSIBLE_LINEAR_M = 1.0
MAX_PLAUSIBLE_ANGULAR_RAD = 2.0 * math.pi


class ServoState(str, Enum):
    """What the servo is doing; ``value`` is the text on the status topic."""

    DISABLED = "disabled"      # not enabled (start, or disabled through ~/enable)
    ACTIVE = "active"          # moving along the guidance
    CONVERGED = "converged"    # plane reached: holding still
    PAUSED = "paused"          # confidence gate closed: guidance jumped, waiting for it to settle
    TIMEOUT = "timeout"        # no fresh guidance: ramping to / holding zero
    WORKSPACE = "workspace"    # left the workspace around the enable pose: stopped, re-enable needed
    FAULT = "fault"            # pose watchdog or a non-finite output: stopped, re-enable needed


#: States in which the servo is stopped until it is enabled again.
LATCHED_STATES = (ServoState.DISABLED, ServoState.WORKSPACE, ServoState.FAULT)


@dataclass(frozen=True)
class ServoConfig:
    """Parameters of the control law, with safe defaults. Units are in the names."""

    gain_linear: float = 1.0             # [1/s] linear command = gain * target position
    gain_angular: float = 1.0            # [1/s] angular command = gain * rotation vector
    max_linear_speed_mps: float = 0.02
    max_angular_speed_rps: float = 0.2
    max_linear_accel_mps2: float = 0.05
    max_angular_accel_rps2: float = 0.5
    control_rate_hz: float = 100.0
    filter_tau_s: float = 0.2            # 0 = no filter
    guidance_timeout_s: float = 0.5      # by receipt time
    max_guidance_age_s: float = 0.5      # header stamp vs now; 0 = no check
    stop_mode: str = "immediate"         # on disable and faults: "immediate" zero or "ramp"
    max_travel_m: float = 0.05           # workspace: sphere around the enable position
    max_rotation_rad: float = 0.5236     # workspace: geodesic angle from the enable orientation
    require_probe_pose: bool = True
    probe_pose_timeout_s: float = 0.5
    converge_linear_m: float = 0.003
    converge_angular_rad: float = 0.05
    converge_hold_s: float = 1.0
    converge_release_factor: float = 2.0  # leave "converged" beyond factor * tolerance
    converge_latch: bool = False          # True: stay converged until re-enabled
    gate_jump_linear_m: float = 0.015     # 0 = gate off (linear)
    gate_jump_angular_rad: float = 0.26   # 0 = gate off (angular)
    gate_settle_frames: int = 5
    converge_spread_linear_m: float = 0.003   # raw guidance spread over the hold [m]; 0 = no check
    converge_spread_angular_rad: float = 0.05  # raw guidance spread over the hold [rad]; 0 = no check
    converge_min_samples: int = 5             # raw guidance samples needed in the hold window
    converge_target_spread_m: float = 0.005   # fused target spread (when published) [m]; 0 = no check
    converge_target_spread_rad: float = 0.0873  # fused target spread (when published) [rad]; 0 = no check
    verify_step_m: float = 0.0            # final-approach check: sideways step [m]; 0 = off
    verify_tolerance_m: float = 0.004     # the implied target may move this much [m] ...
    verify_tolerance_rad: float = 0.07    # ... and this much [rad] over the step
    verify_settle_s: float = 0.5          # still after the step before the guidance is read [s]
    verify_attempts: int = 2              # failed checks per enable before giving up ("not reached")
    survey_poses: int = 0                 # final-approach survey: poses read around the resting pose; 0 = off
    survey_step_m: float = 0.006          # survey offsets: +- this on probe x and y (z: a third) ...
    survey_step_rad: float = 0.105        # ... and +- this (6 deg) about each probe axis
    survey_settle_s: float = 0.3          # still at each survey pose before the guidance is read [s] ...
    survey_read_s: float = 0.3            # ... and read for this long [s]
    survey_gain: float = 2.0              # [1/s] gain of the moves between survey poses and to the surveyed target
    survey_arrive_m: float = 0.001        # a survey pose counts as reached within this [m] ...
    survey_arrive_rad: float = 0.02       # ... and this [rad] (the read uses the pose actually reached)
    survey_tolerance_m: float = 0.003     # "plane reached" only if the surveyed estimates scatter less than this ...
    survey_tolerance_rad: float = 0.052   # ... (root mean square about their robust mean; 3 deg)
    survey_gate: str = "guidance"         # whose scatter that is: "guidance" or "frame_target" (SURVEY_READS)
    survey_attempts: int = 1              # surveys per enable (each around the last surveyed target)
    survey_pool: bool = False             # a repeated survey is judged, and its target taken, over the estimates
    #                                       of all the surveys since convergence (4 + 4 ...), not its own only
    survey_reached_m: float = 0.0         # "plane reached" after a passed survey once the probe is within this [m] of
    survey_reached_rad: float = 0.0       # the surveyed target and this [rad]; 0 = converge_linear_m / _angular_rad
    survey_release_m: float = 0.01        # holding at the surveyed target ends when the guidance's target ...
    survey_release_rad: float = 0.17      # ... lies this far from it (the patient or the plane moved)

    @property
    def control_period_s(self) -> float:
        return 1.0 / self.control_rate_hz

    def validate(self) -> ServoConfig:
        """Raise ValueError naming the first bad field; return self."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, bool) != isinstance(value, bool):
                raise ValueError(f"{f.name} must be {'true or false' if isinstance(f.default, bool) else 'a number'}, "
                                 f"got {value!r}")
            if isinstance(value, bool) or f.name in ("stop_mode", "survey_gate"):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value!r}")
        positive = ("max_linear_speed_mps", "max_angular_speed_rps", "max_linear_accel_mps2",
                    "max_angular_accel_rps2", "control_rate_hz", "guidance_timeout_s",
                    "probe_pose_timeout_s", "max_travel_m", "max_rotation_rad")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.control_rate_hz > 1000:
            raise ValueError(f"control_rate_hz must be <= 1000, got {self.control_rate_hz!r}")
        if self.converge_release_factor < 1.0:
            raise ValueError(f"converge_release_factor must be >= 1, got {self.converge_release_factor!r}")
        if self.gate_settle_frames < 1 or int(self.gate_settle_frames) != self.gate_settle_frames:
            raise ValueError(f"gate_settle_frames must be an integer >= 1, got {self.gate_settle_frames!r}")
        if self.verify_attempts < 1 or int(self.verify_attempts) != self.verify_attempts:
            raise ValueError(f"verify_attempts must be an integer >= 1, got {self.verify_attempts!r}")
        if self.converge_min_samples < 2 or int(self.converge_min_samples) != self.converge_min_samples:
            raise ValueError(f"converge_min_samples must be an integer >= 2, got {self.converge_min_samples!r}")
        for name in ("survey_attempts", "survey_poses"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.survey_poses and self.survey_poses not in SURVEY_SIZES:
            raise ValueError(f"survey_poses must be 0 (off) or one of {SURVEY_SIZES}, got {self.survey_poses!r}")
        if self.survey_poses and min(self.survey_step_m, self.survey_step_rad, self.survey_gain,
                                     self.survey_read_s, self.survey_attempts, self.survey_arrive_m,
                                     self.survey_arrive_rad) <= 0:
            raise ValueError("with survey_poses > 0, survey_step_m, survey_step_rad, survey_gain, survey_read_s, "
                             "survey_attempts, survey_arrive_m and survey_arrive_rad must be > 0")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {self.stop_mode!r}")
        if self.survey_gate not in SURVEY_READS:
            raise ValueError(f"survey_gate must be one of {SURVEY_READS}, got {self.survey_gate!r}")
        return self

    def updated(self, **changes: object) -> ServoConfig:
        """A validated copy with ``changes`` applied (ValueError if invalid)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown servo parameters: {sorted(unknown)}")
        return replace(self, **changes).validate()


@dataclass(frozen=True)
class Guidance:
    """One guidance sample: target position [m] and rotation vector [rad] in the probe frame."""

    linear_m: np.ndarray
    angular_rad: np.ndarray
    stamp_s: float  # header stamp (acquisition time of the image), same clock as ``now_s``


@dataclass(frozen=True)
class ProbePose:
    """Probe pose in the base frame: 4x4 matrix with translation in mm (package convention)."""

    T_mm: np.ndarray
    stamp_s: float = float("nan")


@dataclass(frozen=True)
class ServoCommand:
    """What to publish now (``publish`` False: publish nothing) and why."""

    linear_mps: np.ndarray
    angular_rps: np.ndarray
    publish: bool
    state: ServoState
    reason: str
    events: tuple[str, ...] = ()  # "plane_reached", "plane_left"

    @property
    def is_zero(self) -> bool:
        return not (np.any(self.linear_mps) or np.any(self.angular_rps))


@dataclass
class ServoCounters:
    """Monotonic counters for diagnostics."""

    guidance_accepted: int = 0
    rejected_nonfinite: int = 0
    rejected_stale: int = 0
    rejected_other: int = 0
    poses_rejected: int = 0
    gate_pauses: int = 0
    timeouts: int = 0
    workspace_stops: int = 0
    faults: int = 0
    converged: int = 0
    unstable_holds: int = 0   # within tolerance for the hold time, but the guidance was not stable
    verify_passed: int = 0    # final-approach checks: the implied target stood still
    verify_failed: int = 0    # ... it moved with the probe (or the probe could not move)
    surveys_passed: int = 0   # final-approach surveys whose estimates agreed ("plane reached" at their mean)
    surveys_failed: int = 0   # ... whose estimates scattered beyond the tolerance
    frame_targets: int = 0    # per-frame target estimates taken (frame_target_pose; survey_gate frame_target)
    output_nonfinite: int = 0
    commands: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _norm(v: np.ndarray) -> float:
    return float(np.linalg.norm(v))


def clamp_norm(v: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale ``v`` down so that its norm is at most ``max_norm`` (direction kept)."""
    n = _norm(v)
    if n > max_norm > 0:
        return v * (max_norm / n)
    if max_norm <= 0:
        return np.zeros_like(v)
    return v


def rate_limit(previous: np.ndarray, target: np.ndarray, max_delta: float) -> np.ndarray:
    """Move from ``previous`` towards ``target`` by at most ``max_delta`` (vector norm)."""
    return previous + clamp_norm(target - previous, max_delta)


def lowpass_alpha(dt_s: float, tau_s: float) -> float:
    """Weight of the new sample in a first-order low-pass (exact discretisation)."""
    if tau_s <= 0:
        return 1.0
    return 1.0 - math.exp(-max(dt_s, 0.0) / tau_s)


def _pose_diff(T_a: np.ndarray, T_b: np.ndarray) -> tuple[float, float]:
    """Translation [mm] and rotation angle [rad] between two base-frame poses."""
    return (float(np.linalg.norm(T_a[:3, 3] - T_b[:3, 3])),
            _norm(rotation_to_rotvec(T_a[:3, :3] @ T_b[:3, :3].T)))


def _vec3(v: object) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64).reshape(-1)
    if arr.shape != (3,):
        raise ValueError(f"expected a 3-vector, got shape {arr.shape}")
    return arr


class ServoController:
    """The closed-loop servo law with its safety state machine (see the module docstring).

    Feed it with :meth:`set_guidance` / :meth:`set_probe_pose` as samples arrive (or pass them
    to :meth:`step`), switch it with :meth:`enable` / :meth:`disable`, and call :meth:`step` at
    the control rate. Not thread-safe: the node serialises calls with a lock.
    """

    def __init__(self, config: ServoConfig | None = None) -> None:
        self.config = (config or ServoConfig()).validate()
        self.counters = ServoCounters()
        self.state = ServoState.DISABLED
        self.reason = "not enabled (call ~/enable)"
        self._enabled = False
        self._ramping_down = False           # disabled/latched but still ramping (stop_mode ramp)
        self._cmd_lin = np.zeros(3)
        self._cmd_ang = np.zeros(3)
        self._last_step_s: float | None = None
        # guidance
        self._g_lin: np.ndarray | None = None
        self._g_ang: np.ndarray | None = None
        self._g_recv_s = -math.inf
        self._filt_lin: np.ndarray | None = None
        self._filt_ang: np.ndarray | None = None
        self._gate_open = True
        self._gate_consistent = 0
        self._timed_out = True
        # convergence
        self._within_since_s: float | None = None
        self._converged = False
        self._history: deque[tuple[float, np.ndarray, np.ndarray]] = deque()  # raw guidance (recv s, lin, ang)
        self._target_spread: tuple[float, float, float] | None = None  # (recv s, m, rad)
        self._frame_targets: deque[tuple[float, np.ndarray]] = deque(maxlen=FRAME_TARGET_BUFFER)  # (recv s, T mm)
        self.guidance_spread: tuple[float, float] | None = None  # last computed (m, rad)
        self._unstable_counted = False
        self._verify: dict | None = None          # final-approach check in progress
        self._verified_T: np.ndarray | None = None  # implied target that passed the check
        self._verify_failures = 0
        self.verify_result = ""
        self._survey: dict | None = None          # final-approach survey in progress or its result held
        self._survey_failures = 0
        self.survey_result = ""
        # pose
        self._pose_T: np.ndarray | None = None
        self._pose_recv_s = -math.inf
        self._anchor_T: np.ndarray | None = None
        self.travel_m = 0.0
        self.rotation_rad = 0.0

    # ------------------------------------------------------------------ configuration
    def configure(self, config: ServoConfig) -> None:
        """Swap in a new (validated) configuration; state is kept."""
        self.config = config.validate()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def command(self) -> tuple[np.ndarray, np.ndarray]:
        """The last command (linear m/s, angular rad/s)."""
        return self._cmd_lin.copy(), self._cmd_ang.copy()

    @property
    def filtered_guidance(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._filt_lin is None or self._filt_ang is None:
            return None
        return self._filt_lin.copy(), self._filt_ang.copy()

    # ------------------------------------------------------------------ inputs
    def set_guidance(self, now_s: float, guidance: Guidance) -> bool:
        """Take a guidance sample received at ``now_s``; returns False if it was rejected."""
        try:
            lin = _vec3(guidance.linear_m)
            ang = _vec3(guidance.angular_rad)
        except ValueError:
            self.counters.rejected_other += 1
            return False
        if not (np.all(np.isfinite(lin)) and np.all(np.isfinite(ang))):
            self.counters.rejected_nonfinite += 1
            return False
        # element bound first, so that the norm cannot overflow
        if not (np.max(np.abs(lin)) <= MAX_PLAUSIBLE_LINEAR_M and np.max(np.abs(ang)) <= MAX_PLAUSIBLE_ANGULAR_RAD
                and _norm(lin) <= MAX_PLAUSIBLE_LINEAR_M and _norm(ang) <= MAX_PLAUSIBLE_ANGULAR_RAD):
            self.counters.rejected_other += 1
            return False
        cfg = self.config
        if cfg.max_guidance_age_s > 0:
            age = now_s - float(guidance.stamp_s)
            if not math.isfinite(age) or abs(age) > cfg.max_guidance_age_s:
                self.counters.rejected_stale += 1
                return False
        recent = self._g_lin is not None and now_s - self._g_recv_s <= cfg.guidance_timeout_s
        if recent and self._g_lin is not None and self._g_ang is not None:
            jump = ((cfg.gate_jump_linear_m > 0 and _norm(lin - self._g_lin) > cfg.gate_jump_linear_m)
                    or (cfg.gate_jump_angular_rad > 0
                        and _norm(ang - self._g_ang) > cfg.gate_jump_angular_rad))
            if jump:
                if self._gate_open:
                    self.counters.gate_pauses += 1
                self._gate_open = False
                self._gate_consistent = 0
            elif not self._gate_open:
                self._gate_consistent += 1
                if self._gate_consistent >= cfg.gate_settle_frames:
                    self._gate_open = True
                    self._filt_lin = None  # restart the filter from the settled guidance
                    self._filt_ang = None
        self._g_lin, self._g_ang, self._g_recv_s = lin, ang, float(now_s)
        self._history.append((float(now_s), lin, ang))
        self._prune_history(now_s)
        self.counters.guidance_accepted += 1
        return True

    def set_target_spread(self, now_s: float, linear_m: float, angular_rad: float) -> None:
        """The fused target's spread (total standard deviation: m, rad), e.g. from ``target_pose_cov``;
        non-finite = not known. Used for "plane reached" while fresher than ``guidance_timeout_s``."""
        self._target_spread = (float(now_s), float(linear_m), float(angular_rad))

    def set_frame_target(self, now_s: float, T_mm: np.ndarray) -> bool:
        """One frame's own target estimate (base frame, 4x4, translation in mm; guidance_node's
        ``frame_target_pose``), received at ``now_s``: read by the final-approach survey when
        ``survey_gate`` is ``frame_target``. False (and counted) if it is not a finite rigid pose."""
        T = np.asarray(T_mm, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)) or \
                not np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-3) or \
                np.max(np.abs(T[:3, 3])) > 1e6:
            self.counters.rejected_other += 1
            return False
        self._frame_targets.append((float(now_s), T.copy()))
        self.counters.frame_targets += 1
        return True

    def _prune_history(self, now_s: float) -> None:
        horizon = max(self.config.converge_hold_s, 0.05)
        while self._history and (now_s - self._history[0][0] > horizon or len(self._history) > 10000):
            self._history.popleft()

    def _stability(self, now_s: float) -> str:
        """Empty when the guidance is stable enough for "plane reached", else why not."""
        cfg = self.config
        self._prune_history(now_s)
        why = []
        n = len(self._history)
        if n < cfg.converge_min_samples:
            self.guidance_spread = None
            why.append(f"{n} guidance samples in the last {cfg.converge_hold_s:g} s "
                       f"(need {cfg.converge_min_samples})")
        else:
            lin = np.stack([h[1] for h in self._history])
            ang = np.stack([h[2] for h in self._history])
            s_lin = float(np.sqrt(np.sum(np.var(lin, axis=0))))
            s_ang = float(np.sqrt(np.sum(np.var(ang, axis=0))))
            self.guidance_spread = (s_lin, s_ang)
            if (cfg.converge_spread_linear_m > 0 and s_lin > cfg.converge_spread_linear_m) or \
                    (cfg.converge_spread_angular_rad > 0 and s_ang > cfg.converge_spread_angular_rad):
                why.append(f"guidance not stable: spread {s_lin * 1000:.1f} mm / {math.degrees(s_ang):.1f} deg "
                           f"(tolerance {cfg.converge_spread_linear_m * 1000:.1f} mm / "
                           f"{math.degrees(cfg.converge_spread_angular_rad):.1f} deg)")
        ts = self._target_spread
        if ts is not None and now_s - ts[0] <= cfg.guidance_timeout_s:
            t_lin, t_ang = ts[1], ts[2]
            if not (math.isfinite(t_lin) and math.isfinite(t_ang)):
                why.append("fused target spread not known yet")
            elif (cfg.converge_target_spread_m > 0 and t_lin > cfg.converge_target_spread_m) or \
                    (cfg.converge_target_spread_rad > 0 and t_ang > cfg.converge_target_spread_rad):
                why.append(f"fused target not stable: spread {t_lin * 1000:.1f} mm / {math.degrees(t_ang):.1f} deg "
                           f"(tolerance {cfg.converge_target_spread_m * 1000:.1f} mm / "
                           f"{math.degrees(cfg.converge_target_spread_rad):.1f} deg)")
        return "; ".join(why)

    def set_probe_pose(self, now_s: float, pose: ProbePose) -> bool:
        """Take a probe pose received at ``now_s``; returns False if it was rejected."""
        T = np.asarray(pose.T_mm, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            self.counters.poses_rejected += 1
            return False
        self._pose_T, self._pose_recv_s = T, float(now_s)
        return True

    # ------------------------------------------------------------------ switching
    def enable(self, now_s: float) -> tuple[bool, str]:
        """Enable: anchor the workspace at the current pose. Returns (ok, message).

        Only a real disabled -> enabled transition (from ``disabled``, ``workspace`` or ``fault``)
        anchors the workspace limit. Enabling while already enabled keeps the anchor and the
        state (a client that re-asserts ``enable`` must not move the limit with the probe); it
        only releases a ``converge_latch`` hold, as the operator's "resume".
        """
        cfg = self.config
        if self._enabled:
            if self._converged and cfg.converge_latch:
                self._converged, self._within_since_s = False, None
                return True, "already enabled: convergence latch released (workspace anchor kept)"
            return True, "already enabled (workspace anchor kept)"
        if cfg.require_probe_pose and not self._pose_fresh(now_s):
            return False, "no fresh probe pose: cannot anchor the workspace limit"
        self._anchor_T = None if self._pose_T is None else self._pose_T.copy()
        self.travel_m = self.rotation_rad = 0.0
        self._enabled = True
        self._ramping_down = False
        self._filt_lin = self._filt_ang = None
        self._gate_open, self._gate_consistent = True, 0
        self._within_since_s, self._converged = None, False
        self._history.clear()
        self._verify, self._verified_T, self._verify_failures, self.verify_result = None, None, 0, ""
        self._survey, self._survey_failures, self.survey_result = None, 0, ""
        self._timed_out = True
        self._set_state(ServoState.TIMEOUT, "enabled, waiting for fresh guidance")
        return True, "enabled"

    def disable(self, now_s: float, reason: str = "disabled by ~/enable") -> ServoCommand | None:
        """Disable. Returns the zero command to publish at once (stop_mode immediate), else None."""
        return self._stop(now_s, ServoState.DISABLED, reason)

    def shutdown_command(self) -> ServoCommand:
        """The zero twist to publish on shutdown (always immediate)."""
        self._enabled = False
        self._ramping_down = False
        self._cmd_lin, self._cmd_ang = np.zeros(3), np.zeros(3)
        self._set_state(ServoState.DISABLED, "shutdown")
        return self._command(True)

    def _stop(self, now_s: float, state: ServoState, reason: str) -> ServoCommand | None:
        was_moving = self._enabled or self._ramping_down
        self._enabled = False
        self._converged = False
        self._set_state(state, reason)
        if not was_moving:
            return None
        if self.config.stop_mode == "ramp" and (np.any(self._cmd_lin) or np.any(self._cmd_ang)):
            self._ramping_down = True
            return None
        self._ramping_down = False
        self._cmd_lin, self._cmd_ang = np.zeros(3), np.zeros(3)
        return self._command(True)

    # ------------------------------------------------------------------ the loop
    def step(self, now_s: float, guidance: Guidance | None = None,
             probe_pose: ProbePose | None = None) -> ServoCommand:
        """One control period at ``now_s``; optional fresh samples are taken first."""
        if probe_pose is not None:
            self.set_probe_pose(now_s, probe_pose)
        if guidance is not None:
            self.set_guidance(now_s, guidance)
        cfg = self.config
        period = cfg.control_period_s
        if self._last_step_s is None:
            dt = period
        else:
            # a late tick must not allow a bigger velocity change than two nominal periods
            dt = min(max(now_s - self._last_step_s, 0.0), 2.0 * period)
        self._last_step_s = now_s

        if not self._enabled:
            if not self._ramping_down:
                return self._command(False)
            self._advance(np.zeros(3), np.zeros(3), dt)
            if not (np.any(self._cmd_lin) or np.any(self._cmd_ang)):
                self._ramping_down = False
            return self._command(True)

        # latched stops (order: missing pose, then workspace)
        if cfg.require_probe_pose and not self._pose_fresh(now_s):
            self.counters.faults += 1
            cmd = self._stop(now_s, ServoState.FAULT,
                             "probe pose missing or stale (pose watchdog); re-enable to resume")
            return cmd if cmd is not None else self.step_disabled_ramp(dt)
        if self._anchor_T is not None and self._pose_T is not None:
            self._update_workspace()
            if self.travel_m > cfg.max_travel_m or self.rotation_rad > cfg.max_rotation_rad:
                self.counters.workspace_stops += 1
                cmd = self._stop(now_s, ServoState.WORKSPACE,
                                 f"workspace limit: travel {self.travel_m * 1000:.1f} mm / "
                                 f"{cfg.max_travel_m * 1000:.1f} mm, rotation "
                                 f"{math.degrees(self.rotation_rad):.1f} deg / "
                                 f"{math.degrees(cfg.max_rotation_rad):.1f} deg; re-enable to resume")
                return cmd if cmd is not None else self.step_disabled_ramp(dt)

        events: list[str] = []
        target_lin, target_ang = np.zeros(3), np.zeros(3)
        fresh = self._g_lin is not None and now_s - self._g_recv_s <= cfg.guidance_timeout_s
        if not fresh:
            if not self._timed_out:
                self.counters.timeouts += 1
            self._timed_out = True
            self._filt_lin = self._filt_ang = None
            self._within_since_s = None
            self._leave_plane(events)
            self._verify = self._survey = None
            self._set_state(ServoState.TIMEOUT, "no fresh guidance" if self._g_lin is not None
                            else "enabled, waiting for fresh guidance")
        elif not self._gate_open:
            self._timed_out = False
            self._within_since_s = None
            self._leave_plane(events)
            self._verify = self._survey = None
            self._set_state(ServoState.PAUSED, "guidance jumped beyond the confidence gate; "
                            f"waiting for {cfg.gate_settle_frames} consistent frames")
        else:
            self._timed_out = False
            assert self._g_lin is not None and self._g_ang is not None
            if self._filt_lin is None or self._filt_ang is None:
                self._filt_lin, self._filt_ang = self._g_lin.copy(), self._g_ang.copy()
            else:
                alpha = lowpass_alpha(dt, cfg.filter_tau_s)
                self._filt_lin = self._filt_lin + alpha * (self._g_lin - self._filt_lin)
                self._filt_ang = self._filt_ang + alpha * (self._g_ang - self._filt_ang)
            lin_err, ang_err = _norm(self._filt_lin), _norm(self._filt_ang)
            unstable = self._stability(now_s)
            if self._survey is not None:
                pass  # the final-approach survey drives the probe (below)
            elif self._verify is not None:
                pass  # the final-approach check drives the probe (below)
            elif self._converged:
                f = cfg.converge_release_factor
                left = lin_err > f * cfg.converge_linear_m or ang_err > f * cfg.converge_angular_rad
                left = left or self._unstable_beyond_release()
                if left and not cfg.converge_latch:
                    self._converged = False
                    self._within_since_s = None
                    events.append("plane_left")
            else:
                within = lin_err < cfg.converge_linear_m and ang_err < cfg.converge_angular_rad
                if not within:
                    self._within_since_s = None
                elif self._within_since_s is None:
                    self._within_since_s = now_s
                held = within and self._within_since_s is not None \
                    and now_s - self._within_since_s >= cfg.converge_hold_s
                if held and not unstable:
                    why_not = self._verification_needed(now_s)
                    if why_not == "":
                        self._converged = True
                        self.counters.converged += 1
                        events.append("plane_reached")
                    elif why_not == "start":
                        self._start_verify(now_s)
                    elif why_not == "survey":
                        self._start_survey(now_s, self._pose_T)
                    else:
                        unstable = why_not
                elif held and not self._unstable_counted:
                    self.counters.unstable_holds += 1
                self._unstable_counted = bool(held and unstable)
            if self._survey is not None:
                target_lin, target_ang = self._survey_command(now_s, events)
            elif self._verify is not None:
                target_lin, target_ang = self._verify_command(now_s)
            elif self._converged:
                self._set_state(ServoState.CONVERGED,
                                f"plane reached: {lin_err * 1000:.1f} mm, {math.degrees(ang_err):.1f} deg"
                                + self._spread_text())
            else:
                within_now = self._within_since_s is not None
                self._set_state(ServoState.ACTIVE, f"following guidance; within tolerance, not reached: {unstable}"
                                if within_now and unstable else "following guidance")
                target_lin = clamp_norm(cfg.gain_linear * self._filt_lin, cfg.max_linear_speed_mps)
                target_ang = clamp_norm(cfg.gain_angular * self._filt_ang, cfg.max_angular_speed_rps)

        self._advance(target_lin, target_ang, dt)
        if not (np.all(np.isfinite(self._cmd_lin)) and np.all(np.isfinite(self._cmd_ang))):
            self.counters.output_nonfinite += 1
            self.counters.faults += 1
            self._cmd_lin, self._cmd_ang = np.zeros(3), np.zeros(3)
            self._enabled = self._ramping_down = False
            self._set_state(ServoState.FAULT, "non-finite command computed; re-enable to resume")
        return self._command(True, tuple(events))

    def step_disabled_ramp(self, dt: float) -> ServoCommand:
        """First ramp-down command after a latched stop in stop_mode ramp."""
        self._advance(np.zeros(3), np.zeros(3), dt)
        if not (np.any(self._cmd_lin) or np.any(self._cmd_ang)):
            self._ramping_down = False
        return self._command(True)

    # ------------------------------------------------------------------ helpers
    def _pose_fresh(self, now_s: float) -> bool:
        return self._pose_T is not None and now_s - self._pose_recv_s <= self.config.probe_pose_timeout_s

    def _update_workspace(self) -> None:
        assert self._anchor_T is not None and self._pose_T is not None
        d = self._pose_T[:3, 3] - self._anchor_T[:3, 3]
        self.travel_m = _norm(d) / 1000.0
        rel = self._anchor_T[:3, :3].T @ self._pose_T[:3, :3]
        self.rotation_rad = _norm(rotation_to_rotvec(rel))

    def _advance(self, target_lin: np.ndarray, target_ang: np.ndarray, dt: float) -> None:
        cfg = self.config
        self._cmd_lin = rate_limit(self._cmd_lin, target_lin, cfg.max_linear_accel_mps2 * dt)
        self._cmd_ang = rate_limit(self._cmd_ang, target_ang, cfg.max_angular_accel_rps2 * dt)
        # snap tiny residues to an exact zero so "stopped" is exactly zero
        if not np.any(target_lin) and _norm(self._cmd_lin) < 1e-12:
            self._cmd_lin = np.zeros(3)
        if not np.any(target_ang) and _norm(self._cmd_ang) < 1e-12:
            self._cmd_ang = np.zeros(3)

    # ------------------------------------------------------------------ final-approach check
    def _implied_target(self, lin_m: np.ndarray, ang_rad: np.ndarray) -> np.ndarray | None:
        """Base-frame target pose (mm) that guidance (lin, ang) describes at the current probe pose."""
        if self._pose_T is None:
            return None
        U = np.eye(4)
        U[:3, :3] = rotvec_to_rotation(np.asarray(ang_rad, dtype=np.float64))
        U[:3, 3] = np.asarray(lin_m, dtype=np.float64) * 1000.0
        return self._pose_T @ U

    def _verification_needed(self, now_s: float) -> str:
        """"" = reached may be reported; "start" = run the check now; else why not reached."""
        cfg = self.config
        if cfg.survey_poses and self._pose_T is not None:
            if self._survey_failures >= cfg.survey_attempts:
                return f"final-approach survey failed {self._survey_failures} time(s): {self.survey_result}"
            return "survey"
        if cfg.verify_step_m <= 0 or self._pose_T is None:
            return ""
        assert self._filt_lin is not None and self._filt_ang is not None
        implied = self._implied_target(self._filt_lin, self._filt_ang)
        if self._verified_T is not None and implied is not None:
            d_mm, d_rad = _pose_diff(implied, self._verified_T)
            if d_mm <= cfg.verify_tolerance_m * 1000.0 and d_rad <= cfg.verify_tolerance_rad:
                return ""
        if self._verify_failures >= cfg.verify_attempts:
            return f"final-approach check failed {self._verify_failures} time(s): {self.verify_result}"
        return "start"

    def _start_verify(self, now_s: float) -> None:
        cfg = self.config
        assert self._pose_T is not None and self._filt_lin is not None and self._filt_ang is not None
        sign = -1.0 if self._verify_failures % 2 else 1.0
        step = np.eye(4)
        step[0, 3] = sign * cfg.verify_step_m * 1000.0   # sideways: probe x
        self._verify = {"phase": "move", "t": now_s, "start_T": self._pose_T.copy(),
                        "implied0": self._implied_target(self._filt_lin, self._filt_ang),
                        "goal": self._pose_T @ step}
        self._within_since_s = None

    def _verify_command(self, now_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Drive the check: step sideways, settle, read the guidance, compare; the command to follow."""
        cfg, v = self.config, self._verify
        assert v is not None and self._pose_T is not None
        zero = (np.zeros(3), np.zeros(3))
        if v["phase"] == "move":
            lin, ang, d_mm, d_rad = self._pose_command(v["goal"], cfg.gain_linear, cfg.gain_angular)
            if d_mm < 0.5 and d_rad < 0.01 or now_s - v["t"] > 3.0:
                v["phase"], v["t"] = "settle", now_s
                self._set_state(ServoState.ACTIVE, "final-approach check: settling after the sideways step")
                return zero
            self._set_state(ServoState.ACTIVE, f"final-approach check: stepping {cfg.verify_step_m * 1000:.0f} mm "
                            "sideways to see whether the target estimate stands still")
            return lin, ang
        # settle: hold still, then average the raw guidance received after the settle time
        samples = [h for h in self._history if h[0] >= v["t"] + cfg.verify_settle_s]
        if now_s - v["t"] < cfg.verify_settle_s + 0.3 or len(samples) < 3:
            return zero
        lin = np.mean([h[1] for h in samples], axis=0)
        ang = np.mean([h[2] for h in samples], axis=0)
        implied1 = self._implied_target(lin, ang)
        moved_mm = float(np.linalg.norm(self._pose_T[:3, 3] - v["start_T"][:3, 3]))
        d_mm, d_rad = _pose_diff(implied1, v["implied0"])
        self._verify = None
        self._filt_lin = self._filt_ang = None   # follow the guidance afresh from here
        if moved_mm < 0.5 * cfg.verify_step_m * 1000.0:
            ok, why = False, f"the probe moved only {moved_mm:.1f} mm of {cfg.verify_step_m * 1000:.0f} mm"
        else:
            ok = d_mm <= cfg.verify_tolerance_m * 1000.0 and d_rad <= cfg.verify_tolerance_rad
            why = (f"the target estimate moved {d_mm:.1f} mm / {math.degrees(d_rad):.1f} deg when the probe moved "
                   f"{moved_mm:.1f} mm (tolerance {cfg.verify_tolerance_m * 1000:.1f} mm / "
                   f"{math.degrees(cfg.verify_tolerance_rad):.1f} deg)")
        self.verify_result = ("passed: " if ok else "failed: ") + why
        if ok:
            self.counters.verify_passed += 1
            self._verified_T = implied1
        else:
            self.counters.verify_failed += 1
            self._verify_failures += 1
        self._set_state(ServoState.ACTIVE, f"final-approach check {self.verify_result}")
        return zero

    # ------------------------------------------------------------------ final-approach survey
    def _start_survey(self, now_s: float, centre: np.ndarray | None) -> None:
        cfg = self.config
        assert centre is not None
        offsets = survey_offsets(int(cfg.survey_poses), cfg.survey_step_m * 1000.0,
                                 math.degrees(cfg.survey_step_rad))
        goals = [centre @ action_to_matrix(o) for o in offsets]
        before = self._survey if cfg.survey_pool and self._survey is not None else None
        self._survey = {"phase": "move", "t": now_s, "k": 0, "goals": goals, "reads": [], "estimates": [],
                        "frame_estimates": [], "last_read_s": -math.inf, "target": None, "passed": False,
                        # survey_pool: the finished surveys' estimates, judged together with this one's
                        "pooled": [] if before is None else before["pooled"] + before["estimates"],
                        "pooled_frames": [] if before is None else before["pooled_frames"] + before["frame_estimates"]}
        self._within_since_s = None

    def _within_survey_tolerance(self, st: SurveyTarget) -> bool:
        """The surveyed estimates agree: their scatter within ``survey_tolerance_m`` / ``_rad``."""
        cfg = self.config
        return (st.spread_mm <= cfg.survey_tolerance_m * 1000.0
                and math.radians(st.spread_deg) <= cfg.survey_tolerance_rad)

    def _pose_command(self, goal_T: np.ndarray, gain_linear: float,
                      gain_angular: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Command toward the base-frame pose ``goal_T`` (probe frame, the given gains [1/s], speed limits)
        and the distance to it [mm, rad]."""
        cfg = self.config
        assert self._pose_T is not None
        rel = np.linalg.solve(self._pose_T, goal_T)
        lin, ang = rel[:3, 3] / 1000.0, rotation_to_rotvec(rel[:3, :3])
        return (clamp_norm(gain_linear * lin, cfg.max_linear_speed_mps),
                clamp_norm(gain_angular * ang, cfg.max_angular_speed_rps), _norm(lin) * 1000.0, _norm(ang))

    def _survey_command(self, now_s: float, events: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Drive the survey: visit each pose, settle, read the target the guidance implies there; then go to
        the robust mean of those targets and hold it, "plane reached" if they agreed."""
        cfg, v = self.config, self._survey
        assert v is not None and self._pose_T is not None and self._g_lin is not None and self._g_ang is not None
        zero = (np.zeros(3), np.zeros(3))
        n = len(v["goals"])
        if v["phase"] == "move":
            lin, ang, d_mm, d_rad = self._pose_command(v["goals"][v["k"]], cfg.survey_gain, cfg.survey_gain)
            arrived = d_mm < cfg.survey_arrive_m * 1000.0 and d_rad < cfg.survey_arrive_rad
            if arrived or now_s - v["t"] > 4.0:
                v["phase"], v["t"] = "read", now_s
                return zero
            self._set_state(ServoState.ACTIVE, f"final-approach survey: moving to pose {v['k'] + 1} of {n}")
            return lin, ang
        if v["phase"] == "read":
            if now_s - v["t"] >= cfg.survey_settle_s and self._g_recv_s > v["last_read_s"]:
                v["reads"].append(self._implied_target(self._g_lin, self._g_ang))
                v["last_read_s"] = self._g_recv_s
            frames: list[np.ndarray] = []   # this pose's per-frame estimates (only the frame_target gate reads them)
            if cfg.survey_gate == "frame_target":
                t_read0 = v["t"] + cfg.survey_settle_s
                frames = [T for t, T in self._frame_targets if t >= t_read0]
            reading = now_s - v["t"] < cfg.survey_settle_s + cfg.survey_read_s or not v["reads"]
            if cfg.survey_gate == "frame_target" and not frames and \
                    now_s - v["t"] < cfg.survey_settle_s + cfg.survey_read_s + FRAME_TARGET_WAIT_S:
                reading = True   # wait a little for a frame estimate read at this pose
            if reading:
                self._set_state(ServoState.ACTIVE, f"final-approach survey: reading the target at pose "
                                f"{v['k'] + 1} of {n}")
                return zero
            v["estimates"].append(survey_target(v["reads"]).T_mm)
            if frames:
                v["frame_estimates"].append(survey_target(frames).T_mm)
            v["reads"], v["k"], v["t"] = [], v["k"] + 1, now_s
            if v["k"] < n:
                v["phase"] = "move"
                return zero
            st = survey_target(v["pooled"] + v["estimates"])
            v["target"], v["phase"] = st.T_mm, "goto"
            tol = (f"(tolerance {cfg.survey_tolerance_m * 1000:.1f} mm / "
                   f"{math.degrees(cfg.survey_tolerance_rad):.1f} deg)")
            of = f" of {len(v['pooled']) // n + 1} surveys" if v["pooled"] else ""   # n guidance estimates per survey
            guidance_text = f"the {st.n} estimates{of} scatter {st.spread_mm:.1f} mm / {st.spread_deg:.1f} deg"
            if cfg.survey_gate == "guidance":
                v["passed"] = self._within_survey_tolerance(st)
                why = f"{guidance_text} {tol}"
            elif len(v["frame_estimates"]) < n:
                v["passed"] = False
                why = (f"per-frame target estimates (frame_target_pose) at {len(v['frame_estimates'])} of the {n} "
                       f"poses only (survey_gate frame_target); {guidance_text}")
            else:
                ft = survey_target(v["pooled_frames"] + v["frame_estimates"])
                v["passed"] = self._within_survey_tolerance(ft)
                why = (f"the {ft.n} per-frame estimates{of} scatter {ft.spread_mm:.1f} mm / {ft.spread_deg:.1f} deg "
                       f"{tol}; "
                       f"the guidance's {st.spread_mm:.1f} mm / {st.spread_deg:.1f} deg")
            self.survey_result = ("passed: " if v["passed"] else "failed: ") + why
            if v["passed"]:
                self.counters.surveys_passed += 1
            else:
                self.counters.surveys_failed += 1
                self._survey_failures += 1
        # goto / hold: servo on the surveyed target; leave when the guidance's target moves far from it
        lin, ang, d_mm, d_rad = self._pose_command(v["target"], cfg.survey_gain, cfg.survey_gain)
        if self._filt_lin is not None and self._filt_ang is not None:
            away_mm, away_rad = _pose_diff(self._implied_target(self._filt_lin, self._filt_ang), v["target"])
            if away_mm > cfg.survey_release_m * 1000.0 or away_rad > cfg.survey_release_rad:
                self._survey = None
                self._leave_plane(events)
                self._survey_failures = 0
                self._filt_lin = self._filt_ang = None
                self._set_state(ServoState.ACTIVE, f"the target moved {away_mm:.1f} mm / {math.degrees(away_rad):.1f} "
                                "deg from the surveyed one: following the guidance again")
                return zero
        reach_m, reach_rad = cfg.converge_linear_m, cfg.converge_angular_rad
        if v["passed"]:   # "plane reached" is said of the probe: it must be at the surveyed target, not near it
            reach_m, reach_rad = cfg.survey_reached_m or reach_m, cfg.survey_reached_rad or reach_rad
        there = d_mm < reach_m * 1000.0 and d_rad < reach_rad
        if v["phase"] == "goto" and there:
            v["phase"] = "hold"
            if v["passed"]:
                self._converged = True
                self.counters.converged += 1
                events.append("plane_reached")
            elif self._survey_failures < cfg.survey_attempts:
                self._start_survey(now_s, v["target"])
                return zero
        if v["phase"] == "hold" and v["passed"]:
            self._set_state(ServoState.CONVERGED, f"plane reached at the surveyed target ({d_mm:.1f} mm, "
                            f"{math.degrees(d_rad):.1f} deg from it); survey {self.survey_result}")
        elif v["phase"] == "hold":
            self._set_state(ServoState.ACTIVE, f"{HELD_NOT_REACHED}: final-approach survey "
                            f"{self.survey_result}")
        else:
            self._set_state(ServoState.ACTIVE, f"final-approach survey {self.survey_result}; moving to the surveyed "
                            f"target ({d_mm:.1f} mm, {math.degrees(d_rad):.1f} deg away)")
        return lin, ang

    def _leave_plane(self, events: list[str]) -> None:
        """Guidance lost or jumped (e.g. the target estimate was reset): "plane reached" no longer holds."""
        if self._converged and not self.config.converge_latch:
            self._converged = False
            events.append("plane_left")

    def _unstable_beyond_release(self) -> bool:
        """While converged: the raw guidance spread beyond the release factor times its tolerance."""
        cfg, sp = self.config, self.guidance_spread
        if sp is None:
            return False
        f = cfg.converge_release_factor
        return bool((cfg.converge_spread_linear_m > 0 and sp[0] > f * cfg.converge_spread_linear_m)
                    or (cfg.converge_spread_angular_rad > 0 and sp[1] > f * cfg.converge_spread_angular_rad))

    def _spread_text(self) -> str:
        sp = self.guidance_spread
        out = "" if sp is None else f"; guidance spread {sp[0] * 1000:.1f} mm / {math.degrees(sp[1]):.1f} deg"
        ts = self._target_spread
        if ts is not None and math.isfinite(ts[1]):
            out += f"; fused target spread {ts[1] * 1000:.1f} mm / {math.degrees(ts[2]):.1f} deg"
        return out

    def _set_state(self, state: ServoState, reason: str) -> None:
        self.state, self.reason = state, reason

    def _command(self, publish: bool, events: tuple[str, ...] = ()) -> ServoCommand:
        if publish:
            self.counters.commands += 1
        return ServoCommand(self._cmd_lin.copy(), self._cmd_ang.copy(), publish, self.state,
                            self.reason, events)

    def status(self) -> dict[str, object]:
        """A JSON-able summary for the status topic and diagnostics."""
        filt = self.filtered_guidance
        return {
            "state": self.state.value,
            "reason": self.reason,
            "enabled": self._enabled,
            "linear_mps": round(_norm(self._cmd_lin), 6),
            "angular_rps": round(_norm(self._cmd_ang), 6),
            "guidance_linear_m": None if filt is None else round(_norm(filt[0]), 6),
            "guidance_angular_rad": None if filt is None else round(_norm(filt[1]), 6),
            "guidance_spread_linear_m": None if self.guidance_spread is None else round(self.guidance_spread[0], 6),
            "guidance_spread_angular_rad": None if self.guidance_spread is None else round(self.guidance_spread[1], 6),
            "target_spread_linear_m": (None if self._target_spread is None or not math.isfinite(self._target_spread[1])
                                       else round(self._target_spread[1], 6)),
            "target_spread_angular_rad": (None if self._target_spread is None
                                          or not math.isfinite(self._target_spread[2])
                                          else round(self._target_spread[2], 6)),
            "final_approach_check": self.verify_result or None,
            "final_approach_survey": self.survey_result or None,
            "travel_m": round(self.travel_m, 6),
            "rotation_rad": round(self.rotation_rad, 6),
            "counters": self.counters.as_dict(),
        }


__all__ = [
    "HELD_NOT_REACHED", "LATCHED_STATES", "MAX_PLAUSIBLE_ANGULAR_RAD", "MAX_PLAUSIBLE_LINEAR_M", "STOP_MODES",
    "Guidance", "ProbePose", "ServoCommand", "ServoConfig",
    "ServoController", "ServoCounters", "ServoState", "clamp_norm", "lowpass_alpha", "rate_limit",
]
