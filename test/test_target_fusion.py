"""Target fusion (core, no ROS): synthetic per-frame estimates of one target pose in base_frame."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cardiac_copilot_ros import pose as pose_alg
from cardiac_copilot_ros.target_fusion import FusionConfig, TargetFusion, pose_residual

TARGET = pose_alg.action_to_matrix(np.array([400.0, -20.0, 250.0, 170.0, 10.0, -35.0]))


def _noisy_estimates(rng: np.random.Generator, n: int, sigma_mm: float, sigma_deg: float, rate_hz: float = 30.0,
                     t0: float = 0.0, target: np.ndarray = TARGET):
    """(stamp, probe pose, U(a)) with a probe wandering around the target and a noisy action."""
    out = []
    for k in range(n):
        probe = target @ pose_alg.action_to_matrix(np.concatenate([rng.uniform(-30, 30, 3), rng.uniform(-20, 20, 3)]))
        truth = pose_alg.relative_action(probe, target)
        noisy = truth + np.concatenate([rng.normal(0, sigma_mm, 3), rng.normal(0, sigma_deg, 3)])
        out.append((t0 + k / rate_hz, probe, pose_alg.action_to_matrix(noisy)))
    return out


def _feed(fusion: TargetFusion, estimates, key: object = "PLAX", scale=None):
    updates = [fusion.add(t, P, A, scale, key=key) for t, P, A in estimates]
    return updates


def test_single_estimate_is_itself_and_spread_unknown() -> None:
    f = TargetFusion()
    probe = TARGET @ pose_alg.action_to_matrix([10, 5, -3, 4, -2, 8])
    a = pose_alg.relative_action(probe, TARGET)
    up = f.add(0.0, probe, pose_alg.action_to_matrix(a), key="PLAX")
    assert up.accepted and up.reset is None
    d, phi = pose_residual(up.fused.T_mm, TARGET)
    assert d < 1e-9 and phi < 1e-6
    assert not up.fused.known and math.isinf(up.fused.spread_mm)


def test_converges_and_spread_shrinks_with_agreement() -> None:
    rng = np.random.default_rng(0)
    f = TargetFusion(FusionConfig(time_constant_s=100.0, window_s=100.0))
    ups = _feed(f, _noisy_estimates(rng, 90, sigma_mm=4.0, sigma_deg=4.0))
    assert all(u.accepted for u in ups)
    fused = ups[-1].fused
    d, phi = pose_residual(fused.T_mm, TARGET)
    # 90 independent estimates with 4 mm / 4 deg per axis: the mean is within ~1 mm / ~1 deg
    assert d < 2.0 and phi < 2.0
    single = [pose_residual(T @ A, TARGET) for _, T, A in _noisy_estimates(np.random.default_rng(1), 200, 4.0, 4.0)]
    assert d < np.median([s[0] for s in single]) / 3
    # the spread is the frames' scatter: about 4 mm / 4 deg per axis
    assert np.all((fused.std_mm > 2.5) & (fused.std_mm < 6.0)), fused.std_mm
    assert np.all((fused.std_deg > 2.5) & (fused.std_deg < 6.0)), fused.std_deg
    cov = fused.covariance
    assert cov.shape == (6, 6) and np.allclose(cov, cov.T)
    np.testing.assert_allclose(np.sqrt(np.diag(cov))[:3] * 1000.0, fused.std_mm)
    assert fused.n == 90 and 80 < fused.n_eff <= 90
    # tighter estimates -> smaller spread
    f2 = TargetFusion(FusionConfig(time_constant_s=100.0, window_s=100.0))
    tight = _feed(f2, _noisy_estimates(np.random.default_rng(0), 90, sigma_mm=1.0, sigma_deg=1.0))[-1].fused
    assert tight.spread_mm < fused.spread_mm / 2 and tight.spread_deg < fused.spread_deg / 2


def test_recency_forgets_early_large_errors() -> None:
    """Early estimates far off (20 mm bias), later ones accurate: recency weighting follows the late ones."""
    rng = np.random.default_rng(3)
    early = [(t, P, pose_alg.action_to_matrix(pose_alg.matrix_to_action(A) + [20, 0, 0, 0, 0, 0]))
             for t, P, A in _noisy_estimates(rng, 30, 1.0, 1.0)]
    late = _noisy_estimates(rng, 90, 1.0, 1.0, t0=1.0)
    recent = TargetFusion(FusionConfig(time_constant_s=0.5, gate_mm=100.0))
    plain = TargetFusion(FusionConfig(time_constant_s=1e6, window_s=1e6, gate_mm=100.0, robust_mm=1e6,
                                      robust_deg=1e6))
    d_recent = pose_residual(_feed(recent, early + late)[-1].fused.T_mm, TARGET)[0]
    d_plain = pose_residual(_feed(plain, early + late)[-1].fused.T_mm, TARGET)[0]
    assert d_plain > 3.0 and d_recent < 1.0, (d_plain, d_recent)


def test_uncertainty_weights_per_axis() -> None:
    """action_scale: an axis the model says it knows poorly weighs less on that axis only."""
    rng = np.random.default_rng(4)
    probe = TARGET @ pose_alg.action_to_matrix([0, 0, -40, 0, 0, 0])
    truth = pose_alg.relative_action(probe, TARGET)
    f_scaled, f_plain = TargetFusion(FusionConfig(gate_mm=1e3)), TargetFusion(FusionConfig(gate_mm=1e3))
    for k in range(60):
        good = k % 2 == 0
        # odd frames: x off by +-15 mm (and say so with b_x = 20 mm); y, z exact everywhere
        err_x = 0.0 if good else 15.0 * rng.choice([-1, 1]) + 10.0
        a = truth + [err_x, 0, 0, 0, 0, 0]
        scale = np.array([1.0 if good else 20.0, 1.0, 1.0, 1.0, 1.0, 1.0])
        f_scaled.add(k / 30, probe, pose_alg.action_to_matrix(a), scale, key=0)
        f_plain.add(k / 30, probe, pose_alg.action_to_matrix(a), None, key=0)
    x_err = lambda f: abs((pose_alg.invert(probe) @ f.fused.T_mm)[0, 3] - truth[0])  # noqa: E731
    assert x_err(f_scaled) < 1.0 < x_err(f_plain)
    with pytest.raises(ValueError):
        f_scaled.add(3.0, probe, pose_alg.action_to_matrix(truth), np.ones(5), key=0)


def test_rejects_outliers_without_moving() -> None:
    rng = np.random.default_rng(5)
    f = TargetFusion()
    ests = _noisy_estimates(rng, 60, 2.0, 2.0)
    for k in range(10, 60, 10):  # every tenth frame 60 mm / 50 deg off
        t, P, A = ests[k]
        ests[k] = (t, P, A @ pose_alg.action_to_matrix([60, -20, 10, 50, 0, 0]))
    ups = _feed(f, ests)
    rejected = [k for k, u in enumerate(ups) if not u.accepted]
    assert rejected == list(range(10, 60, 10))
    assert f.counters.outliers == 5 and f.counters.resets == 0
    d, phi = pose_residual(f.fused.T_mm, TARGET)
    assert d < 2.0 and phi < 2.0


def test_reset_on_key_change() -> None:
    """A plane switch: the old plane's estimates are forgotten at once."""
    rng = np.random.default_rng(6)
    f = TargetFusion()
    _feed(f, _noisy_estimates(rng, 30, 2.0, 2.0), key="PLAX")
    other = TARGET @ pose_alg.action_to_matrix([50, 0, 20, 0, 60, 0])
    ups = _feed(f, _noisy_estimates(rng, 5, 2.0, 2.0, t0=1.0, target=other), key="PSAX-AV")
    assert ups[0].reset == "key changed" and ups[0].accepted and ups[0].fused.n == 1
    assert f.counters.resets_key == 1
    assert pose_residual(f.fused.T_mm, other)[0] < 5.0
    assert f.key == "PSAX-AV"


