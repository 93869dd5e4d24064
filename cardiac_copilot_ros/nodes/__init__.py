"""ROS 2 nodes: thin rclpy adapters over the core (parameters, QoS, messages, timers)."""
