"""Every node as a real child process: clean exit on SIGINT, double SIGINT, SIGTERM, SIGINT in start-up.

`ros2 launch` answers Ctrl-C with two SIGINTs in quick succession (the terminal's process group and
launch's own forward), then SIGTERM after a timeout. Each node must exit with status 0, one log line
about the signal, no KeyboardInterrupt traceback and no C++ abort ("terminate called ...").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ros_helpers import REPO, NodeProcess, ros_node, spin_until

pytestmark = pytest.mark.ros

NODES = {
    "guidance": "cardiac_copilot_ros.nodes.guidance_node",
    "recorder": "cardiac_copilot_ros.nodes.recorder_node",
    "servo": "cardiac_copilot_ros.nodes.servo_node",
    "sim": "cardiac_copilot_ros.nodes.scanner_sim_node",
}
#: What each node has mapped once its start-up is under way (SIGINT then lands in start-up):
#: guidance is importing torch, the others are importing rclpy.
STARTUP_LIB = {"guidance": "libtorch", "recorder": "_rclpy_pybind11", "servo": "_rclpy_pybind11",
               "sim": "_rclpy_pybind11"}
BAD = ("Traceback", "terminate called", "KeyboardInterrupt", "Aborted", "ExternalShutdownException")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cardiac_copilot_ros.model.bundle import make_untrained_bundle

    path = tmp_path_factory.getbasetemp() / "guidance_r18_64.pt"  # the one test_guidance_node.py makes
    if not path.exists():
        make_untrained_bundle(path, backbone="resnet18", input_size=(64, 64))
    return path


@pytest.fixture(scope="module")
def probe():
    with ros_node("signals_probe") as node:
        yield node


def _process(kind: str, tmp_path: Path, bundle: Path) -> tuple[NodeProcess, str]:
    name = f"sig_{kind}_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    ns = f"/{name}_ns"
    remaps = {"__ns": ns}
    params: dict[str, object] = {}
    if kind == "guidance":
        params = {"model_path": str(bundle), "device": "cpu", "num_threads": 1}
    elif kind == "recorder":
        params = {"output_dir": str(tmp_path / "bags"), "autostart": True, "min_free_disk_mb": 1.0,
                  "fsync": False}
    elif kind == "sim":
        params = {"image_size": 48}
    proc = NodeProcess(NODES[kind], params=params, remaps=remaps, name=name, log_path=tmp_path / "node.log")
    return proc, f"{ns}/{name}"


def _wait_spinning(probe, fqn: str, proc: NodeProcess, log: Path, timeout_s: float = 90.0) -> None:
    """Event: the node answers a parameter service call, i.e. it is built and its executor spins."""
    from rcl_interfaces.srv import ListParameters

    cli = probe.create_client(ListParameters, f"{fqn}/list_parameters")
    try:
        assert spin_until(probe, lambda: cli.service_is_ready() or not proc.alive(), timeout_s), log.read_text()
        deadline = time.monotonic() + timeout_s
        while proc.alive() and time.monotonic() < deadline:
            # retried: a server that has not yet discovered the client's response reader drops the
            # response ("failed to send response"), which happens on a loaded machine
            fut = cli.call_async(ListParameters.Request())
            if spin_until(probe, lambda f=fut: f.done() or not proc.alive(), 5.0) and fut.done():
                return
            cli.remove_pending_request(fut)
        raise AssertionError(f"{fqn} never answered; alive={proc.alive()}\n{log.read_text()}")
    finally:
        probe.destroy_client(cli)


def _keep_guidance_busy(probe, ns: str, proc: NodeProcess, log: Path) -> None:
    """Publish frames until guidance answers, then keep a thread publishing while the test signals."""
    import threading

    import numpy as np
    from geometry_msgs.msg import TwistStamped
    from sensor_msgs.msg import Image

    from cardiac_copilot_ros.nodes.conversions import gray_to_image_msg

    got: list[TwistStamped] = []
    sub = probe.create_subscription(TwistStamped, f"{ns}/guidance", got.append, 10)
    pub = probe.create_publisher(Image, f"{ns}/image", 10)
    frame = np.random.default_rng(0).integers(0, 256, size=(96, 96), dtype=np.uint8)
    deadline = time.monotonic() + 60.0
    while not got and proc.alive() and time.monotonic() < deadline:
        pub.publish(gray_to_image_msg(frame, time.time_ns(), "us_image"))
        spin_until(probe, lambda: bool(got), 0.1)
    probe.destroy_subscription(sub)
    assert got, log.read_text()

    def feed() -> None:
        while proc.alive():
            pub.publish(gray_to_image_msg(frame, time.time_ns(), "us_image"))
            time.sleep(0.005)
        probe.destroy_publisher(pub)

    threading.Thread(target=feed, daemon=True).start()


def _wait_mapped(proc: NodeProcess, lib: str, timeout_s: float = 60.0) -> bool:
    """Event: the child process has mapped a shared library whose path contains ``lib``."""
    maps = Path(f"/proc/{proc.proc.pid}/maps")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.alive():
        try:
            if lib in maps.read_text():
                return True
        except OSError:
            return False
        time.sleep(0.002)
    return False


def _wait_exit(proc: NodeProcess, timeout_s: float = 30.0) -> int | None:
    try:
        return proc.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.proc.kill()
        proc.proc.wait()
        return None


def _check_clean(rc: int | None, log: Path, signame: str) -> str:
    text = log.read_text(errors="replace")
    assert rc == 0, f"exit status {rc}\n{text}"
    for bad in BAD:
        assert bad not in text, f"{bad!r} in output\n{text}"
    lines = [ln for ln in text.splitlines() if signame in ln]
    assert len(lines) == 1, f"expected one log line naming {signame}\n{text}"
    return text


SCENARIOS = ("SIGINT", "SIGINTx2", "SIGTERM", "SIGINT-startup")


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", list(NODES))
def test_node_exits_cleanly_on_signals(kind: str, scenario: str, tmp_path: Path, bundle: Path, probe) -> None:
    proc, fqn = _process(kind, tmp_path, bundle)
    log = tmp_path / "node.log"
    proc.start()
    try:
        if scenario == "SIGINT-startup":
            assert _wait_mapped(proc, STARTUP_LIB[kind]), log.read_text()
            proc.proc.send_signal(signal.SIGINT)
        else:
            _wait_spinning(probe, fqn, proc, log)
            if kind == "guidance" and scenario == "SIGINTx2":  # signals while inference runs
                _keep_guidance_busy(probe, fqn.rsplit("/", 1)[0], proc, log)
            if scenario == "SIGTERM":
                proc.proc.send_signal(signal.SIGTERM)
            else:
                proc.proc.send_signal(signal.SIGINT)
                if scenario == "SIGINTx2":  # as ros2 launch on Ctrl-C: process group + forwarded
                    time.sleep(0.02)
                    proc.proc.send_signal(signal.SIGINT)
        rc = _wait_exit(proc)
    finally:
        proc.stop(signal.SIGKILL)
    _check_clean(rc, log, "SIGTERM" if scenario == "SIGTERM" else "SIGINT")
    if kind == "recorder" and scenario != "SIGINT-startup":  # the autostarted episode was closed
        import yaml

        [bag] = [p for p in (tmp_path / "bags").iterdir() if p.is_dir()]
        meta = yaml.safe_load((bag / "metadata.yaml").read_text())
        custom = meta["rosbag2_bagfile_information"]["custom_data"]
        assert custom["cardiac_copilot.recorder.state"] == "closed"
        assert custom["cardiac_copilot.recorder.stop_reason"] == "shutdown"


def test_servo_stops_on_sigint_inherited_as_ignored(tmp_path: Path, bundle: Path, probe) -> None:
    """Started from a script in the background, SIGINT arrives ignored (SIG_IGN): it must still stop."""
    proc, fqn = _process("servo", tmp_path, bundle)
    log = tmp_path / "node.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "wb") as out:
        proc.proc = subprocess.Popen(proc.cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _wait_spinning(probe, fqn, proc, log)
        proc.proc.send_signal(signal.SIGINT)
        rc = _wait_exit(proc, 20.0)
    finally:
        proc.stop(signal.SIGKILL)
    _check_clean(rc, log, "SIGINT")


WRONG_TYPE = {"guidance": ("qos_depth", "1.5"), "recorder": ("min_free_disk_mb", "2"),
              "servo": ("max_linear_speed_mps", "1"), "sim": ("image_size", "1.5")}


@pytest.mark.parametrize("kind", list(NODES))
def test_wrongly_typed_startup_parameter_is_one_error_line(kind: str, tmp_path: Path) -> None:
    """`-p qos_depth:=1.5` (an integer parameter) or `-p min_free_disk_mb:=2` (a double one)."""
    name, value = WRONG_TYPE[kind]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", NODES[kind], "--ros-args", "-p", f"{name}:={value}",
                          "-p", f"output_dir:={tmp_path}"] if kind == "recorder" else
                         [sys.executable, "-m", NODES[kind], "--ros-args", "-p", f"{name}:={value}"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, out
    [line] = [ln for ln in res.stderr.splitlines() if name in ln]
    assert line.startswith(f"{NODES[kind].rsplit('.', 1)[1]}: invalid parameter") and value in line, out
