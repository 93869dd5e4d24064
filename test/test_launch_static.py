"""Launch files and RViz config: static checks that run everywhere.

test_launch.py starts the launch files for real with launch_pytest (needs a ROS 2 install).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCH_FILES = ("copilot.launch.py", "record.launch.py")


def _executables() -> set[str]:
    text = (REPO / "setup.py").read_text()
    nodes = set(re.findall(r'"(\w+_node)": "\w+"', text))
    return nodes | {"rviz2"}


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_file_is_well_formed(name: str):
    path = REPO / "launch" / name
    tree = ast.parse(path.read_text(), filename=str(path))
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in funcs
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    # only the documented, stable launch API
    assert imported <= {"LaunchDescription", "DeclareLaunchArgument", "IfCondition", "UnlessCondition",
                        "LaunchConfiguration", "PathJoinSubstitution", "Node", "FindPackageShare",
                        "IncludeLaunchDescription", "PythonLaunchDescriptionSource", "TextSubstitution"}
    executables = {kw.value.value for n in ast.walk(tree) if isinstance(n, ast.Call)
                   for kw in n.keywords if kw.arg == "executable" and isinstance(kw.value, ast.Constant)}
    assert executables and executables <= _executables()
    for cfg in re.findall(r'"(\w+\.(?:yaml|rviz))"', path.read_text()):
        assert (REPO / "config" / cfg).is_file(), cfg


def test_rviz_config_shows_guidance_without_clicks():
    cfg = yaml.safe_load((REPO / "config" / "copilot.rviz").read_text())
    manager = cfg["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "panda_link0"
    displays = {d["Class"]: d for d in manager["Displays"]}
    for cls in ("rviz_default_plugins/Image", "rviz_default_plugins/MarkerArray", "rviz_default_plugins/TF",
                "rviz_default_plugins/Pose"):
        assert cls in displays and displays[cls]["Enabled"], cls
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/guidance_markers"
    assert displays["rviz_default_plugins/Image"]["Topic"]["Value"] == "/us/image"
