"""recorder_node keeps the probe calibration in every episode's /tf_static (issue 15, item 2)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import NodeProcess, ros_node, spin_until

from cardiac_copilot_ros import bagio
from cardiac_copilot_ros.data.calibration import calibration_from_tf, load_calibration, static_transforms

pytestmark = pytest.mark.ros

MODULE = "cardiac_copilot_ros.nodes.recorder_node"
CALIB = """parent_frame: tool0
child_frame: us_image
translation_m: [0.01, -0.02, 0.105]
quaternion_xyzw: [0.0, 0.0, 0.3826834, 0.9238795]
"""


def _wait(pred, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except (OSError, KeyError, TypeError, ValueError):
            pass
        time.sleep(0.1)
    return False


def _trigger(node, name: str, timeout_s: float = 20.0):
    from std_srvs.srv import Trigger

    client = node.create_client(Trigger, name)
    assert client.wait_for_service(timeout_sec=timeout_s), f"service {name} not available"
    fut = client.call_async(Trigger.Request())
    assert spin_until(node, fut.done, timeout_s), f"{name} did not answer"
    node.destroy_client(client)
    return fut.result()


def test_probe_calibration_in_every_episode_bag(tmp_path: Path) -> None:
    (tmp_path / "probe.yaml").write_text(CALIB)
    out = tmp_path / "bags"
    params = {"output_dir": str(out), "min_free_disk_mb": 1.0, "fsync": False,
              "probe_calibration": str(tmp_path / "probe.yaml")}
    with ros_node("rec_calib_probe") as node, \
            NodeProcess(MODULE, params, log_path=tmp_path / "node.log") as proc:
        for _ in range(2):   # two episodes: both get the calibration
            res = _trigger(node, "/recorder_node/start_episode")
            assert res.success, res.message
            res = _trigger(node, "/recorder_node/stop_episode")
            assert res.success, res.message
        assert proc.alive()
    want = load_calibration(tmp_path / "probe.yaml")
    episodes = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(episodes) == 2
    for bag in episodes:
        msgs = [m for _, _, m in bagio.read_messages(bag, ["/tf_static"])]
        assert len(msgs) == 1
        got = calibration_from_tf(static_transforms(msgs), "us_image")
        assert got is not None and got.parent_frame == "tool0" and got.child_frame == "us_image"
        np.testing.assert_allclose(got.matrix_mm(), want.matrix_mm(), atol=1e-9)


def test_bad_probe_calibration_refused_at_startup(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(CALIB.replace("0.105", "105.0"))
    params = {"output_dir": str(tmp_path / "bags"), "probe_calibration": str(tmp_path / "bad.yaml")}
    proc = NodeProcess(MODULE, params, log_path=tmp_path / "node.log").start()
    assert _wait(lambda: not proc.alive(), 30.0)
    log = (tmp_path / "node.log").read_text()
    assert "probe_calibration" in log and "not millimetres" in log
