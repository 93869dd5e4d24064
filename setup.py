"""ament_python package setup: works with `colcon build` and with `pip install`.

ROS 2 users (colcon) bring rclpy and the message packages from their ROS install; the
PyPI wheels of ROS 2 Jazzy are only in the optional `ros` extra (and requirements/ros.txt),
so they are never forced onto a machine with a real ROS install.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "cardiac_copilot_ros"

NODES = {
    "guidance_node": "guidance_node",
    "recorder_node": "recorder_node",
    "servo_node": "servo_node",
    "scanner_sim_node": "scanner_sim_node",
}

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz")),
        (f"share/{PACKAGE}/models", glob("models/*.pt") + glob("models/*.pt2") + glob("models/*.onnx")
                                          + glob("models/*.md")),
    ],
    install_requires=[
        "setuptools",
        "numpy>=1.21",
        "opencv-python-headless>=4.5",
        "transforms3d>=0.4",
        "rosbags>=0.10",
        "tqdm",
        "matplotlib",
        "psutil",
        "torch>=1.12",
        "torchvision>=0.13",
    ],
    extras_require={
        # ONNX bundles and the onnxruntime engine (not needed by training); see requirements/onnx.txt
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
        "ros": [
            "ros-jazzy-rclpy[fastrtps]",
            "ros-jazzy-sensor-msgs",
            "ros-jazzy-geometry-msgs",
            "ros-jazzy-visualization-msgs",
            "ros-jazzy-std-msgs",
            "ros-jazzy-std-srvs",
            "ros-jazzy-diagnostic-msgs",
        ],
    },
    zip_safe=False,
    maintainer="cardiac_copilot_ros maintainers",
    maintainer_email="maintainers@cardiac-copilot.invalid",
    description="Real-time 6-DoF probe guidance for echocardiography with a world model (ROS 2).",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            f"{name}={PACKAGE}.nodes.{module}:main" for name, module in NODES.items()
        ] + [f"cardiac-copilot={PACKAGE}.cli:main"],
    },
)
