"""A bag left open by a killed recorder: `dataset build` says how to repair it, and
`cardiac-copilot dataset recover BAG` does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cardiac_copilot_ros import bagio, cli
from cardiac_copilot_ros import recording as rec


def _crashed_bag(tmp_path: Path) -> Path:
    """An episode as a SIGKILL leaves it: flushed part on disk, no MCAP footer, state recording."""
    topics = [rec.TopicSpec("/image", bagio.IMAGE_TYPE), rec.TopicSpec("/probe_pose", bagio.POSE_TYPE),
              rec.TopicSpec("/annotations", bagio.STRING_TYPE)]
    bag = tmp_path / "live" / "ep"
    ew = rec.EpisodeWriter(bag, topics, custom_data={"cardiac_copilot.recorder.state": "recording"}).open()
    ann = bytes(bagio.TYPESTORE.serialize_cdr(bagio.make_string("PLAX"), bagio.STRING_TYPE))
    for i in range(40):
        t = 1_000_000_000 + i * 33_000_000
        img = np.full((48, 64), i, np.uint8)
        ew.write("/image", t, bytes(bagio.TYPESTORE.serialize_cdr(bagio.make_image(t, "us_image", img),
                                                                  bagio.IMAGE_TYPE)))
        for k in range(4):
            tp = t + k * 8_250_000
            ew.write("/probe_pose", tp, rec.serialize_pose_stamped_cdr(tp, "panda_link0", [0.1 + i * 1e-3, 0, 0.3],
                                                                       [0, 0, 0, 1]))
        if i == 39:
            ew.write("/annotations", t, ann)
    ew.flush()
    crashed = tmp_path / "bags" / "ep"
    shutil.copytree(bag, crashed)  # the disk as the kill left it
    ew.close()
    return crashed


def test_build_names_the_repair_and_recover_repairs(tmp_path: Path, capsys) -> None:
    bag = _crashed_bag(tmp_path)
    assert rec.unfinished_bag_reason(bag)
    rc = cli.main(["dataset", "build", str(bag), "--out", str(tmp_path / "cache"), "--size", "16", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"cardiac-copilot dataset recover {bag}" in err and "recover_bag" in err, err
    assert len(err.strip().splitlines()) == 1  # one clear line

    assert cli.main(["dataset", "recover", str(bag)]) == 0
    assert "recovered" in capsys.readouterr().out
    assert rec.unfinished_bag_reason(bag) is None
    assert sum(1 for _ in bagio.read_messages(bag, ["/image"])) == 40
    assert cli.main(["dataset", "recover", str(bag)]) == 0  # closed now: left as it is
    assert "closed already" in capsys.readouterr().out
    rc = cli.main(["dataset", "build", str(bag), "--out", str(tmp_path / "cache"), "--size", "16", "--quiet",
                   "--val-fraction", "0", "--test-fraction", "0"])
    assert rc == 0, capsys.readouterr().err

    assert cli.main(["dataset", "recover", str(tmp_path / "nothing")]) == 1
    assert "not a bag directory" in capsys.readouterr().err
