"""Property tests of the pose algebra (pose.py) against transforms3d and itself."""

from __future__ import annotations

import numpy as np
import pytest
import transforms3d.euler as t3e
import transforms3d.quaternions as t3q
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cardiac_copilot_ros import pose as P

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
angles = st.floats(-180.0, 180.0, allow_nan=False, allow_infinity=False)


@st.composite
def actions(draw, n: int | None = None):
    shape = (6,) if n is None else (n, 6)
    trans = draw(arrays(np.float64, shape[:-1] + (3,), elements=st.floats(-200, 200)))
    rot = draw(arrays(np.float64, shape[:-1] + (3,), elements=angles))
    return np.concatenate([trans, rot], axis=-1)


@st.composite
def poses(draw):
    return P.action_to_matrix(draw(actions()))


def assert_same_transform(A, B, atol=1e-9):
    np.testing.assert_allclose(A, B, atol=atol, rtol=0)


def test_euler_convention_is_static_xyz():
    assert P.EULER_AXES == "sxyz"
    a = np.array([0.0, 0.0, 0.0, 10.0, 20.0, 30.0])
    expected = t3e.euler2mat(*np.deg2rad(a[3:]), axes=P.EULER_AXES)
    assert_same_transform(P.action_to_matrix(a)[:3, :3], expected)


@settings(max_examples=200, deadline=None)
@given(actions())
def test_matches_transforms3d(a):
    R = t3e.euler2mat(*np.deg2rad(a[3:]), axes=P.EULER_AXES)
    T = P.action_to_matrix(a)
    assert_same_transform(T[:3, :3], R)
    np.testing.assert_allclose(T[:3, 3], a[:3], atol=1e-12)
    np.testing.assert_allclose(T[3], [0, 0, 0, 1])
    # inverse map agrees with transforms3d's mat2euler as a rotation (angles may differ by symmetry)
    rpy = np.rad2deg(t3e.mat2euler(R, axes=P.EULER_AXES))
    assert_same_transform(P.euler_to_rotation(rpy), P.euler_to_rotation(P.rotation_to_euler(R)))


@settings(max_examples=200, deadline=None)
@given(actions())
def test_round_trip_matrix_action_matrix(a):
    T = P.action_to_matrix(a)
    assert_same_transform(P.action_to_matrix(P.matrix_to_action(T)), T)


@settings(max_examples=200, deadline=None)
@given(st.floats(-89.0, 89.0), st.floats(-179.0, 179.0), st.floats(-179.0, 179.0), finite, finite, finite)
def test_round_trip_action_matrix_action_regular(pitch, roll, yaw, x, y, z):
    a = np.array([x, y, z, roll, pitch, yaw])
    np.testing.assert_allclose(P.matrix_to_action(P.action_to_matrix(a)), a, atol=1e-7)


