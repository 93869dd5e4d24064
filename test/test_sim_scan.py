"""Simulated scan bags: index, content, timing structure, independent readers, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cardiac_copilot_ros import bagio
from cardiac_copilot_ros.images import image_msg_to_array
from cardiac_copilot_ros.pose import pose_error, pose_to_matrix
from cardiac_copilot_ros.sim.phantom import make_subject
from cardiac_copilot_ros.sim.scan import write_scans

FRAMES = 90


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    index = write_scans(out, n_subjects=2, scans_per_plane=1, seed=10, frames_per_scan=FRAMES,
                        image_size=64, planes=["PLAX", "psax-mv"], progress=False)
    return out, index


def _read(bag):
    msgs = {bagio.IMAGE_TOPIC: [], bagio.POSE_TOPIC: [], bagio.ANNOTATION_TOPIC: []}
    for topic, log_ns, msg in bagio.read_messages(bag):
        msgs[topic].append((log_ns, msg))
    return msgs


def test_index(sim_dir):
    out, index = sim_dir
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == index
    assert [s["seed"] for s in index["subjects"]] == [10, 11]
    assert [s["subject_id"] for s in index["subjects"]] == ["sim0010", "sim0011"]
    assert len(index["scans"]) == 4
    for scan in index["scans"]:
        assert (out / scan["bag"] / "metadata.yaml").exists()
        assert scan["plane"] in ("PLAX", "PSAX-MV") and scan["frames"] == FRAMES
        assert scan["subject_id"] in ("sim0010", "sim0011")


def test_bag_content_and_timing(sim_dir):
    out, index = sim_dir
    scan = index["scans"][1]
    bag = out / scan["bag"]
    msgs = _read(bag)
    imgs, poses, anns = msgs[bagio.IMAGE_TOPIC], msgs[bagio.POSE_TOPIC], msgs[bagio.ANNOTATION_TOPIC]
    assert len(imgs) == FRAMES
    img = image_msg_to_array(imgs[0][1])
    assert img.shape == (64, 64) and img.dtype == np.uint8 and imgs[0][1].encoding == "mono8"
    assert imgs[0][1].header.frame_id == "us_image"
    assert poses[0][1].header.frame_id == "panda_link0"
    img_stamp = np.array([bagio.stamp_to_ns(m.header.stamp) for _, m in imgs])
    img_log = np.array([t for t, _ in imgs])
    pose_stamp = np.array([bagio.stamp_to_ns(m.header.stamp) for _, m in poses])
    # images ~30 Hz on their own clock, jittery, late by a processing latency
    period = np.diff(img_stamp) / 1e9
    assert abs(period.mean() - 1 / 30) < 2e-4 and period.std() > 1e-5
    lat = (img_log - img_stamp) / 1e6
    assert 30 < lat.min() and lat.max() <= 60.5 and lat.std() > 0.1
    # poses at 250 Hz, covering every image; images not aligned with poses
    np.testing.assert_allclose(np.diff(pose_stamp) / 1e9, 1 / 250, atol=1e-6)
    assert pose_stamp[0] <= img_stamp[0] and pose_stamp[-1] >= img_stamp[-1]
    assert len(np.intersect1d(img_stamp, pose_stamp)) < FRAMES // 2
    # log times in order, pose log after its stamp
    all_log = [t for t, _ in sorted(imgs + poses + anns, key=lambda x: x[0])]
    assert all_log == sorted(all_log)
    # one annotation with the plane's name; the probe is at the true target then
    assert len(anns) == 1 and anns[0][1].data == scan["plane"]
    t_ann = anns[0][0]
    i = int(np.searchsorted(pose_stamp, t_ann))
    p = poses[i][1].pose
    T = pose_to_matrix([p.position.x, p.position.y, p.position.z],
                       [p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w])
    import yaml

    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]["custom_data"]
    target = make_subject(int(scan["subject_id"][3:])).target_pose(scan["plane"])
    d_mm, d_deg = pose_error(T, target)
    assert d_mm < 2.0 and d_deg < 2.0
    assert meta
    if meta:
        assert meta["cardiac_copilot.subject_id"] == scan["subject_id"]
        assert meta["cardiac_copilot.sim.plane"] == scan["plane"]
        tp = np.array([float(v) for v in meta["cardiac_copilot.sim.target_pose"].split(",")]).reshape(4, 4)
        np.testing.assert_allclose(tp, target, atol=1e-5)


def test_metadata_yaml(sim_dir):
    import yaml

    out, index = sim_dir
    scan = index["scans"][0]
    meta = yaml.safe_load((out / scan["bag"] / "metadata.yaml").read_text())
    info = meta["rosbag2_bagfile_information"]
    assert info["storage_identifier"] == "mcap"
    custom = info["custom_data"]
    for key in ("subject_id", "session_label", "code_version", "sim.seed", "sim.plane", "sim.target_pose"):
        assert f"cardiac_copilot.{key}" in custom
    assert custom["cardiac_copilot.subject_id"] == scan["subject_id"]
    assert custom["cardiac_copilot.sim.seed"] == str(scan["seed"])
    assert len(custom["cardiac_copilot.sim.target_pose"].split(",")) == 16


def test_independent_mcap_reader(sim_dir):
    from mcap.reader import make_reader

    out, index = sim_dir
    scan = index["scans"][0]
    (mcap_file,) = (out / scan["bag"]).glob("*.mcap")
    counts: dict[str, int] = {}
    with open(mcap_file, "rb") as f:
        reader = make_reader(f)
        for _schema, channel, _message in reader.iter_messages():
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
        schemas = {s.name for s in reader.get_summary().schemas.values()}
    assert counts[bagio.IMAGE_TOPIC] == FRAMES and counts[bagio.ANNOTATION_TOPIC] == 1
    assert counts[bagio.POSE_TOPIC] > 7 * FRAMES
    assert "sensor_msgs/msg/Image" in schemas


def test_same_seed_same_bag_and_sqlite3(tmp_path, sim_dir):
    out, index = sim_dir
    again = write_scans(tmp_path / "again", 1, 1, seed=10, frames_per_scan=FRAMES, image_size=64,
                        planes=["PLAX"], storage="sqlite3", progress=False)
    a = _read(out / index["scans"][0]["bag"])
    b = _read(tmp_path / "again" / again["scans"][0]["bag"])
    for topic in a:
        assert len(a[topic]) == len(b[topic])
    np.testing.assert_array_equal(image_msg_to_array(a[bagio.IMAGE_TOPIC][40][1]),
                                  image_msg_to_array(b[bagio.IMAGE_TOPIC][40][1]))
    assert list((tmp_path / "again" / again["scans"][0]["bag"]).glob("*.db3"))


def test_cli_simulate_and_preview(tmp_path):
    from cardiac_copilot_ros.cli import main

    png = tmp_path / "p.png"
    rc = main(["simulate", "--subjects", "1", "--scans-per-plane", "1", "--frames-per-scan", "20",
               "--image-size", "48", "--planes", "PLAX", "--out", str(tmp_path / "o"), "--seed", "4",
               "--preview", str(png), "--preview-subjects", "2", "--no-progress"])
    assert rc == 0 and png.stat().st_size > 1000
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["subjects"] == [{"subject_id": "sim0004", "seed": 4}]
    # refuses to overwrite existing bags
    assert main(["simulate", "--subjects", "1", "--frames-per-scan", "20", "--image-size", "48",
                 "--planes", "PLAX", "--out", str(tmp_path / "o"), "--seed", "4", "--no-progress"]) == 2
    assert main(["simulate"]) == 2
    assert main(["simulate", "--out", str(tmp_path / "x"), "--planes", "A2C"]) == 2   # not simulated
