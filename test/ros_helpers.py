"""Helpers for tests that talk over real DDS: rclpy contexts, nodes in child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy not installed (make test installs the ROS 2 wheels)")

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def ros_node(name: str = "test_probe") -> Iterator[object]:
    """An rclpy Node in a fresh context of its own, destroyed afterwards."""
    from rclpy.context import Context
    from rclpy.node import Node

    ctx = Context()
    rclpy.init(context=ctx)
    node = Node(name, context=ctx)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)


@contextmanager
def spinning_node(make_node: Callable[[object], object]) -> Iterator[object]:
    """``make_node(context)`` in a fresh rclpy context, spun by a single-threaded executor on a thread of
    its own (as a node process would); executor, node and context are shut down afterwards."""
    import threading

    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor

    ctx = Context()
    rclpy.init(context=ctx)
    try:
        node = make_node(ctx)
    except BaseException:
        rclpy.shutdown(context=ctx)
        raise
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        thread.join(5.0)


def spin_until(node, predicate: Callable[[], bool], timeout_s: float = 10.0,
               executor=None) -> bool:
    """Spin ``node`` until ``predicate()`` is true or the timeout passes; returns the predicate."""
    from rclpy.executors import SingleThreadedExecutor

    own = executor is None
    if own:
        executor = SingleThreadedExecutor(context=node.context)
        executor.add_node(node)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if predicate():
                return True
            executor.spin_once(timeout_sec=0.05)
        return predicate()
    finally:
        if own:
            executor.remove_node(node)
            executor.shutdown()


class NodeProcess:
    """A node run as ``python -m MODULE --ros-args ...`` in a child process."""

    def __init__(self, module: str, params: dict[str, object] | None = None,
                 remaps: dict[str, str] | None = None, name: str | None = None,
                 extra_args: list[str] | None = None, log_path: Path | None = None) -> None:
        cmd = [sys.executable, "-m", module, *(extra_args or []), "--ros-args"]
        if name:
            cmd += ["-r", f"__node:={name}"]
        for k, v in (params or {}).items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            cmd += ["-p", f"{k}:={v}"]
        for k, v in (remaps or {}).items():
            cmd += ["-r", f"{k}:={v}"]
        self.cmd = cmd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 15.0) -> int | None:
        """Send ``sig`` and wait; kill if it does not exit. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
