"""The package is a proper ament_python ROS 2 package: package.xml, colcon build, install tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "cardiac_copilot_ros"
NODES = ("guidance_node", "recorder_node", "servo_node", "scanner_sim_node")
ROS_EXEC_DEPENDS = {"rclpy", "sensor_msgs", "geometry_msgs", "visualization_msgs", "std_msgs", "std_srvs",
                    "diagnostic_msgs", "tf2_ros"}


def test_package_xml_validates_against_format3_schema():
    lxml = pytest.importorskip("lxml.etree")
    schema = lxml.XMLSchema(lxml.parse(str(REPO / "test" / "schemas" / "package_format3.xsd")))
    doc = lxml.parse(str(REPO / "package.xml"))
    assert schema.validate(doc), schema.error_log


def test_package_xml_with_xmllint_when_available():
    xmllint = shutil.which("xmllint")
    if xmllint is None:
        pytest.skip("xmllint not installed (Debian: libxml2-utils); the lxml test covers the schema")
    out = subprocess.run([xmllint, "--noout", "--schema", str(REPO / "test" / "schemas" / "package_format3.xsd"),
                          str(REPO / "package.xml")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_package_xml_is_a_valid_ros_package():
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    pkg = catkin_pkg.parse_package(str(REPO / "package.xml"))
    pkg.validate()
    assert pkg.package_format == 3
    assert pkg.name == PACKAGE
    assert pkg.get_build_type() == "ament_python"
    assert ROS_EXEC_DEPENDS <= {d.name for d in pkg.exec_depends}
    assert {"python3-pytest"} <= {d.name for d in pkg.test_depends}


def test_setup_never_forces_ros_wheels_on_users():
    text = (REPO / "setup.py").read_text()
    install_requires = text.split("install_requires=[", 1)[1].split("]", 1)[0]
    assert "ros-jazzy" not in install_requires and "rclpy" not in install_requires


def _copy_sources(dst: Path) -> None:
    """Copy the package sources as a fresh clone would have them (tracked + untracked, not ignored)."""
    try:
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def test_colcon_build_install_tree(tmp_path: Path):
    colcon = Path(sys.executable).parent / "colcon"
    if not colcon.exists():
        colcon = shutil.which("colcon")
    if colcon is None:
        pytest.skip("colcon not installed (make test installs colcon-core and colcon-ros)")
    ws = tmp_path / "ws"
    _copy_sources(ws / "src" / PACKAGE)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(colcon), "build", "--base-paths", "src"], cwd=ws, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    prefix = ws / "install" / PACKAGE
    share = prefix / "share" / PACKAGE
    assert (share / "package.xml").is_file()
    for sub in ("launch", "config", "models"):
        assert (share / sub).is_dir(), sub
    for launch_file in (REPO / "launch").glob("*.launch.py"):
        assert (share / "launch" / launch_file.name).is_file()
    for cfg in (REPO / "config").glob("*.yaml"):
        assert (share / "config" / cfg.name).is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    for node in (*NODES, "cardiac-copilot"):
        exe = prefix / "lib" / PACKAGE / node
        assert exe.is_file() and os.access(exe, os.X_OK), node
    # the installed command runs from the install tree
    site = next((prefix / "lib").glob("python3*/site-packages"))
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, str(prefix / "lib" / PACKAGE / "cardiac-copilot"), "--help"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert "simulate" in run.stdout
