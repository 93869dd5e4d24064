"""recording.py without a ROS graph: CDR helpers, pose sync, episode bags, split, sqlite3,
crash recovery, disk guard and the writer queue."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from cardiac_copilot_ros import bagio
from cardiac_copilot_ros import pose as pose_alg
from cardiac_copilot_ros import recording as rec

IMAGE = "/image"
POSE = "/probe_pose"
SYNC = "/probe_pose_sync"
ANN = "/annotations"


def _topics() -> list[rec.TopicSpec]:
    return [rec.TopicSpec(IMAGE, bagio.IMAGE_TYPE, [rec.qos_profile_dict(depth=5)]),
            rec.TopicSpec(POSE, bagio.POSE_TYPE), rec.TopicSpec(SYNC, bagio.POSE_TYPE),
            rec.TopicSpec(ANN, bagio.STRING_TYPE)]


def _custom(bag: str | Path) -> dict[str, str]:
    """custom_data of a bag's metadata.yaml."""
    import yaml

    meta = yaml.safe_load((Path(bag) / "metadata.yaml").read_text())
    return dict(meta["rosbag2_bagfile_information"]["custom_data"] or {})


def _image_bytes(stamp_ns: int, value: int = 0, size: tuple[int, int] = (8, 6)) -> bytes:
    img = np.full(size, value, dtype=np.uint8)
    return bytes(bagio.TYPESTORE.serialize_cdr(bagio.make_image(stamp_ns, "us_image", img), bagio.IMAGE_TYPE))


def _pose_bytes(stamp_ns: int, x_m: float) -> bytes:
    return rec.serialize_pose_stamped_cdr(stamp_ns, "panda_link0", [x_m, 0.0, 0.1], [0, 0, 0, 1])


# ------------------------------------------------------------------------------- CDR


def test_cdr_helpers_match_rclpy_serialization() -> None:
    ser = pytest.importorskip("rclpy.serialization")
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import Image

    m = PoseStamped()
    m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id = 12, 345678901, "panda_link0"
    m.pose.position.x, m.pose.position.y, m.pose.position.z = 0.1, -0.2, 0.3
    m.pose.orientation.x, m.pose.orientation.w = 0.6, 0.8
    data = ser.serialize_message(m)
    stamp, frame, pos, quat = rec.parse_pose_stamped_cdr(data)
    assert stamp == 12_345_678_901 and frame == "panda_link0"
    np.testing.assert_array_equal(pos, [0.1, -0.2, 0.3])
    np.testing.assert_array_equal(quat, [0.6, 0, 0, 0.8])
    for fid in ("", "a", "ab", "abc", "abcd", "abcdefg"):  # every string padding case
        m.header.frame_id = fid
        ref = ser.serialize_message(m)
        built = rec.serialize_pose_stamped_cdr(stamp, fid, pos, quat)
        assert len(built) == len(ref)  # same layout (rmw leaves padding bytes uninitialised)
        back = ser.deserialize_message(built, PoseStamped)
        assert back == m
        assert rec.parse_pose_stamped_cdr(ref)[1] == fid

    img = Image(height=2, width=3, encoding="mono8", step=3, data=bytes(6))
    img.header.stamp.sec, img.header.stamp.nanosec = 1_700_000_000, 999_999_999
    raw = bytearray(ser.serialize_message(img))
    assert rec.cdr_header_stamp_ns(raw) == 1_700_000_000_999_999_999
    rec.set_cdr_header_stamp(raw, 5_000_000_007)
    back = ser.deserialize_message(bytes(raw), Image)
    assert (back.header.stamp.sec, back.header.stamp.nanosec) == (5, 7)
    with pytest.raises(ValueError):
        rec.cdr_header_stamp_ns(b"\x00\x01")


# ------------------------------------------------------------------------------- sync


