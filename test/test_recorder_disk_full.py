"""The recorder when the disk fills or a write fails, for real: a child process records into a
private tmpfs (a mount namespace of its own: `unshare -rm`; skipped where the kernel or container
forbids it) or under RLIMIT_FSIZE (the kernel answers EFBIG; works everywhere).

Checked: the disk guard stops before ENOSPC when min_free_disk_mb is too small for the measured
data rate (and says so once); a write that fails (ENOSPC, EFBIG) stops the episode with stop
reason ``write_error`` and leaves a finalized bag that rosbags and the mcap library read, holding
everything flushed before the failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cardiac_copilot_ros import bagio
from cardiac_copilot_ros import recording as rec

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, shutil, sys, time
import numpy as np
from cardiac_copilot_ros import bagio
from cardiac_copilot_ros import recording as rec

out, storage, mode, copy_to, min_free = sys.argv[1:6]
logs = []
topics = [rec.TopicSpec("/image", bagio.IMAGE_TYPE), rec.TopicSpec("/probe_pose", bagio.POSE_TYPE)]
img = bytes(bagio.TYPESTORE.serialize_cdr(
    bagio.make_image(0, "us_image", np.zeros((300, 340), np.uint8)), bagio.IMAGE_TYPE))  # 100 kB
if mode == "fsize":
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 2**20, 3 * 2**20))  # no file over 3 MiB
r = rec.Recorder(rec.RecorderConfig(output_dir=out, session_label="s01", storage=storage,
                                    min_free_disk_mb=float(min_free), flush_period_s=0.1, fsync=False),
                 log=lambda level, text: logs.append([level, text]))
ok, bag = r.start_episode(topics, {})
assert ok, bag


def feed(n, rate_hz):
    sent = 0
    for _ in range(n):
        if not r.recording:
            break
        t = time.time_ns()
        r.submit("/image", t, img)
        r.submit("/probe_pose", t, rec.serialize_pose_stamped_cdr(t, "panda_link0", [0.1, 0, 0.3], [0, 0, 0, 1]))
        sent += 1
        if rate_hz:
            time.sleep(1 / rate_hz)
    return sent


def settle(timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while r.queued_bytes and time.monotonic() < deadline:
        time.sleep(0.02)


flushed = 0
if mode == "fill":
    flushed = feed(20, 0)  # 2 MB, flushed within 0.1 s
    settle()
    time.sleep(0.5)
    r.config.flush_period_s = 60.0  # the next 3 MB stay in the MCAP chunk in memory
    feed(30, 0)
    settle()
    # another program fills the disk, at once (a disk check in the middle would stop the
    # episode while the 3 MB chunk still fits: a clean disk_guard stop, not what is tested here)
    with open(os.path.join(out, "filler"), "wb", buffering=0) as fh:
        st = os.statvfs(out)
        try:
            os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize)
        except OSError:
            pass
        try:
            while True:
                fh.write(bytes(4096))
        except OSError:
            pass
    feed(10, 0)
else:
    feed(3000, 100)  # 10 MB/s for up to 30 s
deadline = time.monotonic() + 30
while r.state == "recording" and time.monotonic() < deadline:
    time.sleep(0.05)
reason, errors = r.last_stop_reason, r.errors
r.shutdown()
shutil.copytree(bag, copy_to)
print(json.dumps({"reason": reason, "errors": errors, "logs": logs, "flushed_images": flushed}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tmpfs_cmd(mnt: Path, size_mb: int, args: list[str]) -> list[str]:
    """Run ``args`` in a mount namespace of its own with a tmpfs of size_mb on ``mnt``."""
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size_mb}m tmpfs "$0" && exec "$@"',
            str(mnt), *args]


@pytest.fixture(scope="module")
def tmpfs_ok(tmp_path_factory) -> None:
    mnt = tmp_path_factory.mktemp("probe_mount")
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` (util-linux): cannot make a private tmpfs to fill")
    res = subprocess.run(_tmpfs_cmd(mnt, 1, ["true"]), capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here (user/mount namespaces not allowed): "
                    f"{res.stderr.strip()[:200]}")


def _run(tmp_path: Path, storage: str, mode: str, min_free_mb: float, tmpfs_mb: int | None) -> dict:
    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-c", CHILD, str(out), storage, mode, str(tmp_path / "bag"), str(min_free_mb)]
    cmd = _tmpfs_cmd(out, tmpfs_mb, args) if tmpfs_mb else args
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check_bag(bag: Path, storage: str) -> tuple[dict, dict[str, int]]:
    """A finalized bag: state closed, no reserve left, metadata counts == what readers find."""
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    custom = info["custom_data"]
    assert custom["cardiac_copilot.recorder.state"] == "closed"
    assert not (bag / rec.RESERVE_NAME).exists()
    counts: dict[str, int] = {}
    for topic, _, _ in bagio.read_messages(bag):  # rosbags
        counts[topic] = counts.get(topic, 0) + 1
    assert sum(counts.values()) == info["message_count"]
    meta_counts = {t["topic_metadata"]["name"]: t["message_count"] for t in info["topics_with_message_count"]}
    assert {k: v for k, v in meta_counts.items() if v} == counts
    if storage == "mcap":
        from mcap.reader import make_reader

        n = 0
        for f in sorted(bag.glob("*.mcap")):
            with open(f, "rb") as fh:
                n += sum(1 for _ in make_reader(fh).iter_messages())
        assert n == info["message_count"]
    return custom, counts


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_file_size_limit_stops_with_write_error_and_a_readable_bag(tmp_path: Path, storage: str) -> None:
    got = _run(tmp_path, storage, "fsize", 0.0, None)
    assert got["reason"] == "write_error" and got["errors"] >= 1, got
    custom, counts = _check_bag(tmp_path / "bag", storage)
    assert custom["cardiac_copilot.recorder.stop_reason"] == "write_error"
    stats = json.loads(custom["cardiac_copilot.recorder.stats"])
    assert "write_error" in stats and sum(stats["lost_after_last_flush"].values()) > 0
    assert counts.get("/image", 0) >= 5  # what was flushed before the failure is kept
    assert any(level == "error" and "write" in text for level, text in got["logs"])


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_disk_filled_by_another_program_stops_with_write_error(tmp_path: Path, storage: str,
                                                                tmpfs_ok: None) -> None:
    got = _run(tmp_path, storage, "fill", 0.0, 48)
    assert got["reason"] == "write_error", got
    custom, counts = _check_bag(tmp_path / "bag", storage)
    assert custom["cardiac_copilot.recorder.stop_reason"] == "write_error"
    assert counts["/image"] >= got["flushed_images"]  # everything flushed before the disk filled


def test_disk_guard_margin_follows_the_data_rate(tmp_path: Path, tmpfs_ok: None) -> None:
    # 2 MiB is less than 1 s of data (10 MB/s) plus a 4 MiB MCAP chunk: with that margin alone
    # the disk fills between two checks
    got = _run(tmp_path, "mcap", "rate", 2.0, 64)
    assert got["reason"] == "disk_guard", got
    custom, counts = _check_bag(tmp_path / "bag", "mcap")
    assert custom["cardiac_copilot.recorder.stop_reason"] == "disk_guard"
    assert "write_error" not in json.loads(custom["cardiac_copilot.recorder.stats"])
    assert counts["/image"] > 100
    warnings = [text for level, text in got["logs"] if level == "warning" and "min_free_disk_mb" in text]
    assert len(warnings) == 1, got["logs"]
    from mcap.reader import make_reader  # closed normally: full summary

    with open(next((tmp_path / "bag").glob("*.mcap")), "rb") as fh:
        assert make_reader(fh).get_summary().statistics.channel_message_counts