@pytest.mark.parametrize("pitch", [90.0, -90.0, 90.0 - 1e-9, -90.0 + 1e-12])
@pytest.mark.parametrize("roll,yaw", [(0.0, 0.0), (30.0, -40.0), (179.0, 179.0)])
def test_singularity_is_finite_and_consistent(pitch, roll, yaw):
    a = np.array([1.0, 2.0, 3.0, roll, pitch, yaw])
    T = P.action_to_matrix(a)
    back = P.matrix_to_action(T)
    assert np.all(np.isfinite(back))
    assert_same_transform(P.action_to_matrix(back), T, atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(poses())
def test_invert(T):
    assert_same_transform(P.invert(T) @ T, np.eye(4))
    assert_same_transform(P.invert(T), np.linalg.inv(T), atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(actions(), actions(), actions())
def test_composition_is_associative(a, b, c):
    left = P.compose_actions(P.compose_actions(a, b), c)
    right = P.compose_actions(a, P.compose_actions(b, c))
    assert_same_transform(P.action_to_matrix(left), P.action_to_matrix(right), atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(poses(), poses(), poses())
def test_relative_compose_consistency(A, B, C):
    ab = P.relative_action(A, B)
    bc = P.relative_action(B, C)
    ac = P.relative_action(A, C)
    assert_same_transform(P.action_to_matrix(P.compose_actions(ab, bc)), P.action_to_matrix(ac), atol=1e-7)
    # applying the relative action from A reaches B
    assert_same_transform(P.apply_action(A, ab), B, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(actions(n=5))
def test_vectorised_over_leading_axes(a):
    T = P.action_to_matrix(a)
    assert T.shape == (5, 4, 4)
    for i in range(5):
        assert_same_transform(T[i], P.action_to_matrix(a[i]))
    a2 = a.reshape(5, 1, 6)
    assert P.matrix_to_action(P.action_to_matrix(a2)).shape == (5, 1, 6)
    rel = P.relative_action(T[:-1], T[1:])
    assert rel.shape == (4, 6)


@settings(max_examples=200, deadline=None)
@given(actions())
def test_quaternions_match_transforms3d(a):
    R = P.action_to_matrix(a)[:3, :3]
    q_xyzw = P.rotation_to_quat(R)
    wxyz = t3q.mat2quat(R)
    # same rotation up to sign
    assert min(np.abs(q_xyzw - np.roll(wxyz, -1)).max(), np.abs(q_xyzw + np.roll(wxyz, -1)).max()) < 1e-9
    assert_same_transform(P.quat_to_rotation(q_xyzw), R)


@settings(max_examples=200, deadline=None)
@given(actions())
def test_rotation_vector_round_trip(a):
    R = P.action_to_matrix(a)[:3, :3]
    v = P.rotation_to_rotvec(R)
    assert np.linalg.norm(v) <= np.pi + 1e-9
    assert_same_transform(P.rotvec_to_rotation(v), R, atol=1e-8)


def test_rotation_vector_near_pi_and_zero():
    for angle in (0.0, 1e-14, 1e-7, np.pi - 1e-9, np.pi):
        axis = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
        R = P.rotvec_to_rotation(axis * angle)
        assert_same_transform(P.rotvec_to_rotation(P.rotation_to_rotvec(R)), R, atol=1e-8)


@settings(max_examples=100, deadline=None)
@given(actions())
def test_twist_round_trip(a):
    lin, ang = P.action_to_twist(a)
    np.testing.assert_allclose(lin, a[:3] / 1000.0, atol=1e-12)
    back = P.twist_to_action(lin, ang)
    assert_same_transform(P.action_to_matrix(back), P.action_to_matrix(a), atol=1e-8)


@settings(max_examples=100, deadline=None)
@given(poses())
def test_ros_pose_round_trip_metres(T):
    pos_m, q = P.matrix_to_pose(T)
    np.testing.assert_allclose(pos_m * 1000.0, T[:3, 3], atol=1e-9)
    assert_same_transform(P.pose_to_matrix(pos_m, q), T)


def test_pose_to_matrix_normalises_and_rejects_bad_quaternions():
    T = P.pose_to_matrix([0.1, 0.2, 0.3], [0.0, 0.0, 0.0, 2.0])
    assert_same_transform(T[:3, :3], np.eye(3))
    np.testing.assert_allclose(T[:3, 3], [100.0, 200.0, 300.0])
    for bad in ([0, 0, 0, 0], [np.nan, 0, 0, 1], [np.inf, 0, 0, 1]):
        with pytest.raises(ValueError):
            P.pose_to_matrix([0, 0, 0], bad)


def test_pose_error_geodesic():
    A = P.action_to_matrix([0, 0, 0, 0, 0, 0])
    B = P.action_to_matrix([3, 4, 0, 0, 0, 30])
    dist, ang = P.pose_error(A, B)
    assert dist == pytest.approx(5.0)
    assert ang == pytest.approx(30.0)


def test_interpolate_poses_linear_and_slerp():
    stamps = np.array([0, 100, 200], dtype=np.int64)
    T = P.action_to_matrix(np.array([[0, 0, 0, 0, 0, 0], [10, 0, 0, 0, 0, 40], [20, 0, 0, 0, 0, 80.0]]))
    pos, q = P.matrix_to_pose(T)
    qp, qq, valid = P.interpolate_poses(np.array([-5, 0, 50, 150, 200, 250]), stamps, pos, q, max_gap_ns=150)
    assert valid.tolist() == [False, True, True, True, True, False]
    np.testing.assert_allclose(qp[2] * 1000, [5, 0, 0], atol=1e-12)
    yaw = P.rotation_to_euler(P.quat_to_rotation(qq))[:, 2]
    np.testing.assert_allclose(yaw[1:5], [0, 20, 60, 80], atol=1e-9)
    _, _, valid = P.interpolate_poses(np.array([50]), stamps, pos, q, max_gap_ns=50)
    assert not valid[0]


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        P.action_to_matrix(np.zeros(5))
    with pytest.raises(ValueError):
        P.matrix_to_action(np.eye(3))