def test_reset_on_gap_and_on_request() -> None:
    rng = np.random.default_rng(7)
    f = TargetFusion(FusionConfig(max_gap_s=1.0))
    _feed(f, _noisy_estimates(rng, 30, 2.0, 2.0))
    up = _feed(f, _noisy_estimates(rng, 1, 2.0, 2.0, t0=1.0 + 2.5))[0]
    assert up.reset is not None and "gap" in up.reset and up.fused.n == 1
    assert f.counters.resets_gap == 1
    f.reset()
    assert f.fused is None and f.counters.resets_requested == 1
    f.reset("plane switch", key_change=True)
    assert f.counters.resets_key == 1 and f.last_reset == "plane switch"


def test_reset_on_persistent_disagreement_patient_moved() -> None:
    """The target jumps 40 mm / 20 deg (the patient moved): a few estimates are rejected, then the
    fusion restarts from the new ones and follows the new target."""
    rng = np.random.default_rng(8)
    cfg = FusionConfig()
    f = TargetFusion(cfg)
    _feed(f, _noisy_estimates(rng, 60, 2.0, 2.0))
    moved = TARGET @ pose_alg.action_to_matrix([40, 0, 0, 0, 20, 0])
    ups = _feed(f, _noisy_estimates(rng, 30, 2.0, 2.0, t0=2.0, target=moved))
    first_accepted = next(k for k, u in enumerate(ups) if u.accepted)
    assert first_accepted == cfg.reset_after_outliers - 1
    assert ups[first_accepted].reset is not None and "disagree" in ups[first_accepted].reset
    assert f.counters.resets_disagreement == 1
    # the restart keeps the rejected estimates that agree with each other
    assert ups[first_accepted].fused.n == cfg.reset_after_outliers
    d, phi = pose_residual(f.fused.T_mm, moved)
    assert d < 2.5 and phi < 2.5
    # while it was rejecting, the fused estimate still said the old target (not a mixture)
    assert pose_residual(ups[0].fused.T_mm, TARGET)[0] < 2.5


