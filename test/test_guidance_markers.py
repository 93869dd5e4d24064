"""Guidance markers: geometry in the probe frame (m), lifetimes, text with the 6 numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy not installed")

from visualization_msgs.msg import Marker

from cardiac_copilot_ros import pose as pose_alg
from cardiac_copilot_ros.nodes.guidance_node import build_markers, format_action


def _by_id(action, **kw):
    arr = build_markers(np.asarray(action, float), 1_000_000_123, "us_probe", 0.75, "PSAX-AV", True, **kw)
    return {m.id: m for m in arr.markers}


def test_translation_arrow_and_outline_for_pure_translation() -> None:
    m = _by_id([10.0, -20.0, 30.0, 0, 0, 0], plane_size_m=(0.04, 0.1))
    arrow = m[0]
    assert arrow.type == Marker.ARROW and arrow.header.frame_id == "us_probe"
    assert (arrow.points[0].x, arrow.points[0].y, arrow.points[0].z) == (0.0, 0.0, 0.0)
    np.testing.assert_allclose([arrow.points[1].x, arrow.points[1].y, arrow.points[1].z], [0.01, -0.02, 0.03])
    outline = m[3]
    pts = np.array([[p.x, p.y, p.z] for p in outline.points])
    assert len(pts) == 5 and np.allclose(pts[0], pts[-1])
    np.testing.assert_allclose(pts[:, 1], -0.02)                       # the image plane y = 0, shifted
    np.testing.assert_allclose(pts[:, 0].max() - pts[:, 0].min(), 0.04)
    np.testing.assert_allclose(pts[:, 2].max() - pts[:, 2].min(), 0.10)
    # no rotation: the rotation cue is deleted, not drawn with a degenerate arc
    assert m[1].action == Marker.DELETE and m[2].action == Marker.DELETE


def test_rotation_arc_spans_the_angle_about_the_axis() -> None:
    action = np.array([0, 0, 0, 0, 0, 40.0])   # yaw 40 deg: about z
    m = _by_id(action)
    arc = m[1]
    assert arc.action == Marker.ADD and arc.type == Marker.LINE_STRIP
    pts = np.array([[p.x, p.y, p.z] for p in arc.points])
    np.testing.assert_allclose(pts[:, 2], 0.0, atol=1e-12)            # in the plane normal to z
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 0.03)
    a0, a1 = pts[0] / 0.03, pts[-1] / 0.03
    assert math.degrees(math.acos(np.clip(a0 @ a1, -1, 1))) == pytest.approx(40.0, abs=1e-6)
    assert np.cross(a0, a1)[2] > 0                                     # counter-clockwise about +z
    head = m[2]
    assert head.type == Marker.ARROW and len(head.points) == 2


def test_outline_follows_target_pose() -> None:
    action = np.array([5.0, 0.0, 12.0, 10.0, -15.0, 25.0])
    m = _by_id(action, plane_size_m=(0.02, 0.05))
    pts = np.array([[p.x, p.y, p.z] for p in m[3].points])
    T = pose_alg.action_to_matrix(action)
    T[:3, 3] /= 1000.0
    corner = T @ np.array([-0.01, 0, 0, 1])
    np.testing.assert_allclose(pts[0], corner[:3], atol=1e-12)


def test_text_lifetime_and_stamp() -> None:
    action = np.array([1.25, -2.5, 3.75, 4.0, -5.0, 6.0])
    m = _by_id(action)
    assert "PSAX-AV (Dreamer)" in m[4].text and format_action(action) in m[4].text
    assert "x +1.2" in m[4].text or "x +1.3" in m[4].text
    for marker in m.values():
        assert marker.lifetime.sec == 0 and marker.lifetime.nanosec == 750_000_000
        assert marker.header.stamp.sec == 1 and marker.header.stamp.nanosec == 123
        assert marker.ns == "guidance"
