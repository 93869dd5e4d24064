"""scanner_sim_node over real DDS: rates, stamps, velocity commands, teleport, reset, replay."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ros_helpers import NodeProcess, ros_node, spin_until

pytestmark = pytest.mark.ros

MODULE = "cardiac_copilot_ros.nodes.scanner_sim_node"


def _pose_mm(msg):
    from cardiac_copilot_ros.pose import pose_to_matrix

    p, q = msg.pose.position, msg.pose.orientation
    return pose_to_matrix([p.x, p.y, p.z], [q.x, q.y, q.z, q.w])


def _set_params(node, target: str, params, timeout_s=10.0):
    from rcl_interfaces.srv import SetParameters

    cli = node.create_client(SetParameters, f"/{target}/set_parameters")
    assert spin_until(node, lambda: cli.service_is_ready(), 10.0)
    fut = cli.call_async(SetParameters.Request(parameters=[p.to_parameter_msg() for p in params]))
    assert spin_until(node, fut.done, timeout_s)
    return fut.result().results


def test_live_simulation(tmp_path):
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger

    from cardiac_copilot_ros.pose import action_to_matrix, pose_error
    from cardiac_copilot_ros.sim.phantom import make_subject

    subject = make_subject(3)
    offset = [10.0, -5.0, 0.0, 5.0, 0.0, -5.0]
    params = {"subject_seed": 3, "target_plane": "psax-av", "image_size": 64, "pose_rate_hz": 100.0,
              "start_offset": str(offset), "heartbeat": False}
    with NodeProcess(MODULE, params=params, log_path=tmp_path / "node.log") as proc, ros_node() as node:
        imgs_be, imgs_rel, poses, targets = [], [], [], []
        node.create_subscription(Image, "image", imgs_be.append, qos_profile_sensor_data)
        node.create_subscription(Image, "image", imgs_rel.append, 10)
        node.create_subscription(PoseStamped, "probe_pose", poses.append, 50)
        latched = QoSProfile(depth=1, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(PoseStamped, "/scanner_sim_node/true_target_pose", targets.append, latched)
        cmd = node.create_publisher(TwistStamped, "/servo_node/delta_twist_cmds", 10)
        assert spin_until(node, lambda: len(imgs_be) >= 10 and len(imgs_rel) >= 10 and targets, 30.0), \
            (proc.alive(), (tmp_path / "node.log").read_text())
        # rates and stamps
        n_img0, n_pose0, t0 = len(imgs_rel), len(poses), time.monotonic()
        spin_until(node, lambda: False, 1.0)
        dt = time.monotonic() - t0
        img_rate, pose_rate = (len(imgs_rel) - n_img0) / dt, (len(poses) - n_pose0) / dt
        # rates are measured by `cardiac-copilot bench`; here only their structure: poses come faster than
        # images, and neither comes faster than its configured rate (30 Hz images, 100 Hz poses)
        assert 0 < img_rate < 40 and img_rate < pose_rate < 130, (img_rate, pose_rate)
        im = imgs_rel[-1]
        assert (im.width, im.height, im.encoding, im.header.frame_id) == (64, 64, "mono8", "us_image")
        assert poses[-1].header.frame_id == "panda_link0"
        stamps = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in imgs_rel[-10:]]
        assert np.all(np.diff(stamps) > 0)
        # true target and start pose
        T_target = _pose_mm(targets[-1])
        np.testing.assert_allclose(T_target, subject.target_pose("PSAX-AV"), atol=1e-3)
        T_start = _pose_mm(poses[-1])
        d, r = pose_error(T_start, T_target @ action_to_matrix(offset))
        assert d < 0.01 and r < 0.01
        # velocity command in the probe frame: 20 mm/s along x for ~0.5 s
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            msg = TwistStamped()
            msg.header.frame_id = "us_probe"
            msg.header.stamp = node.get_clock().now().to_msg()
            msg.twist.linear.x = 0.02
            cmd.publish(msg)
            spin_until(node, lambda: False, 0.02)
        spin_until(node, lambda: False, 0.6)  # command times out -> probe stops
        T_moved = _pose_mm(poses[-1])
        rel = np.linalg.inv(T_start) @ T_moved
        # 20 mm/s for 0.5 s plus up to cmd_timeout_s (0.2 s) after the last command
        assert 6.0 < rel[0, 3] < 16.0 and abs(rel[1, 3]) < 0.5 and abs(rel[2, 3]) < 0.5
        n = len(poses)
        spin_until(node, lambda: len(poses) > n + 20, 5.0)
        d_still, _ = pose_error(T_moved, _pose_mm(poses[-1]))
        assert d_still < 1e-6
        # images change when the probe moves
        assert np.abs(np.frombuffer(bytes(imgs_rel[-1].data), np.uint8).astype(int)
                      - np.frombuffer(bytes(im.data), np.uint8)).mean() > 1.0
        # reset service: back to the start offset
        cli = node.create_client(Trigger, "/scanner_sim_node/reset")
        assert spin_until(node, cli.service_is_ready, 10.0)
        fut = cli.call_async(Trigger.Request())
        assert spin_until(node, fut.done, 10.0) and fut.result().success
        n = len(poses)
        spin_until(node, lambda: len(poses) > n + 5, 5.0)
        d, _ = pose_error(_pose_mm(poses[-1]), T_start)
        assert d < 0.01
        # teleport with start_offset, change plane at run time, bad values rejected
        res = _set_params(node, "scanner_sim_node", [
            Parameter("target_plane", Parameter.Type.STRING, "PLAX"),
            Parameter("start_offset", Parameter.Type.DOUBLE_ARRAY, [0.0] * 6)])
        assert all(r.successful for r in res)
        n = len(poses)
        spin_until(node, lambda: len(poses) > n + 5 and len(targets) > 1, 5.0)
        d, r = pose_error(_pose_mm(poses[-1]), subject.target_pose("PLAX"))
        assert d < 0.01 and r < 0.01
        np.testing.assert_allclose(_pose_mm(targets[-1]), subject.target_pose("PLAX"), atol=1e-3)
        bad = _set_params(node, "scanner_sim_node", [Parameter("target_plane", Parameter.Type.STRING, "A2C")])
        assert not bad[0].successful and "no A2C view; simulated views: PLAX, PSAX-AV, PSAX-MV, A4C" in bad[0].reason
        bad = _set_params(node, "scanner_sim_node", [
            Parameter("start_offset", Parameter.Type.DOUBLE_ARRAY, [1.0, 2.0])])
        assert not bad[0].successful
        # a command in an unknown frame is ignored and does not crash the node
        msg = TwistStamped()
        msg.header.frame_id = "elsewhere"
        msg.twist.linear.x = 0.05
        cmd.publish(msg)
        spin_until(node, lambda: False, 0.3)
        d, _ = pose_error(_pose_mm(poses[-1]), subject.target_pose("PLAX"))
        assert d < 0.01 and proc.alive()
    assert proc.proc.returncode == 0


def test_replay_demonstration_bag(tmp_path):
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from cardiac_copilot_ros.sim.scan import write_scans

    index = write_scans(tmp_path / "bags", 1, 1, seed=2, frames_per_scan=30, image_size=48,
                        planes=["PSAX-MV"], progress=False)
    bag = tmp_path / "bags" / index["scans"][0]["bag"]
    with NodeProcess(MODULE, params={"replay_bag": str(bag), "image_size": 48},
                     log_path=tmp_path / "node.log") as proc, ros_node() as node:
        imgs, poses, anns = [], [], []
        node.create_subscription(Image, "image", imgs.append, 50)
        node.create_subscription(PoseStamped, "probe_pose", poses.append, 500)
        node.create_subscription(String, "annotations", anns.append,
                                 QoSProfile(depth=10, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL))
        assert spin_until(node, lambda: anns and len(imgs) >= 20, 30.0), (tmp_path / "node.log").read_text()
        assert anns[0].data == "PSAX-MV"
        assert imgs[0].width == 48 and imgs[0].encoding == "mono8"
        now = node.get_clock().now().nanoseconds * 1e-9
        stamp = imgs[-1].header.stamp.sec + imgs[-1].header.stamp.nanosec * 1e-9
        assert abs(now - stamp) < 5.0  # fresh stamps, not the bag's 2024 clock
        assert len(poses) > 3 * len(imgs)
        assert proc.alive()


def test_poses_keep_their_rate_while_rendering(tmp_path):
    """Rendering must not hold back the pose timer (issue 14 item 3).

    448 px frames take longer to render than three pose periods (as 224 px frames do on a loaded
    machine). Judged from the simulator's own header stamps (when its timers ran), not from arrival
    times at this process: the median pose gap stays within three periods, and most images have probe
    poses within three periods on both sides (what the recorder needs to interpolate a synced pose).
    """
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import Image

    period_ns = 4_000_000  # 250 Hz
    params = {"image_size": 448, "pose_rate_hz": 250.0, "image_rate_hz": 30.0, "heartbeat": False}

    def stamp(m) -> int:
        return m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec

    with NodeProcess(MODULE, params=params, log_path=tmp_path / "node.log") as proc, ros_node() as node:
        imgs, poses = [], []
        node.create_subscription(Image, "image", lambda m: imgs.append(stamp(m)), 50)
        node.create_subscription(PoseStamped, "probe_pose", lambda m: poses.append(stamp(m)), 1000)
        assert spin_until(node, lambda: len(imgs) >= 3, 60.0), (proc.alive(), (tmp_path / "node.log").read_text())
        imgs.clear()
        poses.clear()
        assert spin_until(node, lambda: len(imgs) >= 45, 60.0)
    p = np.unique(np.array(poses, dtype=np.int64))
    im = np.array(imgs[1:-1], dtype=np.int64)
    im = im[(im > p[0]) & (im < p[-1])]
    gaps = np.diff(p)
    i = np.searchsorted(p, im)
    around = p[i] - p[i - 1]  # the pose gap each image falls into
    ok = float(np.mean(around <= 3 * period_ns))
    assert len(im) >= 30 and np.median(gaps) <= 3 * period_ns and ok >= 0.5, \
        (len(im), np.median(gaps) / 1e6, ok, (np.percentile(around, [10, 50, 90]) / 1e6).tolist())