def test_alternating_estimates_have_a_large_spread() -> None:
    """+-7 mm / +-0.12 rad alternating every frame: the fused pose is in the middle and the
    spread says the frames disagree by about that much."""
    probe = TARGET @ pose_alg.action_to_matrix([0, 0, -30, 0, 0, 0])
    truth = pose_alg.relative_action(probe, TARGET)
    f = TargetFusion()
    for k in range(60):
        s = 1.0 if k % 2 else -1.0
        a = truth + [7.0 * s, 0, 0, math.degrees(0.12) * s, 0, 0]
        assert f.add(k / 30, probe, pose_alg.action_to_matrix(a), key=0).accepted
    fused = f.fused
    d, phi = pose_residual(fused.T_mm, TARGET)
    assert d < 1.0 and phi < 1.0
    assert 6.0 < fused.spread_mm < 8.0 and 6.0 < fused.spread_deg < 8.0


def test_window_bounds_memory() -> None:
    rng = np.random.default_rng(9)
    f = TargetFusion(FusionConfig(window_s=1.0, max_estimates=20))
    _feed(f, _noisy_estimates(rng, 100, 1.0, 1.0))
    assert f.fused.n <= 20


@pytest.mark.parametrize("changes", [{"time_constant_s": 0.0}, {"min_estimates": 2.5}, {"gate_mm": math.nan},
                                     {"nope": 1.0}, {"min_estimates": 500}])
def test_invalid_config(changes: dict) -> None:
    with pytest.raises(ValueError):
        FusionConfig().updated(**changes)
