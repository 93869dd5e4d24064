"""`cardiac-copilot dataset build|info`: exit codes, clear one-line errors, summary output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cardiac_copilot_ros.cli import main
from cardiac_copilot_ros.data.synthetic import SyntheticScan, write_synthetic_bag


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clibags")
    for i in range(3):
        write_synthetic_bag(root / f"b{i}", SyntheticScan(subject_id=f"p{i}", seed=i))
    return root


def test_build_and_info(bags, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["dataset", "build", str(bags), "--out", str(out), "--size", "16", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    for word in ("train", "val", "test", "PLAX", "PSAX-AV", "action statistics", "x [mm]", "yaw [deg]",
                 "skipped frames: none", "manifest_sha256"):
        assert word in text, word
    assert main(["dataset", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert info.splitlines()[1:] == text.splitlines()[1:len(info.splitlines())]
    # exists -> error without --force, then --force works
    assert main(["dataset", "build", str(bags), "--out", str(out), "--size", "16"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["dataset", "build", str(bags), "--out", str(out), "--size", "16", "--force", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("setup, args, match", [
    ("missing_topic", [], "no pose topic"),
    ("corrupt", [], "corrupt or unreadable bag"),
    ("no_poses", [], "no usable frames"),
    ("ok", ["--pose-topic", "/annotations"], "has type std_msgs/msg/String"),
    ("ok", ["--crop", "1,2,3"], None),
    ("ok", ["--val-fraction", "0.7", "--test-fraction", "0.5"], "must be < 1"),
    ("nothing", [], "no rosbag2 bags"),
])
def test_bad_input_exit_codes(tmp_path, capsys, setup, args, match):
    bag = tmp_path / "in" / "bag"
    if setup == "missing_topic":
        write_synthetic_bag(bag, SyntheticScan(), pose_topic=None)
    elif setup == "corrupt":
        write_synthetic_bag(bag, SyntheticScan())
        (bag / "bag.mcap").write_bytes(b"not an mcap file")
    elif setup == "no_poses":
        write_synthetic_bag(bag, SyntheticScan(pose_clock_offset_s=-50.0))
    elif setup == "ok":
        write_synthetic_bag(bag, SyntheticScan())
    else:
        (tmp_path / "in").mkdir()
    argv = ["dataset", "build", str(tmp_path / "in"), "--out", str(tmp_path / "cache"), "--size", "8", *args]
    if match is None:  # argparse usage error
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        return
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cardiac-copilot dataset build: error:")
    assert not (tmp_path / "cache").exists()


def test_info_on_a_non_cache(tmp_path, capsys):
    assert main(["dataset", "info", str(tmp_path)]) == 1
    assert "not a training cache" in capsys.readouterr().err


def test_entry_point_process_exit_code(bags, tmp_path):
    """The real process: exit status and no traceback for bad input."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "cardiac_copilot_ros", "dataset", "build", str(tmp_path / "none"),
                           "--out", str(tmp_path / "c")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and "no such bag" in proc.stderr and "Traceback" not in proc.stderr