def _traj(t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A smooth probe motion: position (m) and orientation quaternion at times t_s."""
    pos = np.stack([0.4 + 0.02 * np.sin(2 * t_s), 0.01 * t_s, 0.3 + 0.005 * np.cos(3 * t_s)], axis=-1)
    rpy = np.stack([10 * np.sin(t_s), 5 * t_s, -8 * np.cos(2 * t_s)], axis=-1)
    return pos, pose_alg.rotation_to_quat(pose_alg.euler_to_rotation(rpy))


def test_pose_sync_interpolates_within_tolerance() -> None:
    sync = rec.PoseSynchronizer(max_gap_ns=10_000_000, max_pose_age_ns=50_000_000)
    pose_t = np.arange(0, 2.0, 0.004)  # 250 Hz
    img_t = np.arange(0.01, 1.9, 1 / 30) + 0.0013
    pp, pq = _traj(pose_t)
    results = []
    i = 0
    for k, t in enumerate(pose_t):
        while i < len(img_t) and img_t[i] <= t + 0.002:  # images arrive before the next pose
            results += sync.add_image(i, int(round(img_t[i] * 1e9)), now_ns=int(t * 1e9))
            i += 1
        results += sync.add_pose(int(round(t * 1e9)), pp[k], pq[k], "panda_link0")
    assert len(results) == len(img_t) and sync.counts["synced"] == len(img_t)
    got_p = np.array([r.position for r in results])
    got_q = np.array([r.quat for r in results])
    true_p, true_q = _traj(np.array([r.stamp_ns for r in results]) / 1e9)
    dt_mm, dr_deg = pose_alg.pose_error(pose_alg.pose_to_matrix(got_p, got_q),
                                        pose_alg.pose_to_matrix(true_p, true_q))
    assert dt_mm.max() < 0.2 and dr_deg.max() < 0.1
    assert sync.frame_id == "panda_link0"


def test_pose_sync_failures_are_classified() -> None:
    sync = rec.PoseSynchronizer(max_gap_ns=20_000_000, max_pose_age_ns=100_000_000)
    q = np.array([0, 0, 0, 1.0])
    assert sync.add_image("early", 500, now_ns=0) == []
    res = sync.add_pose(1000, np.zeros(3), q)       # image before the first pose
    assert [r.status for r in res] == ["no_pose"]
    sync.add_pose(100_000_000, np.ones(3), q)       # 100 ms gap in the pose stream
    [r] = sync.add_image("gap", 50_000_000, now_ns=0)
    assert r.status == "gap" and r.gap_ns > 20_000_000
    assert sync.add_image("late", 150_000_000, now_ns=1_000_000_000) == []
    assert sync.expire(1_050_000_000) == []          # still waiting for a later pose
    [r] = sync.expire(1_200_000_000)
    assert r.status == "stale" and r.key == "late"
    assert sync.add_pose(90_000_000, np.zeros(3), q) == [] and sync.poses_out_of_order == 1
    assert sync.counts == {"synced": 0, "gap": 1, "stale": 1, "no_pose": 1}


def _stream(sync: rec.PoseSynchronizer, t0_s: float, seconds: float, offset_s: float = 0.0,
            bad: dict[int, float] | None = None) -> list[rec.SyncResult]:
    """250 Hz poses and 30 Hz images stamped t (the pose stamps t + offset_s, as a source with
    another clock would), received at t; ``bad`` replaces pose k's stamp by that value (s)."""
    q = np.array([0, 0, 0, 1.0])
    out: list[rec.SyncResult] = []
    next_img = t0_s + 0.001
    for k, t in enumerate(np.arange(t0_s, t0_s + seconds, 0.004)):
        now = int(round(t * 1e9))
        while next_img <= t:
            out += sync.add_image(next_img, int(round((next_img + offset_s) * 1e9)), now_ns=now)
            next_img += 1 / 30
        stamp = (bad or {}).get(k, t + offset_s)
        out += sync.add_pose(int(round(stamp * 1e9)), np.full(3, t), q, "panda_link0", now_ns=now)
    return out


def test_one_future_or_backwards_pose_does_not_stop_sync() -> None:
    sync = rec.PoseSynchronizer(max_gap_ns=10_000_000, max_pose_age_ns=50_000_000)
    day = 86_400.0
    res = _stream(sync, 100.0, 2.0, bad={100: 100.4 + day, 200: 100.0})
    assert sync.poses_out_of_order == 2 and sync.pose_restarts == 0
    assert res and all(r.status == "synced" for r in res), {r.status for r in res}
    # a pose less than max_jump_ns ahead is accepted; the true stream takes over 10 poses later
    sync = rec.PoseSynchronizer(max_gap_ns=10_000_000, max_pose_age_ns=50_000_000, reanchor_after=10)
    res = _stream(sync, 100.0, 2.0, bad={100: 100.4 + 0.5})
    assert sync.poses_out_of_order == 10 and sync.pose_restarts == 1
    late = [r for r in res if r.key > 100.45]
    assert late and all(r.status == "synced" for r in late), {r.status for r in late}


def test_pose_source_restart_resyncs_and_reset_clears_a_poisoned_buffer() -> None:
    sync = rec.PoseSynchronizer(max_gap_ns=10_000_000, max_pose_age_ns=50_000_000, reanchor_after=10)
    _stream(sync, 100.0, 1.0)
    # the pose source restarts: its stamps jump back 90 s (e.g. a simulator's clock restarted)
    res = _stream(sync, 101.0, 1.0, offset_s=-90.0)
    assert sync.pose_restarts == 1 and sync.poses_out_of_order == 10
    assert [r.status for r in res if r.key > 101.1] == ["synced"] * len([r for r in res if r.key > 101.1])

    # the very first pose is a day ahead: later poses are rejected until they re-anchor the
    # buffer, or until an episode start resets it
    sync = rec.PoseSynchronizer(max_gap_ns=10_000_000, max_pose_age_ns=50_000_000, reanchor_after=1000)
    q = np.array([0, 0, 0, 1.0])
    sync.add_pose(int((200.0 + 86_400) * 1e9), np.zeros(3), q, now_ns=int(200.0 * 1e9))
    _stream(sync, 200.0, 0.2)
    assert sync.poses_out_of_order == 50 and sync.counts["synced"] == 0
    sync.reset(keep_history=True)  # what recorder_node does at start_episode
    assert sync.counts["no_pose"] == 0 and sync.poses_out_of_order == 0
    res = _stream(sync, 200.2, 0.5)
    assert res and all(r.status == "synced" for r in res if r.key > 200.21)
    # a consistent buffer is kept over an episode start: the first image is synced at once
    sync.reset(keep_history=True)
    [r] = sync.add_image("first", int(200.69 * 1e9), now_ns=int(200.7 * 1e9))
    assert r.status == "synced"
    sync.reset()
    assert sync.add_image("first", int(200.69 * 1e9), now_ns=int(200.7 * 1e9)) == []


# ------------------------------------------------------------------------------- episode bags


def _write_episode(bag: Path, storage: str = "mcap", n: int = 30, size: tuple[int, int] = (8, 6),
                   **kw) -> rec.EpisodeWriter:
    ew = rec.EpisodeWriter(bag, _topics(), storage=storage, custom_data={"cardiac_copilot.session_label": "s01"},
                           **kw).open()
    for i in range(n):
        t = 1_000_000_000 + i * 33_000_000
        ew.write(IMAGE, t, _image_bytes(t, i, size))
        ew.write(POSE, t + 1, _pose_bytes(t, i * 1e-3))
        ew.write(SYNC, t + 2, _pose_bytes(t, i * 1e-3))
    ew.write(ANN, 2_000_000_000, bytes(bagio.TYPESTORE.serialize_cdr(bagio.make_string("PLAX"),
                                                                     bagio.STRING_TYPE)))
    return ew


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_episode_bag_is_read_by_rosbags(tmp_path: Path, storage: str) -> None:
    bag = tmp_path / "ep"
    ew = _write_episode(bag, storage)
    assert (bag / "metadata.yaml").exists()
    ew.close()
    reader = bagio.open_reader(bag)
    try:
        counts = {c.topic: c.msgcount for c in reader.connections}
        assert counts == {IMAGE: 30, POSE: 30, SYNC: 30, ANN: 1}
        assert _custom(bag)["cardiac_copilot.session_label"] == "s01"
    finally:
        reader.close()
    msgs = list(bagio.read_messages(bag, [IMAGE]))
    assert msgs[5][2].data[0] == 5 and msgs[5][2].header.stamp.nanosec == (1_000_000_000 + 5 * 33_000_000) % 10**9
    if storage == "mcap":
        from mcap.reader import make_reader

        with open(next(bag.glob("*.mcap")), "rb") as fh:
            reader = make_reader(fh)
            summary = reader.get_summary()
            per_channel = summary.statistics.channel_message_counts
            topics = {summary.channels[c].topic: n for c, n in per_channel.items()}
            assert topics == counts
            assert summary.schemas[1].encoding == "ros2msg"
            assert {m.name for m in reader.iter_metadata()} == {"rosbag2"}


def test_split_by_duration_and_size(tmp_path: Path) -> None:
    ew = _write_episode(tmp_path / "dur", max_file_duration_s=0.25)
    ew.close()
    assert len(ew.files) == 4  # 30 frames x 33 ms ~ 1 s -> 4 files
    reader = bagio.open_reader(tmp_path / "dur")
    try:
        assert {c.topic: c.msgcount for c in reader.connections}[IMAGE] == 30
        assert len(list((tmp_path / "dur").glob("*.mcap"))) == 4
    finally:
        reader.close()
    ew = _write_episode(tmp_path / "size", storage="sqlite3", size=(60, 80), max_file_size_mb=0.05)
    ew.close()
    assert len(ew.files) == 3  # 30 x 4.8 kB in files of at most 50 kB
    assert sum(1 for _ in bagio.read_messages(tmp_path / "size", [IMAGE])) == 30


def test_recover_bag_after_crash_keeps_everything_flushed(tmp_path: Path) -> None:
    bag = tmp_path / "ep"
    ew = _write_episode(bag, n=20)
    ew.flush()
    crashed = tmp_path / "crashed"
    for i in range(20, 25):  # written after the last flush: may be lost
        ew.write(IMAGE, 5_000_000_000 + i, _image_bytes(i))
    shutil.copytree(bag, crashed)  # the disk as a SIGKILL would leave it
    ew.close()
    schemas, channels, messages, complete = rec.read_mcap_stream(next(crashed.glob("*.mcap")))
    assert not complete
    assert sum(1 for m in messages if channels[m.channel_id].topic == IMAGE) >= 20
    with pytest.raises(bagio.BagError):
        bagio.open_reader(crashed)
    report = rec.recover_bag(crashed)
    assert not report.already_finalized and report.counts[IMAGE] >= 20 and report.counts[ANN] == 1
    assert (crashed / (next(crashed.glob("*.mcap")).name + ".crashed")).exists()
    reader = bagio.open_reader(crashed)
    try:
        assert {c.topic: c.msgcount for c in reader.connections}[IMAGE] == report.counts[IMAGE]
        assert _custom(crashed)["cardiac_copilot.recovered"] == "true"
    finally:
        reader.close()
    assert rec.recover_bag(bag).rewritten == []  # a closed bag is left as it is
    assert sum(1 for _ in bagio.read_messages(bag, [IMAGE])) == 25


def test_session_label_validation() -> None:
    assert rec.validate_session_label("site2-op_07") == "site2-op_07"
    for bad in ("", "a b", "../x", "a/b", "John.Smith", "MRN1234567", "x" * 40, "-lead"):
        with pytest.raises(ValueError):
            rec.validate_session_label(bad)
    assert rec.episode_name("s01", 0.0) == "19700101T000000Z_s01"


# ------------------------------------------------------------------------------- Recorder thread


def _recorder(tmp_path: Path, **kw) -> rec.Recorder:
    cfg = rec.RecorderConfig(output_dir=str(tmp_path), session_label="s01", min_free_disk_mb=0.0,
                             flush_period_s=0.1, fsync=False, **kw)
    return rec.Recorder(cfg)


def test_recorder_writes_everything_submitted_before_stop(tmp_path: Path) -> None:
    r = _recorder(tmp_path)
    try:
        assert not r.submit(IMAGE, 1, b"x")  # idle: not recorded
        ok, path = r.start_episode(_topics(), {"cardiac_copilot.session_label": "s01"})
        assert ok, path
        for i in range(200):
            assert r.submit(POSE, 1_000 + i, _pose_bytes(1_000 + i, 0.0))
        ok, msg = r.stop_episode()
        assert ok and msg == path
        meta = bagio.open_reader(path)
        try:
            assert {c.topic: c.msgcount for c in meta.connections}[POSE] == 200
            custom = _custom(path)
            assert custom["cardiac_copilot.recorder.state"] == "closed"
            assert json.loads(custom["cardiac_copilot.recorder.stats"])["written"][POSE] == 200
        finally:
            meta.close()
        assert r.stop_episode() == (False, "no episode is recording")
        ok2, path2 = r.start_episode(_topics(), {})
        assert ok2 and path2 != path  # one bag per episode
        r.stop_episode()
        assert len(r.episodes) == 2
    finally:
        r.shutdown()


def test_recorder_disk_guard_refuses_and_stops(tmp_path: Path) -> None:
    r = _recorder(tmp_path)
    try:
        r.config.min_free_disk_mb = 1e12
        ok, msg = r.start_episode(_topics(), {})
        assert not ok and "disk guard" in msg and r.last_stop_reason == "disk_guard"
        r.config.min_free_disk_mb = 0.0
        ok, path = r.start_episode(_topics(), {})
        assert ok
        r.submit(IMAGE, 10, _image_bytes(10))
        r.config.min_free_disk_mb = 1e12  # the disk "fills" during the episode
        deadline = time.monotonic() + 5
        while r.state == "recording" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not r.recording and r.last_stop_reason == "disk_guard"
        reader = bagio.open_reader(path)  # closed cleanly
        try:
            assert _custom(path)["cardiac_copilot.recorder.stop_reason"] == "disk_guard"
        finally:
            reader.close()
    finally:
        r.shutdown()


def test_recorder_queue_overflow_is_counted_not_blocking(tmp_path: Path) -> None:
    r = _recorder(tmp_path, max_queue_mb=1.0)
    try:
        ok, _ = r.start_episode(_topics(), {})
        assert ok
        big = _image_bytes(1, size=(600, 800))  # 480 kB
        t0 = time.perf_counter()
        accepted = sum(r.submit(IMAGE, i, big) for i in range(50))
        assert time.perf_counter() - t0 < 1.0
        r.stop_episode()
        assert accepted + r.dropped[IMAGE] == 50 and r.dropped[IMAGE] > 0
        assert r.written[IMAGE] == accepted
    finally:
        r.shutdown()
