"""The final-approach survey (cardiac_copilot_ros.final_approach, ServoController ``survey_poses``): the
servo reads the target from poses around where the loop came to rest, goes to their robust mean, and
reports "plane reached" only if they agreed. Fast and deterministic (a kinematic probe, no ROS)."""

from __future__ import annotations

import numpy as np
import pytest
from test_servo_law import CFG, published
from test_servo_stability import KinematicSim

from cardiac_copilot_ros.final_approach import SURVEY_SIZES, survey_offsets, survey_target
from cardiac_copilot_ros.pose import action_to_matrix, rotation_to_rotvec
from cardiac_copilot_ros.servo import ServoState
from cardiac_copilot_ros.target_fusion import pose_residual

TARGET = np.eye(4)
TARGET[:3, 3] = [300.0, 0.0, 400.0]
START = TARGET @ action_to_matrix([14.0, -6.0, 2.0, 5.0, -4.0, 3.0])


@pytest.mark.parametrize("n", SURVEY_SIZES)
def test_survey_design_is_balanced(n: int) -> None:
    """Every axis is visited on both sides equally often (its first-order bias cancels in the mean)."""
    o = survey_offsets(n, 6.0, 5.0)
    assert o.shape == (n, 6)
    np.testing.assert_allclose(o.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.abs(o), np.broadcast_to([6, 6, 2, 5, 5, 5], (n, 6)))
    assert len({tuple(np.sign(r)) for r in o}) == n   # n distinct poses
    with pytest.raises(ValueError, match="survey size"):
        survey_offsets(5, 6.0, 5.0)


def test_survey_target_is_robust_and_reports_scatter() -> None:
    rng = np.random.default_rng(0)
    ests = [TARGET @ action_to_matrix(np.r_[rng.normal(0, 1.0, 3), rng.normal(0, 1.0, 3)]) for _ in range(11)]
    ests.append(TARGET @ action_to_matrix([40.0, 0, 0, 30.0, 0, 0]))   # one wild estimate
    st = survey_target(ests)
    assert np.linalg.norm(st.T_mm[:3, 3] - TARGET[:3, 3]) < 1.5
    assert np.degrees(np.linalg.norm(rotation_to_rotvec(st.T_mm[:3, :3] @ TARGET[:3, :3].T))) < 1.5
    assert 2.0 < st.spread_mm < 20.0 and st.n == 12
    assert survey_target([TARGET] * 3).spread_mm == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        survey_target([])
    with pytest.raises(ValueError):
        survey_target([np.full((4, 4), np.nan)])


def _biased(target: np.ndarray, bump_mm: float = 4.0, width_mm: float = 2.5):
    """A 'model': the true remaining motion plus a bias bump. Near target + bump (x) its implied target
    is that pose itself (a spurious fixed point, bump_mm off); a few mm away the bias fades."""
    centre = target[:3, 3] + target[:3, :3] @ np.array([bump_mm, 0.0, 0.0])

    def model(T: np.ndarray):
        w = float(np.exp(-np.sum((T[:3, 3] - centre) ** 2) / (2 * width_mm ** 2)))
        implied = target.copy()
        implied[:3, 3] = target[:3, 3] + w * (T[:3, 3] - target[:3, 3])
        rel = np.linalg.solve(T, implied)
        return rel[:3, 3] / 1000.0, rotation_to_rotvec(rel[:3, :3])
    return model


def test_survey_moves_off_a_spurious_fixed_point_and_reaches_the_plane() -> None:
    """Without the survey the servo reports "plane reached" at the fixed point 4 mm off; with a 4-pose
    survey it reads the target around it, goes to their mean (near the truth) and reports reached there."""
    plain = KinematicSim(_biased(TARGET), CFG, START)
    plain.enable()
    assert any("plane_reached" in c.events for c in published(plain.run(12.0)))
    assert np.linalg.norm(plain.pose.T_mm[:3, 3] - TARGET[:3, 3]) > 3.0

    cfg = CFG.updated(survey_poses=4)
    sim = KinematicSim(_biased(TARGET), cfg, START)
    sim.enable()
    cmds = published(sim.run(25.0))
    assert [e for c in cmds for e in c.events].count("plane_reached") == 1
    assert sim.ctl.state == ServoState.CONVERGED and "surveyed target" in sim.ctl.reason
    assert np.linalg.norm(sim.pose.T_mm[:3, 3] - TARGET[:3, 3]) < 2.0
    assert sim.ctl.counters.surveys_passed == 1 and sim.ctl.counters.surveys_failed == 0
    assert sim.ctl.status()["final_approach_survey"].startswith("passed")
    # the probe visited the survey poses: it moved sideways by about the survey step and back
    assert max(abs(c.linear_mps[1]) for c in cmds) > 0.004


