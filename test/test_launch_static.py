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
                        "IncludeLaunchDescription", "PythonLaunchDescriptionSource", "TextSubstitution",
                        "ParameterValue"}
    executables = {kw.value.value for n in ast.walk(tree) if isinstance(n, ast.Call)
                   for kw in n.keywords if kw.arg == "executable" and isinstance(kw.value, ast.Constant)}
    assert executables and executables <= _executables()
    for cfg in re.findall(r'"(\w+\.(?:yaml|rviz))"', path.read_text()):
        assert (REPO / "config" / cfg).is_file(), cfg


def _launch_args_and_node_params(name: str) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """Declared arguments, LaunchConfiguration names used, and each Node's inline parameter names."""
    tree = ast.parse((REPO / "launch" / name).read_text())
    declared, used, params = set(), set(), {}
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call) or not isinstance(n.func, ast.Name):
            continue
        if n.func.id == "DeclareLaunchArgument":
            declared.add(n.args[0].value)
        elif n.func.id == "LaunchConfiguration":
            used.add(n.args[0].value)
        elif n.func.id == "Node":
            kw = {k.arg: k.value for k in n.keywords}
            names = {key.value for lst in ([kw["parameters"]] if "parameters" in kw else [])
                     for d in lst.elts if isinstance(d, ast.Dict) for key in d.keys}
            params[kw["executable"].value] = names
    return declared, used, params


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_every_launch_configuration_is_declared(name: str):
    declared, used, _ = _launch_args_and_node_params(name)
    assert used <= declared, used - declared


@pytest.mark.parametrize(("name", "executable", "arg"), [
    ("copilot.launch.py", "guidance_node", "pose_source"),    # TF mode without editing YAML
    ("record.launch.py", "recorder_node", "sync_max_gap_ms"),
    ("record.launch.py", "scanner_sim_node", "subject_seed"),
])
def test_launch_argument_reaches_the_node(name: str, executable: str, arg: str):
    declared, _, params = _launch_args_and_node_params(name)
    assert arg in declared and arg in params[executable]
    node = (REPO / "cardiac_copilot_ros" / "nodes" / f"{executable}.py").read_text()
    assert re.search(rf'["\']{arg}["\']', node), f"{executable} has no parameter {arg}"


def test_fine_model_argument_reaches_guidance_node():
    declared, used, params = _launch_args_and_node_params("copilot.launch.py")
    assert "fine_model" in declared and "fine_model" in used and "fine_model_path" in params["guidance_node"]


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


def test_servo_profile_file_argument_is_loaded_after_the_defaults():
    """servo_params_file: a second parameter file for servo_node (e.g. config/servo_final_approach.yaml),
    loaded after servo.yaml so that it overrides; by default servo.yaml itself (nothing changes)."""
    tree = ast.parse((REPO / "launch" / "copilot.launch.py").read_text())
    declared, used, _ = _launch_args_and_node_params("copilot.launch.py")
    assert "servo_params_file" in declared and "servo_params_file" in used
    servo = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id == "Node" and any(k.arg == "executable" and getattr(k.value, "value", None)
                                                  == "servo_node" for k in n.keywords))
    params = next(k.value for k in servo.keywords if k.arg == "parameters")
    assert "servo.yaml" in ast.unparse(params.elts[0])
    assert ast.unparse(params.elts[-1]) == "LaunchConfiguration('servo_params_file')"


def test_servo_profiles_name_only_servo_parameters():
    """Every config/servo_*.yaml profile sets parameters servo_node declares, with values it accepts."""
    import dataclasses

    from cardiac_copilot_ros.servo import ServoConfig

    base = yaml.safe_load((REPO / "config" / "servo.yaml").read_text())["copilot_servo"]["ros__parameters"]
    fields = {f.name for f in dataclasses.fields(ServoConfig)}
    profiles = sorted((REPO / "config").glob("servo_*.yaml"))
    assert profiles
    for path in profiles:
        over = yaml.safe_load(path.read_text())["copilot_servo"]["ros__parameters"]
        assert set(over) <= set(base), (path.name, set(over) - set(base))
        for k, v in over.items():
            assert type(v) is type(base[k]), (path.name, k, v)   # ROS parameters are typed
        merged = {k: v for k, v in {**base, **over}.items() if k in fields}
        ServoConfig(**merged).validate()
