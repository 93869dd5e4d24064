"""dataset build on synthetic recordings: round trip, interpolation, skips, demonstrations,
sqlite3 and Humble bags, compressed images, topic choice, bad input, atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_data_reference import check_round_trip, raw_streams

from cardiac_copilot_ros import bagio
from cardiac_copilot_ros.data.build import BuildOptions, DatasetError, build_cache, demo_ends, find_bags
from cardiac_copilot_ros.data.dataset import load_manifest
from cardiac_copilot_ros.data.synthetic import (
    NS,
    SyntheticScan,
    frame_image,
    image_times_s,
    trajectory_matrix,
    write_synthetic_bag,
)
from cardiac_copilot_ros.pose import pose_error

SIZE = 16


def opts(**kw) -> BuildOptions:
    kw.setdefault("size", SIZE)
    return BuildOptions(**kw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict]:
    """Four bags: Jazzy MCAP x2 subjects, Jazzy sqlite3, Humble sqlite3, Humble MCAP (+ a cache)."""
    root = tmp_path_factory.mktemp("mixed")
    bags = root / "bags"
    write_synthetic_bag(bags / "s1_a", SyntheticScan(subject_id="s1", seed=1))
    write_synthetic_bag(bags / "s1_b", SyntheticScan(subject_id="s1", seed=2), storage="sqlite3")
    write_synthetic_bag(bags / "nested" / "s2_a", SyntheticScan(subject_id="s2", seed=3))
    write_synthetic_bag(bags / "humble_sql", SyntheticScan(seed=4), storage="sqlite3", distro="humble")
    write_synthetic_bag(bags / "humble_mcap", SyntheticScan(seed=5), distro="humble")
    manifest = build_cache([bags], root / "cache", opts(), progress=False)
    return root, manifest


def test_round_trip_all_storages_and_distros(mixed):
    root, manifest = mixed
    cache = root / "cache"
    assert load_manifest(cache) == manifest
    n = check_round_trip(cache, manifest)
    assert n == manifest["totals"]["frames"] == 5 * 90
    # subject ids: custom_data for Jazzy bags, bag name for Humble (no custom_data there)
    by_name = {Path(b["path"]).name: b for b in manifest["bags"]}
    assert by_name["s1_b"]["subject_id"] == "s1"
    assert by_name["humble_sql"]["subject_id"] == "humble_sql"
    assert by_name["humble_sql"]["subject_source"] == "bag name"
    assert set(manifest["subjects"]) == {"s1", "s2", "humble_sql", "humble_mcap"}


def test_cache_images_are_the_bag_frames_resized(mixed):
    root, manifest = mixed
    images = np.load(root / "cache" / "images.npy", mmap_mode="r")
    stamps = np.load(root / "cache" / "stamp_ns.npy")
    scan = np.load(root / "cache" / "scan.npy")
    assert images.shape[1:] == (SIZE, SIZE) and images.dtype == np.uint8
    for entry in manifest["bags"]:
        rows = np.flatnonzero(scan == entry["scan"])
        raw = raw_streams(Path(entry["path"]))["image_ns"]
        k = np.searchsorted(raw, stamps[rows])  # frame number in the bag
        assert np.array_equal(raw[k], stamps[rows])
        expect = np.stack([frame_image(int(i), (SIZE, SIZE)) for i in k])
        assert np.array_equal(np.asarray(images[rows]), expect)


def test_manifest_contents(mixed):
    root, manifest = mixed
    for key in ("format_version", "created", "code_version", "input_size", "crop", "topics", "bags",
                "totals", "planes", "splits", "subjects", "action_stats", "manifest_sha256"):
        assert key in manifest, key
    assert manifest["input_size"] == [SIZE, SIZE]
    for b in manifest["bags"]:
        assert len(b["sha256"]) == 64 and b["files"] and "metadata.yaml" in b["files"]
        assert set(b["skips"]) >= {"before_first_pose", "after_last_pose", "pose_gap", "after_last_annotation"}
    st = manifest["action_stats"]
    actions = np.load(root / "cache" / "actions.npy")
    subject = np.load(root / "cache" / "subject.npy")
    train = np.isin(subject, [manifest["subjects"][s] for s in manifest["splits"]["train"]])
    assert np.allclose(st["mean"], actions[train].mean(0), atol=1e-4)
    assert np.allclose(st["std"], actions[train].std(0), atol=1e-4)
    # the digest covers the content
    edited = json.loads((root / "cache" / "manifest.json").read_text())
    edited["splits"]["train"].append("intruder")
    (root / "edited").mkdir()
    for f in (root / "cache").iterdir():
        shutil.copy(f, root / "edited" / f.name)
    (root / "edited" / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(DatasetError, match="manifest_sha256"):
        load_manifest(root / "edited")


def test_interpolation_matches_known_trajectory(tmp_path):
    """Sparse poses (25 Hz): linear position + slerp orientation reproduce the analytic
    constant-velocity / constant-rate trajectory exactly; nearest-pose pairing would not."""
    scan = SyntheticScan(pose_hz=25.0, annotations=((2.9, "PLAX"),), seed=7)
    write_synthetic_bag(tmp_path / "bag", scan)
    m = build_cache([tmp_path / "bag"], tmp_path / "cache", opts(max_pose_gap_ms=50), progress=False)
    stamps = np.load(tmp_path / "cache" / "stamp_ns.npy")
    poses = np.load(tmp_path / "cache" / "poses.npy").astype(np.float64)
    truth = trajectory_matrix((stamps - scan.start_ns) / NS)
    dt, dr = pose_error(poses, truth)
    assert dt.max() < 1e-3 and dr.max() < 1e-3, (dt.max(), dr.max())
    # the frames really fall between poses (weights far from 0/1), so this tested interpolation
    frac = ((stamps - scan.start_ns) / NS * 25.0) % 1.0
    assert ((frac > 0.2) & (frac < 0.8)).sum() > 20
    # the target is the pose at the annotation time
    target = np.load(tmp_path / "cache" / "targets.npy")
    dt, dr = pose_error(target[0], trajectory_matrix(np.array([2.9]))[0])
    assert dt < 1e-3 and dr < 1e-3
    assert m["totals"]["frames"] == 90


def test_skips_are_counted_and_demonstrations_split(tmp_path):
    scan = SyntheticScan(images_lead_s=0.3, pose_gaps_s=((1.0, 1.1),),
                         annotations=((1.5, "PLAX"), (2.0, "PSAX-MV"), (2.2, "not a plane")), seed=9)
    write_synthetic_bag(tmp_path / "bag", scan)
    m = build_cache([tmp_path / "bag"], tmp_path / "cache", opts(hold_ms=300), progress=False)
    t = np.sort(image_times_s(scan))
    skips = m["bags"][0]["skips"]
    assert skips["before_first_pose"] == int((t < 0).sum()) > 0
    gap = (t > 1.0) & (t < 1.1)  # between the two poses around the gap
    assert abs(skips["pose_gap"] - int(gap.sum())) <= 1 and skips["pose_gap"] > 0
    # demo ends: PLAX min(1.5 + 0.3, 1.75) = 1.75; PSAX-MV 2.0 + 0.3; later frames have no target
    ends = [1.75, 2.3]
    assert skips["after_last_annotation"] == int((t > ends[1]).sum()) > 0
    assert m["bags"][0]["annotations_ignored"][0]["text"] == "not a plane"
    assert m["totals"]["frames"] == len(t) - sum(skips.values())
    stamps_s = (np.load(tmp_path / "cache" / "stamp_ns.npy") - scan.start_ns) / NS
    demo = np.load(tmp_path / "cache" / "demo.npy")
    plane = np.load(tmp_path / "cache" / "plane.npy")
    assert np.array_equal(demo, (stamps_s > ends[0]).astype(int))
    assert m["planes"] == ["PLAX", "PSAX-MV"]   # the views found; the plane column indexes them
    assert np.array_equal(plane, np.where(stamps_s > ends[0], 1, 0))
    assert [d["plane"] for d in m["demos"]] == [0, 1]
    # the actions at the annotation instants are ~0 (the probe is at the target)
    actions = np.load(tmp_path / "cache" / "actions.npy")
    near = np.abs(stamps_s - 1.5) < 0.02
    assert np.abs(actions[near & (demo == 0)]).max() < 0.5
    check_round_trip(tmp_path / "cache", m)


def test_demo_ends_rule():
    ends = demo_ends(np.array([10, 100, 105]) * 1_000_000, 20 * 1_000_000)
    assert list(ends // 1_000_000) == [30, 102, 125]


def test_compressed_images_and_crop(tmp_path):
    scan = SyntheticScan(image_shape=(60, 80), seed=11)
    write_synthetic_bag(tmp_path / "bag", scan, compressed=True, image_topic="/us/image/compressed")
    m = build_cache([tmp_path / "bag"], tmp_path / "cache", opts(crop=(10, 5, 40, 30)), progress=False)
    assert m["bags"][0]["topics"]["image"] == "/us/image/compressed"  # default absent: the only image topic
    assert m["bags"][0]["topics"]["image_type"] == bagio.COMPRESSED_IMAGE_TYPE
    assert m["crop"] == [10, 5, 40, 30]
    images = np.load(tmp_path / "cache" / "images.npy")
    assert images.shape == (90, SIZE, SIZE)
    assert np.array_equal(images[:, 0, 0], np.arange(90) % 251)
    with pytest.raises(DatasetError, match="outside"):
        build_cache([tmp_path / "bag"], tmp_path / "c2", opts(crop=(50, 0, 40, 30)), progress=False)
    assert not (tmp_path / "c2").exists()


def test_topic_resolution(tmp_path):
    # a single candidate of the right type replaces an absent default name
    write_synthetic_bag(tmp_path / "one", SyntheticScan(), image_topic="/cam/image_raw",
                        pose_topic="/franka/current_pose", annotation_topic="/expert/annotations")
    m = build_cache([tmp_path / "one"], tmp_path / "c1", opts(), progress=False)
    assert m["bags"][0]["topics"]["pose"] == "/franka/current_pose"
    # several candidates: a clear error naming them
    write_synthetic_bag(tmp_path / "two", SyntheticScan(extra_topics={"/cam_b": bagio.IMAGE_TYPE}),
                        image_topic="/cam_a")
    with pytest.raises(DatasetError, match=r"/cam_a.*/cam_b.*--image-topic"):
        build_cache([tmp_path / "two"], tmp_path / "c2", opts(), progress=False)
    # ... unless the topic is named
    m = build_cache([tmp_path / "two"], tmp_path / "c2", opts(image_topic="/cam_a"), progress=False)
    assert m["totals"]["frames"] == 90
    # a named topic of the wrong type
    with pytest.raises(DatasetError, match="pose topic /annotations has type std_msgs/msg/String"):
        build_cache([tmp_path / "two"], tmp_path / "c3", opts(image_topic="/cam_a", pose_topic="/annotations"),
                    progress=False)


@pytest.mark.parametrize("case, match", [
    ("no_pose_topic", "no pose topic"),
    ("no_annotation_topic", "no annotation topic"),
    ("no_image_topic", "no image topic"),
    ("poses_elsewhere", "no usable frames.*same clock"),
    ("no_plane_names", "names a known view"),
    ("corrupt_mcap", "corrupt or unreadable bag"),
    ("corrupt_sqlite", "corrupt or unreadable bag"),
    ("truncated_mcap", "corrupt or unreadable bag"),
])
def test_bad_input_is_a_clear_error(tmp_path, case, match):
    bag = tmp_path / "bag"
    if case == "no_pose_topic":
        write_synthetic_bag(bag, SyntheticScan(), pose_topic=None)
    elif case == "no_annotation_topic":
        write_synthetic_bag(bag, SyntheticScan(), annotation_topic=None)
    elif case == "no_image_topic":
        with bagio.BagWriter(bag) as w:
            c = w.add_topic("/probe_pose", bagio.POSE_TYPE)
            w.write(c, 1, bagio.make_pose_stamped(1, "b", [0, 0, 0], [0, 0, 0, 1]))
            w.add_topic("/annotations", bagio.STRING_TYPE)
    elif case == "poses_elsewhere":  # images without poses: tracker on another clock
        write_synthetic_bag(bag, SyntheticScan(pose_clock_offset_s=100.0))
    elif case == "no_plane_names":
        write_synthetic_bag(bag, SyntheticScan(annotations=((1.0, "start"), (2.0, "stop"))))
    else:
        write_synthetic_bag(bag, SyntheticScan(), storage="sqlite3" if "sqlite" in case else "mcap")
        f = next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if case.startswith("truncated") else b"\x00garbage" * 500)
    with pytest.raises(DatasetError, match=match) as info:
        build_cache([bag], tmp_path / "cache", opts(), progress=False)
    assert str(bag) in str(info.value) or case == "poses_elsewhere"
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob(".cache*"))  # no temp leftovers


def test_skip_bad_bags_records_them(tmp_path):
    write_synthetic_bag(tmp_path / "bags" / "good", SyntheticScan())
    write_synthetic_bag(tmp_path / "bags" / "bad", SyntheticScan())
    (tmp_path / "bags" / "bad" / "bad.mcap").write_bytes(b"junk")
    m = build_cache([tmp_path / "bags"], tmp_path / "cache", opts(skip_bad_bags=True), progress=False)
    assert m["totals"]["frames"] == 90 and m["totals"]["bags_skipped"] == 1
    assert "bad" in m["skipped_bags"][0]["path"] and "corrupt" in m["skipped_bags"][0]["error"]


def test_output_is_atomic_and_never_silently_overwritten(tmp_path):
    write_synthetic_bag(tmp_path / "bag", SyntheticScan())
    out = tmp_path / "cache"
    first = build_cache([tmp_path / "bag"], out, opts(), progress=False)
    with pytest.raises(DatasetError, match="--force"):
        build_cache([tmp_path / "bag"], out, opts(), progress=False)
    second = build_cache([tmp_path / "bag"], out, opts(size=24), force=True, progress=False)
    assert second["input_size"] == [24, 24] and load_manifest(out)["input_size"] == [24, 24]
    assert first["bags"][0]["sha256"] == second["bags"][0]["sha256"]
    # a failed rebuild leaves the old cache untouched
    with pytest.raises(DatasetError):
        build_cache([tmp_path / "bag"], out, opts(pose_topic="/annotations"), force=True, progress=False)
    assert load_manifest(out)["manifest_sha256"] == second["manifest_sha256"]
    # never replace a directory that is not a cache
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(DatasetError, match="not a training cache"):
        build_cache([tmp_path / "bag"], tmp_path / "precious", opts(), force=True, progress=False)
    assert (tmp_path / "precious" / "thesis.tex").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag", "cache", "precious"]


def test_find_bags(tmp_path):
    write_synthetic_bag(tmp_path / "a" / "x", SyntheticScan())
    write_synthetic_bag(tmp_path / "a" / "deep" / "y", SyntheticScan())
    (tmp_path / "a" / "index.json").write_text("{}")
    found = find_bags([tmp_path / "a", tmp_path / "a" / "x"])
    assert [p.name for p in found] == ["y", "x"] or [p.name for p in found] == ["x", "y"]
    assert len(found) == 2
    with pytest.raises(DatasetError, match="not a rosbag2 bag"):
        find_bags([tmp_path / "a" / "index.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no rosbag2 bags"):
        find_bags([tmp_path / "empty"])
    with pytest.raises(DatasetError, match="no such"):
        find_bags([tmp_path / "missing"])


def test_parallel_workers_give_the_same_cache(mixed, tmp_path):
    root, manifest = mixed
    m = build_cache([root / "bags"], tmp_path / "cache", opts(workers=2), progress=False)
    for name in ("actions", "images", "demo", "subject"):
        assert np.array_equal(np.load(root / "cache" / f"{name}.npy"), np.load(tmp_path / "cache" / f"{name}.npy"))
    assert m["splits"] == manifest["splits"]


def test_damaged_messages_are_counted_not_fatal(tmp_path):
    """A garbage image message, an unsupported encoding and a zero quaternion in a good bag."""
    t0 = 1_700_000_000 * NS
    bag = tmp_path / "bag"
    with bagio.BagWriter(bag) as w:
        ci = w.add_topic(bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE)
        cp = w.add_topic(bagio.POSE_TOPIC, bagio.POSE_TYPE)
        ca = w.add_topic(bagio.ANNOTATION_TOPIC, bagio.STRING_TYPE)
        for k in range(251):
            q = [0, 0, 0, 0] if k == 100 else [0, 0, 0, 1]
            w.write(cp, t0 + k * 4_000_000, bagio.make_pose_stamped(t0 + k * 4_000_000, "b", [k * 1e-4, 0, 0], q))
        for k in range(30):
            stamp = t0 + 5_000_000 + k * 33_000_000
            msg = bagio.make_image(stamp, "us_image", np.full((8, 8), k, np.uint8))
            if k == 3:
                msg.encoding = "yuv422"
            if k == 4:
                w.write_raw(ci, stamp, b"\x00\x01")
            else:
                w.write(ci, stamp, msg)
        w.write(ca, t0 + 990_000_000, bagio.make_string("PLAX"))
    m = build_cache([bag], tmp_path / "cache", opts(), progress=False)
    b = m["bags"][0]
    assert b["skips"]["bad_image"] == 2 and b["bad_pose_messages"] == 1
    assert m["totals"]["frames"] == 28
    check_round_trip(tmp_path / "cache", m)