def _pose_when_reached(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The probe pose when "plane_reached" is published after a passed survey, and where it rests later (the
    surveyed target: the servo holds it)."""
    sim = KinematicSim(_biased(TARGET), cfg, START)
    sim.enable()
    at = None
    for _ in range(500):
        if any("plane_reached" in c.events for c in published(sim.run(0.05))) and at is None:
            at = sim.pose.T_mm.copy()
    assert at is not None and sim.ctl.state == ServoState.CONVERGED
    return at, sim.pose.T_mm


def test_plane_reached_after_a_survey_waits_until_the_probe_is_at_the_surveyed_target() -> None:
    """survey_reached_m / _rad: "plane reached" is said of the probe, so after a passed survey it waits until the
    probe is that close to the surveyed target, not merely within the convergence tolerance of it."""
    cfg = CFG.updated(survey_poses=4, converge_linear_m=0.003, converge_angular_rad=0.05)
    loose_at, loose_rest = _pose_when_reached(cfg)
    tight_at, tight_rest = _pose_when_reached(cfg.updated(survey_reached_m=0.0003, survey_reached_rad=0.005))
    assert np.allclose(loose_rest, tight_rest, atol=0.05)   # the same surveyed target either way
    loose_mm, loose_deg = pose_residual(loose_at, loose_rest)
    tight_mm, tight_deg = pose_residual(tight_at, tight_rest)
    assert tight_mm < 0.35 and tight_deg < 0.35
    assert loose_mm > 2 * tight_mm or loose_deg > 2 * tight_deg, (loose_mm, loose_deg, tight_mm, tight_deg)
    with pytest.raises(ValueError, match="survey_reached_m"):
        cfg.updated(survey_reached_m=-0.001)


def test_survey_with_scattered_estimates_never_reports_reached() -> None:
    """Estimates that disagree from pose to pose (scatter beyond the tolerance): the servo holds at
    their mean, never reports reached, and the status says why."""
    def scattered(T: np.ndarray):
        p = T[:3, 3] - TARGET[:3, 3]
        implied = TARGET.copy()
        implied[:3, 3] += 6.0 * np.sign(np.sin(p / 3.0))   # +-6 mm per axis, changing every 3 mm
        rel = np.linalg.solve(T, implied)
        return rel[:3, 3] / 1000.0, rotation_to_rotvec(rel[:3, :3])

    cfg = CFG.updated(survey_poses=4, survey_attempts=2)
    sim = KinematicSim(scattered, cfg, START)
    sim.enable()
    cmds = published(sim.run(40.0))
    assert not any("plane_reached" in c.events for c in cmds)
    assert sim.ctl.counters.surveys_failed == 2 and sim.ctl.counters.converged == 0
    assert "not reached" in sim.ctl.reason and "scatter" in sim.ctl.reason, sim.ctl.reason


def test_surveyed_target_is_left_when_the_target_moves() -> None:
    """Reached at the surveyed target; the patient moves (the target jumps 30 mm): the servo leaves the
    plane, follows the guidance again and reaches the new target after a new survey."""
    target = {"T": TARGET.copy()}

    def truth(T: np.ndarray):
        rel = np.linalg.solve(T, target["T"])
        return rel[:3, 3] / 1000.0, rotation_to_rotvec(rel[:3, :3])

    sim = KinematicSim(truth, CFG.updated(survey_poses=4), START)
    sim.enable()
    first = published(sim.run(25.0))
    assert any("plane_reached" in c.events for c in first)
    target["T"] = TARGET @ action_to_matrix([0.0, 30.0, 0.0, 0.0, 0.0, 0.0])
    cmds = published(sim.run(40.0))
    events = [e for c in cmds for e in c.events]
    assert events[0] == "plane_left" and "plane_reached" in events
    assert sim.ctl.counters.surveys_passed == 2
    assert np.linalg.norm(sim.pose.T_mm[:3, 3] - target["T"][:3, 3]) < 2.0


def test_looser_arrival_tolerance_surveys_faster_and_still_reaches() -> None:
    """survey_arrive_m / _rad: a survey pose counts as reached sooner; the reads use the pose actually
    reached, so the surveyed target is as good and the whole survey takes less time."""
    def truth(T: np.ndarray):
        rel = np.linalg.solve(T, TARGET)
        return rel[:3, 3] / 1000.0, rotation_to_rotvec(rel[:3, :3])

    times = {}
    for arrive_m, arrive_rad in ((0.001, 0.02), (0.003, 0.06)):
        sim = KinematicSim(truth, CFG.updated(survey_poses=4, survey_arrive_m=arrive_m,
                                              survey_arrive_rad=arrive_rad), START)
        sim.enable()
        cmds = published(sim.run(25.0))
        reached = [i for i, c in enumerate(cmds) if "plane_reached" in c.events]
        assert len(reached) == 1 and sim.ctl.counters.surveys_passed == 1
        assert np.linalg.norm(sim.pose.T_mm[:3, 3] - TARGET[:3, 3]) < 2.0
        times[arrive_m] = reached[0]
    assert times[0.003] < 0.9 * times[0.001], times


def test_survey_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="survey_poses"):
        CFG.updated(survey_poses=5)
    with pytest.raises(ValueError, match="survey"):
        CFG.updated(survey_poses=4, survey_read_s=0.0)
    with pytest.raises(ValueError, match="survey_arrive_m"):
        CFG.updated(survey_poses=4, survey_arrive_m=0.0)
    assert CFG.updated(survey_poses=8).survey_poses == 8


class FrameTargetSim(KinematicSim):
    """A kinematic probe whose guidance node also publishes each frame's own target estimate
    (``frame_target_pose``): ``frame_model(T)`` -> base-frame target estimate (4x4, mm) or None."""

    def __init__(self, model, frame_model, config, start: np.ndarray) -> None:
        super().__init__(model, config, start)
        self.frame_model = frame_model

    def run(self, seconds: float):
        out = []
        for _ in range(int(round(seconds * 100))):   # one frame estimate per control period
            T = self.frame_model(self.pose.T_mm)
            if T is not None:
                assert self.ctl.set_frame_target(self.t, T)
            out += super().run(0.01)
        return out


def _truth(T: np.ndarray):
    rel = np.linalg.solve(T, TARGET)
    return rel[:3, 3] / 1000.0, rotation_to_rotvec(rel[:3, :3])


def _frame_estimates(spread_mm: float):
    """Per-frame estimates of the true target that depend on the pose (a model's pose-dependent bias):
    +-spread_mm per axis, the sign changing every 3 mm of probe motion."""
    def frame(T: np.ndarray) -> np.ndarray:
        est = TARGET.copy()
        est[:3, 3] += spread_mm * np.sign(np.sin((T[:3, 3] - TARGET[:3, 3]) / 3.0 + 0.5))
        return est
    return frame


def test_frame_target_gate_reports_reached_only_when_the_frame_estimates_agree() -> None:
    """survey_gate frame_target: the guidance (here the truth, as smooth as a fused target) agrees at
    every survey pose, but "plane reached" is decided by the per-frame estimates read there: agreeing
    ones (within 0.3 mm) pass; ones that disagree by +-6 mm from pose to pose fail and the servo holds
    at the surveyed target, not reached, saying why."""
    cfg = CFG.updated(survey_poses=4, survey_gate="frame_target")
    ok = FrameTargetSim(_truth, _frame_estimates(0.3), cfg, START)
    ok.enable()
    cmds = published(ok.run(25.0))
    assert [e for c in cmds for e in c.events].count("plane_reached") == 1
    result = ok.ctl.status()["final_approach_survey"]
    assert result.startswith("passed") and "per-frame estimates scatter" in result, result

    bad = FrameTargetSim(_truth, _frame_estimates(6.0), cfg, START)
    bad.enable()
    cmds = published(bad.run(25.0))
    assert not any("plane_reached" in c.events for c in cmds)
    assert bad.ctl.counters.surveys_failed == 1 and bad.ctl.counters.converged == 0
    assert "not reached" in bad.ctl.reason and "per-frame estimates scatter" in bad.ctl.reason, bad.ctl.reason
    # it still holds where the guidance's survey put it: the true target
    assert np.linalg.norm(bad.pose.T_mm[:3, 3] - TARGET[:3, 3]) < 2.0
    # the same disagreeing frame estimates are not looked at with the default gate (the guidance's scatter)
    plain = FrameTargetSim(_truth, _frame_estimates(6.0), cfg.updated(survey_gate="guidance"), START)
    plain.enable()
    assert any("plane_reached" in c.events for c in published(plain.run(25.0)))


def test_frame_target_gate_without_frame_estimates_is_not_reached() -> None:
    """survey_gate frame_target but no frame_target_pose (an older guidance node): each survey pose waits
    a little for one, then the survey fails and says what was missing; never "plane reached"."""
    sim = FrameTargetSim(_truth, lambda T: None, CFG.updated(survey_poses=4, survey_gate="frame_target"), START)
    sim.enable()
    cmds = published(sim.run(30.0))
    assert not any("plane_reached" in c.events for c in cmds)
    assert sim.ctl.counters.surveys_failed == 1
    assert "frame_target_pose" in sim.ctl.reason and "at 0 of the 4 poses" in sim.ctl.reason, sim.ctl.reason


def test_frame_target_input_and_gate_setting_are_validated() -> None:
    sim = FrameTargetSim(_truth, lambda T: None, CFG.updated(survey_poses=4, survey_gate="frame_target"), START)
    for bad in (np.full((4, 4), np.nan), np.eye(3), 2.0 * np.eye(4)):
        assert not sim.ctl.set_frame_target(0.0, bad)
    assert sim.ctl.counters.rejected_other == 3
    assert sim.ctl.set_frame_target(0.0, TARGET)
    with pytest.raises(ValueError, match="survey_gate"):
        CFG.updated(survey_gate="fused")


def _sim_by_survey(cfg, spreads_mm: tuple[float, ...]) -> FrameTargetSim:
    """A FrameTargetSim whose per-frame estimates scatter ``spreads_mm[k]`` during the servo's survey
    ``k`` (counted by its failed surveys; the last value from then on)."""
    sim = FrameTargetSim(_truth, None, cfg, START)
    models = [_frame_estimates(s) for s in spreads_mm]
    sim.frame_model = lambda T: models[min(sim.ctl.counters.surveys_failed, len(models) - 1)](T)
    return sim


def test_pooled_second_survey_is_judged_over_both_surveys() -> None:
    """survey_attempts 2 with the frame_target gate: the first survey's per-frame estimates disagree
    (+-6 mm), the second's agree (+-0.3 mm). Judged on its own the second survey passes: one lucky draw
    is enough for "plane reached" (offline, session 7: 5 false of 108 starts). With survey_pool it is
    judged over the 8 estimates of both surveys, and the servo holds there, not reached, saying so."""
    cfg = CFG.updated(survey_poses=4, survey_gate="frame_target", survey_attempts=2)
    fresh = _sim_by_survey(cfg, (6.0, 0.3))
    fresh.enable()
    cmds = published(fresh.run(40.0))
    assert [e for c in cmds for e in c.events].count("plane_reached") == 1
    assert fresh.ctl.counters.surveys_failed == 1 and fresh.ctl.counters.surveys_passed == 1
    assert "the 4 per-frame estimates scatter" in fresh.ctl.status()["final_approach_survey"]

    pooled = _sim_by_survey(cfg.updated(survey_pool=True), (6.0, 0.3))
    pooled.enable()
    cmds = published(pooled.run(40.0))
    assert not any("plane_reached" in c.events for c in cmds)
    assert pooled.ctl.counters.surveys_failed == 2 and pooled.ctl.counters.converged == 0
    reason = pooled.ctl.reason
    assert "not reached" in reason and "the 8 per-frame estimates of 2 surveys scatter" in reason, reason
    # the probe still holds at the surveyed target (the mean of all 8 guidance reads: here the truth)
    assert np.linalg.norm(pooled.pose.T_mm[:3, 3] - TARGET[:3, 3]) < 2.0


def test_pooled_surveys_pass_when_all_agree_and_pool_is_validated() -> None:
    """Agreeing estimates pass at the first survey whether or not surveys pool (nothing to pool yet);
    survey_pool must be a bool."""
    sim = _sim_by_survey(CFG.updated(survey_poses=4, survey_gate="frame_target", survey_attempts=2,
                                     survey_pool=True), (0.3,))
    sim.enable()
    assert [e for c in published(sim.run(25.0)) for e in c.events].count("plane_reached") == 1
    assert sim.ctl.counters.surveys_passed == 1 and sim.ctl.counters.surveys_failed == 0
    with pytest.raises(ValueError, match="survey_pool"):
        CFG.updated(survey_pool="yes")
