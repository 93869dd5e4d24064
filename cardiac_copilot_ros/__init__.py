"""cardiac_copilot_ros: real-time 6-DoF probe guidance for echocardiography (ROS 2).

The core (pose algebra, planes, simulator, bags, data, model, training, runtime) never
imports rclpy; the ROS nodes in :mod:`cardiac_copilot_ros.nodes` are thin adapters.
"""

__version__ = "0.1.0"


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (for metadata)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=2, check=False)
        sha = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__
