"""Message adapters: poses, transforms, twists and images round-trip in ROS units."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy not installed")

from geometry_msgs.msg import Pose, Quaternion, TwistStamped
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image

from cardiac_copilot_ros import pose as pose_alg
from cardiac_copilot_ros.nodes import conversions as conv

ACTIONS = np.array([
    [0, 0, 0, 0, 0, 0],
    [12.5, -3.0, 40.0, 10.0, -20.0, 30.0],
    [-100.0, 55.0, -7.0, 170.0, 80.0, -120.0],
    [1e-3, 0, 0, 0.01, 0, 0],
])


@pytest.mark.parametrize("action", ACTIONS)
def test_pose_roundtrip_mm_to_m(action: np.ndarray) -> None:
    T = pose_alg.action_to_matrix(action)
    msg = conv.matrix_to_pose_stamped(T, 1_500_000_123, "panda_link0")
    assert msg.header.frame_id == "panda_link0"
    assert conv.stamp_to_ns(msg.header.stamp) == 1_500_000_123
    assert msg.pose.position.x == pytest.approx(T[0, 3] / 1000.0)
    msg2 = deserialize_message(serialize_message(msg), type(msg))
    stamp, T2 = conv.pose_stamped_to_matrix(msg2)
    assert stamp == 1_500_000_123
    np.testing.assert_allclose(T2, T, atol=1e-9)


@pytest.mark.parametrize("action", ACTIONS)
def test_transform_roundtrip(action: np.ndarray) -> None:
    T = pose_alg.action_to_matrix(action)
    tf = conv.matrix_to_transform_stamped(T, 42, "panda_link0", "us_probe_target")
    assert tf.child_frame_id == "us_probe_target" and tf.header.frame_id == "panda_link0"
    np.testing.assert_allclose(conv.transform_msg_to_matrix(tf.transform), T, atol=1e-9)


@pytest.mark.parametrize("action", ACTIONS)
def test_twist_roundtrip_and_units(action: np.ndarray) -> None:
    msg = conv.action_to_twist_stamped(action, 7, "us_probe")
    assert isinstance(msg, TwistStamped) and msg.header.frame_id == "us_probe"
    assert msg.twist.linear.x == pytest.approx(action[0] / 1000.0)
    back = conv.twist_msg_to_action(msg)
    np.testing.assert_allclose(pose_alg.action_to_matrix(back), pose_alg.action_to_matrix(action), atol=1e-9)


def test_pure_roll_is_rotation_about_x_in_radians() -> None:
    msg = conv.action_to_twist_msg(np.array([0, 0, 0, 30.0, 0, 0]))
    assert msg.angular.x == pytest.approx(math.radians(30.0))
    assert msg.angular.y == pytest.approx(0.0) and msg.angular.z == pytest.approx(0.0)


@pytest.mark.parametrize("action", [[np.nan, 0, 0, 0, 0, 0], [0, 0, 0, 0, np.inf, 0], [1, 2, 3]])
def test_bad_action_never_makes_a_twist(action: list) -> None:
    with pytest.raises(conv.MessageError):
        conv.action_to_twist_msg(np.array(action, dtype=float))


def _pose(q: tuple[float, float, float, float], p: tuple[float, float, float] = (0.1, 0.2, 0.3)) -> Pose:
    msg = Pose()
    msg.position.x, msg.position.y, msg.position.z = p
    msg.orientation = Quaternion(x=q[0], y=q[1], z=q[2], w=q[3])
    return msg


@pytest.mark.parametrize("q,p", [
    ((0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),          # zero quaternion
    ((0.0, 0.0, 0.0, 2.0), (0.0, 0.0, 0.0)),          # non-unit
    ((math.nan, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0)),     # NaN orientation
    ((0.0, 0.0, 0.0, 1.0), (math.nan, 0.0, 0.0)),     # NaN position
    ((0.0, 0.0, 0.0, 1.0), (math.inf, 0.0, 0.0)),     # inf position
])
def test_bad_poses_rejected(q: tuple, p: tuple) -> None:
    with pytest.raises(conv.MessageError):
        conv.pose_msg_to_matrix(_pose(q, p))


def test_nearly_unit_quaternion_renormalised() -> None:
    T = conv.pose_msg_to_matrix(_pose((0.0, 0.0, 0.0, 1.0004)))
    np.testing.assert_allclose(T[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(T[:3, 3], [100.0, 200.0, 300.0])


def test_image_messages_to_gray() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    msg = conv.gray_to_image_msg(gray, 99, "us_image")
    assert isinstance(msg, Image) and msg.encoding == "mono8"
    msg = deserialize_message(serialize_message(msg), Image)
    np.testing.assert_array_equal(conv.any_image_msg_to_gray(msg), gray)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_array_equal(conv.image_msg_to_gray(conv.gray_to_image_msg(rgb, 1, "f")), gray)
    cmsg = conv.gray_to_compressed_msg(gray, 99, "us_image", "png")
    assert isinstance(cmsg, CompressedImage)
    cmsg = deserialize_message(serialize_message(cmsg), CompressedImage)
    np.testing.assert_array_equal(conv.any_image_msg_to_gray(cmsg), gray)


def test_padded_rows_and_mono16() -> None:
    gray16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 4000)
    msg = conv.gray_to_image_msg(gray16, 0, "f")
    np.testing.assert_array_equal(conv.image_msg_to_gray(msg), (gray16 >> 8).astype(np.uint8))
    msg = Image(height=2, width=3, encoding="mono8", step=4, data=bytes([1, 2, 3, 0, 4, 5, 6, 0]))
    np.testing.assert_array_equal(conv.image_msg_to_gray(msg), [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("fields", [
    {"height": 2, "width": 2, "encoding": "32FC1", "step": 8, "data": bytes(16)},    # encoding
    {"height": 4, "width": 4, "encoding": "mono8", "step": 4, "data": bytes(10)},     # too short
    {"height": 0, "width": 0, "encoding": "mono8", "step": 0, "data": b""},           # zero size
    {"height": 100000, "width": 2, "encoding": "mono8", "step": 2, "data": bytes(4)},  # huge
    {"height": 2, "width": 4, "encoding": "mono8", "step": 2, "data": bytes(8)},      # step < row
])
def test_bad_images_rejected(fields: dict) -> None:
    with pytest.raises(conv.MessageError):
        conv.image_msg_to_gray(Image(**fields))


def test_bad_compressed_rejected() -> None:
    for data in (b"", b"not an image at all"):
        with pytest.raises(conv.MessageError):
            conv.compressed_msg_to_gray(CompressedImage(format="png", data=data))


def test_yuv422_camera_frames_become_grey() -> None:
    """Issue 14: a camera sending yuv422 (UYVY) had every frame rejected."""
    y = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    uyvy = np.stack([np.full_like(y, 128), y], axis=2)              # U/V, Y per pixel
    msg = Image(height=3, width=4, encoding="yuv422", step=8, data=uyvy.tobytes())
    msg = deserialize_message(serialize_message(msg), Image)
    np.testing.assert_array_equal(conv.any_image_msg_to_gray(msg), y)


def test_too_large_images_raise_image_too_large() -> None:
    msg = conv.gray_to_compressed_msg(np.zeros((48, 64), np.uint8), 1, "us_image", "png")
    with pytest.raises(conv.ImageTooLargeMessageError, match="max_image_pixels"):
        conv.any_image_msg_to_gray(msg, max_pixels=100)
    raw = conv.gray_to_image_msg(np.zeros((48, 64), np.uint8), 1, "us_image")
    with pytest.raises(conv.ImageTooLargeMessageError):
        conv.any_image_msg_to_gray(raw, max_pixels=100)
    assert conv.any_image_msg_to_gray(raw, max_pixels=64 * 48).shape == (48, 64)
