"""The servo's honest "plane reached" (cardiac_copilot_ros.servo): the guidance must be stable, not
only small; oscillating or disagreeing guidance never reports reached. Fast and deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_servo_law import CFG, DT, RATE, Sim, guid, published

from cardiac_copilot_ros.pose import rotation_to_rotvec, rotvec_to_rotation
from cardiac_copilot_ros.servo import ProbePose, ServoCommand, ServoConfig, ServoState


class AlternatingSim(Sim):
    """Guidance that alternates between two values every frame (the low-passed value averages out)."""

    def __init__(self, a: tuple, b: tuple, config: ServoConfig = CFG) -> None:
        super().__init__(config)
        self.values = (a, b)
        self.k = 0

    def run(self, seconds: float) -> list[ServoCommand]:
        out = []
        for _ in range(int(round(seconds * RATE))):
            if self.t + DT >= self._next_guidance - 1e-9:
                self.guidance = self.values[self.k % 2]
                self.k += 1
            out += super().run(1.0 / RATE)
        return out


def test_oscillating_guidance_never_reports_reached() -> None:
    """+-7 mm / +-0.12 rad alternating every frame: the low-passed guidance is near zero (within the
    3 mm / 0.05 rad tolerance), but the guidance never agreed: never "plane reached", and the status
    says why."""
    sim = AlternatingSim(guid([0.007, 0, 0], [0.12, 0, 0]), guid([-0.007, 0, 0], [-0.12, 0, 0]))
    sim.enable()
    cmds = published(sim.run(10.0))
    assert not any("plane_reached" in c.events for c in cmds)
    assert sim.ctl.counters.converged == 0
    filt = sim.ctl.filtered_guidance
    assert np.linalg.norm(filt[0]) < CFG.converge_linear_m and np.linalg.norm(filt[1]) < CFG.converge_angular_rad
    assert cmds[-1].state is ServoState.ACTIVE and "not stable" in cmds[-1].reason, cmds[-1].reason
    status = sim.ctl.status()
    assert status["guidance_spread_linear_m"] == pytest.approx(0.007, rel=0.05)
    assert status["guidance_spread_angular_rad"] == pytest.approx(0.12, rel=0.05)
    assert sim.ctl.counters.unstable_holds >= 1
    # the same without the stability check (the old law) reports reached: the check is what stops it
    old = AlternatingSim(guid([0.007, 0, 0], [0.12, 0, 0]), guid([-0.007, 0, 0], [-0.12, 0, 0]),
                         CFG.updated(converge_spread_linear_m=0.0, converge_spread_angular_rad=0.0))
    old.enable()
    assert any("plane_reached" in c.events for c in published(old.run(10.0)))


def test_stable_guidance_still_reaches_and_jitter_within_tolerance_is_fine() -> None:
    sim = AlternatingSim(guid([0.0015, 0, 0], [0.01, 0, 0]), guid([0.0005, 0, 0], [0.0, 0, 0]))
    sim.enable()
    cmds = published(sim.run(2.0))
    assert any("plane_reached" in c.events for c in cmds)
    assert "guidance spread" in sim.ctl.reason


def test_oscillation_after_reached_leaves_the_plane() -> None:
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.001, 0, 0])
    sim.run(1.5)
    assert sim.ctl.state is ServoState.CONVERGED
    alt = AlternatingSim(guid([0.007, 0, 0]), guid([-0.007, 0, 0]))  # jumps of 14 mm: under the gate
    alt.ctl, alt.t, alt._next_guidance = sim.ctl, sim.t, sim.t
    cmds = published(alt.run(1.5))
    assert any("plane_left" in c.events for c in cmds)
    assert alt.ctl.state is ServoState.ACTIVE


def test_disagreeing_fused_target_never_reports_reached() -> None:
    """Small, steady guidance but a fused target whose frames disagree (spread 10 mm), or whose
    spread is not known yet (just reset): not reached; once the spread is small: reached."""
    sim = Sim()
    sim.enable()
    sim.guidance = guid([0.001, 0, 0])
    for spread in ((0.010, 0.01), (math.inf, math.inf), (0.001, 0.2)):
        for _ in range(30):  # refreshed like target_pose_cov at frame rate
            sim.ctl.set_target_spread(sim.t, *spread)
            sim.run(0.1)
        assert sim.ctl.counters.converged == 0, spread
        assert "not reached" in sim.ctl.reason and "fused target" in sim.ctl.reason, sim.ctl.reason
    for _ in range(20):
        sim.ctl.set_target_spread(sim.t, 0.001, 0.01)
        sim.run(0.1)
    assert sim.ctl.counters.converged == 1 and sim.ctl.state is ServoState.CONVERGED
    assert "fused target spread 1.0 mm" in sim.ctl.reason
    assert sim.ctl.status()["target_spread_linear_m"] == pytest.approx(0.001)


def test_stale_target_spread_is_ignored() -> None:
    sim = Sim()
    sim.enable()
    sim.ctl.set_target_spread(sim.t, 0.05, 0.5)  # once, then never again (per_frame guidance node)
    sim.guidance = guid([0.001, 0, 0])
    sim.run(2.0)
    assert sim.ctl.state is ServoState.CONVERGED


def test_reached_is_withdrawn_when_the_guidance_jumps_or_stops() -> None:
    """A reset of the target estimate (the patient moved, a plane switch) makes the guidance jump:
    the servo pauses and "plane reached" is withdrawn (plane_left), as when the guidance stops."""
    for change in ("jump", "timeout"):
        sim = Sim()
        sim.enable()
        sim.guidance = guid([0.001, 0, 0])
        sim.run(1.5)
        assert sim.ctl.state is ServoState.CONVERGED
        sim.guidance = guid([0.04, 0, 0]) if change == "jump" else None
        cmds = published(sim.run(0.5))
        assert any("plane_left" in c.events for c in cmds), change
        assert any(c.state is (ServoState.PAUSED if change == "jump" else ServoState.TIMEOUT) for c in cmds)
        assert cmds[-1].state is not ServoState.CONVERGED
        assert not any("plane_reached" in c.events for c in cmds)


class KinematicSim(Sim):
    """Integrates the commands into the probe pose; guidance from a 'model' of the pose."""

    def __init__(self, model, config: ServoConfig, start: np.ndarray) -> None:
        super().__init__(config, ProbePose(start))
        self.model = model

    def run(self, seconds: float) -> list[ServoCommand]:
        out = []
        for _ in range(int(round(seconds * RATE))):
            self.guidance = (*self.model(self.pose.T_mm), None)
            cmds = super().run(1.0 / RATE)
            c = cmds[-1]
            T = self.pose.T_mm.copy()
            T[:3, 3] += T[:3, :3] @ (c.linear_mps * DT * 1000.0)
            T[:3, :3] = T[:3, :3] @ rotvec_to_rotation(c.angular_rps * DT)
            self.pose = ProbePose(T)
            out += cmds
        return out


def _truth(target: np.ndarray):
    def model(T: np.ndarray):
        rel = np.linalg.solve(T, target)
        return rel[:3, 3] / 1000.0, rotation_to_rotvec(rel[:3, :3])
    return model


def test_final_approach_check_passes_a_consistent_guidance_and_stops_a_fixed_point() -> None:
    """verify_step_m: the true remaining motion passes the check and reaches the target; a model with a
    fixed point 12 mm off (guidance 1 mm wherever the probe is, i.e. its target moves with the probe)
    holds still, steady and small, but fails the check: never reached, and the status says why."""
    cfg = CFG.updated(verify_step_m=0.008)
    target = np.eye(4)
    target[:3, 3] = [300.0, 0.0, 400.0]
    start = target.copy()
    start[:3, 3] += [12.0, -5.0, 3.0]
    good = KinematicSim(_truth(target), cfg, start)
    good.enable()
    cmds = published(good.run(12.0))
    assert any("plane_reached" in c.events for c in cmds)
    assert good.ctl.counters.verify_passed == 1 and good.ctl.counters.verify_failed == 0
    assert np.linalg.norm(good.pose.T_mm[:3, 3] - target[:3, 3]) < 3.0
    assert "passed" in good.ctl.status()["final_approach_check"]
    # the probe stepped sideways by 8 mm and came back (the path shows the step)
    xs = [c.linear_mps[0] for c in cmds]
    assert max(xs) > 0.005

    stuck = KinematicSim(lambda T: (np.array([0.001, 0.0, 0.0]), np.zeros(3)), cfg, start)
    stuck.enable()
    cmds = published(stuck.run(20.0))
    assert not any("plane_reached" in c.events for c in cmds)
    assert stuck.ctl.counters.verify_failed == cfg.verify_attempts and stuck.ctl.counters.converged == 0
    assert "final-approach check failed" in stuck.ctl.reason and "moved" in stuck.ctl.reason
    # without the check the same fixed point is reported as reached
    old = KinematicSim(lambda T: (np.array([0.001, 0.0, 0.0]), np.zeros(3)), CFG, start)
    old.enable()
    assert any("plane_reached" in c.events for c in published(old.run(5.0)))


def test_final_approach_check_needs_the_probe_to_move() -> None:
    """A probe that does not follow the commands (a fixed pose) cannot be checked: not reached."""
    sim = Sim(CFG.updated(verify_step_m=0.008))
    sim.enable()
    sim.guidance = guid([0.001, 0, 0])
    cmds = published(sim.run(15.0))
    assert not any("plane_reached" in c.events for c in cmds)
    assert "moved only" in sim.ctl.reason, sim.ctl.reason
