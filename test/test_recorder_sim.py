"""Done-when test of the recorder: record scanner_sim_node over real DDS, check the bag with the
mcap library (an independent reader), compare counts with what the simulator published and
probe_pose_sync with the simulator's true pose at each image stamp; the dataset builder reads it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ros_helpers import NodeProcess, ros_node, spin_until

from cardiac_copilot_ros import bagio
from cardiac_copilot_ros import pose as pose_alg
from cardiac_copilot_ros.data import build as data_build

pytestmark = pytest.mark.ros

RECORDER = "cardiac_copilot_ros.nodes.recorder_node"
SIM = "cardiac_copilot_ros.nodes.scanner_sim_node"


def _ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _pose_arr(msg) -> tuple[np.ndarray, np.ndarray]:
    p, q = msg.pose.position, msg.pose.orientation
    return np.array([p.x, p.y, p.z]), np.array([q.x, q.y, q.z, q.w])


def test_records_scanner_sim_without_loss_and_with_exact_sync(tmp_path: Path) -> None:
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    out = tmp_path / "bags"
    sim_params = {"image_size": 64, "image_rate_hz": 30.0, "pose_rate_hz": 250.0, "cmd_timeout_s": 0.5}
    rec_params = {"output_dir": str(out), "session_label": "simtest", "min_free_disk_mb": 1.0,
                  "fsync": False, "sync_max_gap_ms": 100.0, "max_pose_age_ms": 1500.0}
    with ros_node("rec_sim_probe") as node, \
            NodeProcess(SIM, sim_params, log_path=tmp_path / "sim.log"), \
            NodeProcess(RECORDER, rec_params, log_path=tmp_path / "rec.log"):
        qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
        got_images: list[int] = []
        got_poses: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        node.create_subscription(Image, "image", lambda m: got_images.append(_ns(m.header.stamp)), qos)
        node.create_subscription(PoseStamped, "probe_pose",
                                 lambda m: got_poses.__setitem__(_ns(m.header.stamp), _pose_arr(m)), qos)
        ann = node.create_publisher(String, "annotations", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        cmd = node.create_publisher(TwistStamped, "servo_node/delta_twist_cmds", 10)

        def send_twist() -> None:  # a known smooth motion: 10 mm/s along x, 0.1 rad/s about z
            msg = TwistStamped()
            msg.header.stamp = node.get_clock().now().to_msg()
            msg.header.frame_id = "us_probe"
            msg.twist.linear.x, msg.twist.angular.z = 0.01, 0.1
            cmd.publish(msg)

        node.create_timer(0.05, send_twist)
        client = node.create_client(Trigger, "/recorder_node/start_episode")
        stop = node.create_client(Trigger, "/recorder_node/stop_episode")
        assert client.wait_for_service(timeout_sec=20) and stop.wait_for_service(timeout_sec=20)
        assert spin_until(node, lambda: len(got_images) > 5 and len(got_poses) > 50, 20), "simulator silent"
        fut = client.call_async(Trigger.Request())
        assert spin_until(node, fut.done, 15) and fut.result().success, fut.result()
        spin_until(node, lambda: False, 2.0)
        ann.publish(String(data="PLAX"))
        spin_until(node, lambda: False, 0.3)
        fut = stop.call_async(Trigger.Request())
        assert spin_until(node, fut.done, 15) and fut.result().success, fut.result()
        spin_until(node, lambda: False, 0.3)

    [bag] = [p for p in out.iterdir() if p.is_dir()]
    [mcap_path] = bag.glob("*.mcap")
    custom = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]["custom_data"]
    # the simulator's pose stream is in order: the recorder rejects none of it
    assert json.loads(custom["cardiac_copilot.recorder.poses_rejected"]) == {"pose_restarts": 0,
                                                                             "poses_out_of_order": 0}

    # independent reader: the mcap library, messages decoded from CDR with the ROS 2 definitions
    from mcap.reader import make_reader

    decoded: dict[str, list] = {}
    with open(mcap_path, "rb") as fh:
        reader = make_reader(fh)
        summary = reader.get_summary()
        assert summary is not None and summary.statistics is not None
        for schema, channel, message in reader.iter_messages():
            msg = bagio.TYPESTORE.deserialize_cdr(message.data, schema.name)
            decoded.setdefault(channel.topic, []).append(msg)
    assert {"/image", "/probe_pose", "/probe_pose_sync", "/annotations"} <= set(decoded)
    assert [m.data for m in decoded["/annotations"]] == ["PLAX"]

    # nothing dropped: every message the simulator published within the recorded window is in the bag
    img_stamps = sorted(_ns(m.header.stamp) for m in decoded["/image"])
    pose_stamps = sorted(_ns(m.header.stamp) for m in decoded["/probe_pose"])
    assert len(img_stamps) >= 40 and len(set(img_stamps)) == len(img_stamps)
    published_imgs = [t for t in got_images if img_stamps[0] <= t <= img_stamps[-1]]
    published_poses = [t for t in got_poses if pose_stamps[0] <= t <= pose_stamps[-1]]
    assert img_stamps == sorted(published_imgs)
    assert pose_stamps == sorted(published_poses)

    # probe_pose_sync = the simulator's true pose at each image stamp (its state between pose
    # ticks is the last published pose: the pose the renderer used)
    true_t = np.array(sorted(got_poses))
    syncs = decoded["/probe_pose_sync"]
    assert len(syncs) >= 0.9 * len(img_stamps)
    errs_mm, errs_deg = [], []
    for m in syncs:
        t = _ns(m.header.stamp)
        assert t in set(img_stamps)
        k = int(np.searchsorted(true_t, t, side="right")) - 1
        p_true, q_true = got_poses[int(true_t[k])]
        p, q = _pose_arr(m)
        dmm, ddeg = pose_alg.pose_error(pose_alg.pose_to_matrix(p, q), pose_alg.pose_to_matrix(p_true, q_true))
        errs_mm.append(float(dmm))
        errs_deg.append(float(ddeg))
    moved_mm, _ = pose_alg.pose_error(pose_alg.pose_to_matrix(*_pose_arr(syncs[0])),
                                      pose_alg.pose_to_matrix(*_pose_arr(syncs[-1])))
    assert moved_mm > 5.0  # the probe really moved during the episode
    assert max(errs_mm) < 0.2 and max(errs_deg) < 0.1, (max(errs_mm), max(errs_deg))

    # the dataset builder reads the recorder's bag (topics picked by type)
    t0 = time.monotonic()
    manifest = data_build.build_cache([bag], tmp_path / "cache",
                                      data_build.BuildOptions(size=32, max_pose_gap_ms=100.0,
                                                              val_fraction=0.0, test_fraction=0.0),
                                      progress=False)
    assert time.monotonic() - t0 < 60
    frames = np.load(tmp_path / "cache" / "images.npy", mmap_mode="r")
    assert frames.shape[0] > 0 and manifest

