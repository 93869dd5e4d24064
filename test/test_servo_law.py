"""Unit tests of the servo control law (cardiac_copilot_ros.servo): fast and deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardiac_copilot_ros.pose import rotvec_to_rotation
from cardiac_copilot_ros.servo import (
    Guidance,
    ProbePose,
    ServoCommand,
    ServoConfig,
    ServoController,
    ServoState,
    clamp_norm,
    lowpass_alpha,
    rate_limit,
)

RATE = 100.0
DT = 1.0 / RATE
CFG = ServoConfig(control_rate_hz=RATE)


def pose_at(pos_m=(0.0, 0.0, 0.0), rotvec=(0.0, 0.0, 0.0)) -> ProbePose:
    T = np.eye(4)
    T[:3, :3] = rotvec_to_rotation(np.asarray(rotvec, dtype=float))
    T[:3, 3] = np.asarray(pos_m, dtype=float) * 1000.0
    return ProbePose(T)


def guid(lin, ang=(0.0, 0.0, 0.0), stamp=None) -> tuple:
    return (np.asarray(lin, dtype=float), np.asarray(ang, dtype=float), stamp)


class Sim:
    """Drives a controller at the control rate with guidance at 30 Hz and a pose at 100 Hz."""

    def __init__(self, config: ServoConfig = CFG, pose: ProbePose | None = None) -> None:
        self.ctl = ServoController(config)
        self.t = 100.0
        self.pose = pose or pose_at()
        self.guidance: tuple | None = None
        self.guidance_period_s = 1.0 / 30.0
        self._next_guidance = self.t
        self.log: list[tuple[float, ServoCommand]] = []

    def enable(self) -> tuple[bool, str]:
        self.ctl.set_probe_pose(self.t, self.pose)
        return self.ctl.enable(self.t)

    def run(self, seconds: float) -> list[ServoCommand]:
        out = []
        for _ in range(int(round(seconds * RATE))):
            self.t += DT
            g = None
            if self.guidance is not None and self.t >= self._next_guidance - 1e-9:
                lin, ang, stamp = self.guidance
                g = Guidance(lin, ang, self.t if stamp is None else stamp)
                self._next_guidance = self.t + self.guidance_period_s
            pose = self.pose if self.pose is not None else None
            cmd = self.ctl.step(self.t, g, pose)
            self.log.append((self.t, cmd))
            out.append(cmd)
        return out


def published(cmds: list[ServoCommand]) -> list[ServoCommand]:
    return [c for c in cmds if c.publish]


def assert_limits(log: list[tuple[float, ServoCommand]], cfg: ServoConfig, allow_stop_step: bool = False) -> None:
    prev_lin, prev_ang, prev_t = np.zeros(3), np.zeros(3), None
    for t, c in log:
        if not c.publish:
            continue
        assert np.all(np.isfinite(c.linear_mps)) and np.all(np.isfinite(c.angular_rps))
        assert np.linalg.norm(c.linear_mps) <= cfg.max_linear_speed_mps + 1e-12
        assert np.linalg.norm(c.angular_rps) <= cfg.max_angular_speed_rps + 1e-12
        if prev_t is not None and not (allow_stop_step and c.is_zero):
            dt = t - prev_t
            assert np.linalg.norm(c.linear_mps - prev_lin) <= cfg.max_linear_accel_mps2 * dt + 1e-12
            assert np.linalg.norm(c.angular_rps - prev_ang) <= cfg.max_angular_accel_rps2 * dt + 1e-12
        prev_lin, prev_ang, prev_t = c.linear_mps, c.angular_rps, t


# ----------------------------------------------------------------------------- helpers


def test_clamp_keeps_direction_and_rate_limit_bounds_change() -> None:
    v = clamp_norm(np.array([3.0, 4.0, 0.0]), 1.0)
    assert np.allclose(v, [0.6, 0.8, 0.0])
    assert np.allclose(clamp_norm(np.array([0.1, 0.0, 0.0]), 1.0), [0.1, 0, 0])
    r = rate_limit(np.zeros(3), np.array([1.0, 0.0, 0.0]), 0.1)
    assert np.allclose(r, [0.1, 0, 0])
    assert lowpass_alpha(0.01, 0.0) == 1.0
    assert lowpass_alpha(0.1, 0.1) == pytest.approx(1 - math.exp(-1))


@pytest.mark.parametrize("changes", [
    {"max_linear_speed_mps": -0.1}, {"max_angular_speed_rps": 0.0}, {"max_linear_accel_mps2": float("nan")},
    {"filter_tau_s": -1.0}, {"stop_mode": "coast"}, {"gate_settle_frames": 0}, {"control_rate_hz": 0.0},
    {"converge_release_factor": 0.5}, {"max_travel_m": 0.0}, {"no_such": 1.0},
])
def test_invalid_config_rejected(changes: dict) -> None:
    with pytest.raises(ValueError):
        CFG.updated(**changes)


# ----------------------------------------------------------------------------- behaviours


def test_disabled_at_start_publishes_nothing() -> None:
    sim = Sim()
    sim.guidance = guid([0.05, 0, 0])
    cmds = sim.run(0.5)
    assert not any(c.publish for c in cmds)
    assert sim.ctl.state is ServoState.DISABLED


def test_enable_needs_a_fresh_pose() -> None:
    ctl = ServoController(CFG)
    ok, msg = ctl.enable(1.0)
    assert not ok and "pose" in msg
    ok, _ = ServoController(CFG.updated(require_probe_pose=False)).enable(1.0)
    assert ok


def test_speed_and_accel_limits_and_direction() -> None:
    sim = Sim()
    assert sim.enable()[0]
    sim.guidance = guid([0.3, -0.4, 0.0], [0.0, 0.0, 2.0])
    cmds = published(sim.run(2.0))
    assert cmds[0].linear_mps[0] > 0 and np.linalg.norm(cmds[0].linear_mps) <= CFG.max_linear_accel_mps2 * DT + 1e-12
    last = cmds[-1]
    assert np.linalg.norm(last.linear_mps) == pytest.approx(CFG.max_linear_speed_mps)
    assert np.allclose(last.linear_mps / np.linalg.norm(last.linear_mps), [0.6, -0.8, 0.0])
    assert np.linalg.norm(last.angular_rps) == pytest.approx(CFG.max_angular_speed_rps)
    assert last.state is ServoState.ACTIVE
    assert_limits(sim.log, CFG)


def test_gain_in_the_linear_region() -> None:
    cfg = CFG.updated(gain_linear=2.0, filter_tau_s=0.0, converge_linear_m=0.0001)
    sim = Sim(cfg)
    sim.enable()
    sim.guidance = guid([0.005, 0, 0])
    cmds = published(sim.run(1.0))
    assert cmds[-1].linear_mps[0] == pytest.approx(0.01)


def test_lowpass_filter_smooths_a_step() -> None:
    tau = 0.3
    cfg = CFG.updated(filter_tau_s=tau, max_linear_speed_mps=1.0, max_linear_accel_mps2=100.0,
                      gate_jump_linear_m=0.0, converge_linear_m=0.0001)
    sim = Sim(cfg)
    sim.enable()
    sim.guidance = guid([0.01, 0, 0])
    sim.run(0.5)
    sim.guidance = guid([0.03, 0, 0])
    cmds = published(sim.run(2.0))
    x = np.array([c.linear_mps[0] for c in cmds])
    assert np.all(np.diff(x) >= -1e-12)                       # monotonic approach
    assert x[0] < 0.012                                       # no jump at the step
    i_tau = int(round(tau * RATE)) - 1
    assert x[i_tau] == pytest.approx(0.01 + 0.02 * (1 - math.exp(-1)), abs=1.5e-3)
    assert x[-1] == pytest.approx(0.03, abs=1e-4)


def test_timeout_ramps_to_zero_and_resumes() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.1, 0, 0])
    sim.run(1.0)
    sim.guidance = None
    cmds = published(sim.run(1.5))
    assert cmds[-1].is_zero and cmds[-1].state is ServoState.TIMEOUT
    assert_limits(sim.log, CFG)                               # the ramp-down honours the accel limit
    n_ramp = sum(1 for c in cmds if not c.is_zero)
    expected = CFG.guidance_timeout_s * RATE + CFG.max_linear_speed_mps / CFG.max_linear_accel_mps2 * RATE
    # the timeout counts from the last guidance receipt, up to one guidance period before the cut
    assert expected - RATE / 30.0 - 2 <= n_ramp <= expected + 1
    sim.guidance = guid([0.1, 0, 0])
    assert published(sim.run(1.0))[-1].state is ServoState.ACTIVE
    assert sim.ctl.counters.timeouts == 1


def test_stale_stamp_rejected() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.1, 0, 0], stamp=sim.t - 5.0)
    cmds = published(sim.run(0.5))
    assert all(c.is_zero for c in cmds)
    assert sim.ctl.counters.rejected_stale > 0 and sim.ctl.counters.guidance_accepted == 0


@pytest.mark.parametrize("mode", ["immediate", "ramp"])
def test_disable_stops(mode: str) -> None:
    cfg = CFG.updated(stop_mode=mode)
    sim = Sim(cfg)
    sim.enable()
    sim.guidance = guid([0.1, 0, 0.0], [0.5, 0, 0])
    sim.run(1.0)
    cmd = sim.ctl.disable(sim.t)
    if mode == "immediate":
        assert cmd is not None and cmd.publish and cmd.is_zero and cmd.state is ServoState.DISABLED
        assert not any(c.publish for c in sim.run(0.5))
    else:
        assert cmd is None
        cmds = published(sim.run(1.0))
        assert cmds and cmds[-1].is_zero and not any(c.is_zero for c in cmds[:-1])
        assert_limits(sim.log, cfg)
        assert not any(c.publish for c in sim.run(0.2))


def test_shutdown_command_is_zero() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.1, 0, 0])
    sim.run(0.5)
    cmd = sim.ctl.shutdown_command()
    assert cmd.publish and cmd.is_zero


def test_nonfinite_guidance_rejected_and_counted() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.1, 0, 0])
    sim.run(0.5)
    sim.guidance = guid([float("nan"), 0, 0], [0, float("inf"), 0])
    cmds = published(sim.run(1.5))
    assert all(np.all(np.isfinite(c.linear_mps)) and np.all(np.isfinite(c.angular_rps)) for c in cmds)
    assert cmds[-1].is_zero and cmds[-1].state is ServoState.TIMEOUT
    assert sim.ctl.counters.rejected_nonfinite > 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(min_value=-1e300, max_value=1e300),
                          st.floats(min_value=-0.5, max_value=0.5)), min_size=1, max_size=40))
def test_never_nonfinite_and_always_within_limits(samples: list) -> None:
    cfg = CFG.updated(require_probe_pose=False)
    ctl = ServoController(cfg)
    ctl.enable(0.0)
    t = 0.0
    log = []
    for a, b, c in samples:
        for k in range(3):
            t += DT
            g = Guidance(np.array([a, b, c]), np.array([c, a, b]), t) if k == 0 else None
            log.append((t, ctl.step(t, g)))
    assert_limits(log, cfg)


def test_implausible_guidance_and_bad_pose_rejected() -> None:
    ctl = ServoController(CFG)
    assert not ctl.set_guidance(1.0, Guidance(np.array([2.0, 0, 0]), np.zeros(3), 1.0))
    assert not ctl.set_guidance(1.0, Guidance(np.zeros(3), np.array([0, 0, 7.0]), 1.0))
    assert not ctl.set_guidance(1.0, Guidance(np.zeros(2), np.zeros(3), 1.0))
    assert ctl.counters.rejected_other == 3
    bad = np.eye(4)
    bad[0, 3] = float("nan")
    assert not ctl.set_probe_pose(1.0, ProbePose(bad))
    assert ctl.counters.poses_rejected == 1


def test_workspace_limit_latches_until_reenabled() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.1, 0, 0])
    sim.run(0.5)
    sim.pose = pose_at((0.06, 0.0, 0.0))
    cmds = published(sim.run(0.1))
    assert cmds[0].is_zero and cmds[0].state is ServoState.WORKSPACE and "workspace" in cmds[0].reason
    assert not published(sim.run(0.5))                  # stays stopped
    sim.pose = pose_at()                                # back inside: still needs re-enable
    assert not published(sim.run(0.3))
    assert sim.enable()[0]
    assert published(sim.run(0.5))[-1].state is ServoState.ACTIVE
    # rotation limit as well
    sim.pose = pose_at(rotvec=(0.0, 0.6, 0.0))
    assert published(sim.run(0.1))[0].state is ServoState.WORKSPACE


def test_pose_watchdog_faults() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.1, 0, 0])
    sim.run(0.5)
    sim.pose = None
    cmds = published(sim.run(1.0))
    assert cmds[-1].is_zero and cmds[-1].state is ServoState.FAULT and "pose" in cmds[-1].reason
    assert not sim.ctl.enabled


def test_convergence_reports_plane_reached_with_hysteresis() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.002, 0, 0], [0.0, 0.0, 0.02])   # within tolerance
    cmds = published(sim.run(1.5))
    reached = [i for i, c in enumerate(cmds) if "plane_reached" in c.events]
    assert len(reached) == 1
    assert reached[0] * DT == pytest.approx(CFG.converge_hold_s, abs=0.05)
    assert cmds[-1].state is ServoState.CONVERGED and "plane reached" in cmds[-1].reason and cmds[-1].is_zero
    # inside the hysteresis band (1.5x tolerance): stays converged
    sim.guidance = guid([0.0045, 0, 0])
    assert published(sim.run(1.0))[-1].state is ServoState.CONVERGED
    # beyond it: resumes
    sim.guidance = guid([0.02, 0, 0])
    cmds = published(sim.run(1.0))
    assert any("plane_left" in c.events for c in cmds) and cmds[-1].state is ServoState.ACTIVE


def test_convergence_latch() -> None:
    sim = Sim(CFG.updated(converge_latch=True))
    sim.enable()
    sim.guidance = guid([0.001, 0, 0])
    sim.run(1.5)
    sim.guidance = guid([0.02, 0, 0])
    assert published(sim.run(1.0))[-1].state is ServoState.CONVERGED


def test_confidence_gate_pauses_until_consistent() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.05, 0, 0])
    sim.run(1.0)
    # alternate between two far-apart guidance vectors: every frame jumps
    for k in range(10):
        sim.guidance = guid([0.05 if k % 2 else -0.05, 0, 0])
        sim.run(1.0 / 30.0)
    assert sim.ctl.state is ServoState.PAUSED
    sim.guidance = guid([-0.05, 0, 0])
    cmds = published(sim.run(0.05))
    assert cmds[-1].state is ServoState.PAUSED            # fewer than gate_settle_frames frames
    cmds = published(sim.run(1.5))
    assert cmds[-1].state is ServoState.ACTIVE and cmds[-1].linear_mps[0] < 0
    assert sim.ctl.counters.gate_pauses == 1
    assert_limits(sim.log, CFG)


def test_late_tick_cannot_step() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.1, 0, 0])
    sim.run(0.05)
    before = sim.ctl.command[0].copy()
    cmd = sim.ctl.step(sim.t + 0.2, Guidance(np.array([0.1, 0, 0]), np.zeros(3), sim.t + 0.2), sim.pose)
    assert np.linalg.norm(cmd.linear_mps - before) <= 2 * DT * CFG.max_linear_accel_mps2 + 1e-12


def test_config_yaml_matches_the_defaults() -> None:
    import dataclasses
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parent.parent / "config" / "servo.yaml"
    params = yaml.safe_load(path.read_text())["copilot_servo"]["ros__parameters"]
    names = {f.name for f in dataclasses.fields(ServoConfig)}
    assert names <= set(params), f"missing in servo.yaml: {sorted(names - set(params))}"
    assert set(params) - names == {"probe_frame", "status_period_s"}
    defaults = ServoConfig()
    for name in names:
        value = params[name]
        assert value == getattr(defaults, name), name
        assert type(value) is type(getattr(defaults, name)), f"{name}: write {value!r} with the right type"
