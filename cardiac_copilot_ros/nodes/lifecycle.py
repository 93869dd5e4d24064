"""The one way our nodes start, spin and shut down (rclpy's signal handling, clean exit codes)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node


def spin_node(make_node: Callable[[], Node], name: str, args: list[str] | None = None,
              startup_errors: tuple[type[BaseException], ...] = (ValueError,),
              make_executor: Callable[[], Executor] = SingleThreadedExecutor) -> int:
    """Init rclpy, build the node, spin until SIGINT/SIGTERM, shut down cleanly.

    Returns 0 after a normal shutdown and 2 when the node cannot start (one of
    ``startup_errors``: the message is printed to stderr, naming the node).
    """
    rclpy.init(args=args)
    try:
        node = make_node()
    except startup_errors as exc:
        print(f"{name}: cannot start: {exc}", file=sys.stderr, flush=True)
        rclpy.try_shutdown()
        return 2
    executor = make_executor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
