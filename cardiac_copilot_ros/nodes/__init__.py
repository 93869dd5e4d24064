"""ROS 2 nodes: thin rclpy adapters over the core (parameters, QoS, messages, timers)."""

from .lifecycle import install_early as _install_early

# A process started as one of the nodes handles SIGINT/SIGTERM from here on (before rclpy, torch).
_install_early()
