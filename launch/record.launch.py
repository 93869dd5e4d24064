"""Record expert demonstrations: recorder_node (+ simulated scanner on request).

    ros2 launch cardiac_copilot_ros record.launch.py session_label:=s001 output_dir:=~/bags
    ros2 service call /recorder_node/start_episode std_srvs/srv/Trigger
    ros2 topic pub --once /annotations std_msgs/msg/String "{data: PLAX}"
    ros2 service call /recorder_node/stop_episode std_srvs/srv/Trigger
    ros2 launch cardiac_copilot_ros record.launch.py use_sim:=true subject_seed:=7 sync_max_gap_ms:=30
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "cardiac_copilot_ros"


def generate_launch_description() -> LaunchDescription:
    config_dir = PathJoinSubstitution([FindPackageShare(PACKAGE), "config"])
    image_topic = LaunchConfiguration("image_topic")
    pose_topic = LaunchConfiguration("pose_topic")
    args = [
        DeclareLaunchArgument("output_dir", default_value="bags", description="folder for the episode bags"),
        DeclareLaunchArgument("session_label", default_value="session",
                              description="pseudonymous session label (no patient identifiers)"),
        DeclareLaunchArgument("storage", default_value="mcap", description="mcap or sqlite3"),
        DeclareLaunchArgument("autostart", default_value="false", description="start an episode at launch"),
        DeclareLaunchArgument("image_topic", default_value="/us/image", description="ultrasound image topic"),
        DeclareLaunchArgument("pose_topic", default_value="/probe_pose", description="probe pose topic"),
        DeclareLaunchArgument("sync_max_gap_ms", default_value="20.0",
                              description="largest spacing [ms] of the two probe poses around an image stamp "
                                          "for probe_pose_sync (config/recorder.yaml)"),
        DeclareLaunchArgument("use_sim", default_value="false", description="start scanner_sim_node"),
        DeclareLaunchArgument("target_plane", default_value="PLAX", description="simulated target plane (use_sim)"),
        DeclareLaunchArgument("subject_seed", default_value="0", description="simulated subject (use_sim)"),
    ]
    recorder = Node(
        package=PACKAGE, executable="recorder_node", name="recorder_node", output="screen",
        parameters=[PathJoinSubstitution([config_dir, "recorder.yaml"]),
                    {"output_dir": LaunchConfiguration("output_dir"),
                     "session_label": LaunchConfiguration("session_label"),
                     "storage": LaunchConfiguration("storage"),
                     "autostart": LaunchConfiguration("autostart"),
                     # a DOUBLE parameter: sync_max_gap_ms:=30 must not arrive as an integer
                     "sync_max_gap_ms": ParameterValue(LaunchConfiguration("sync_max_gap_ms"), value_type=float)}],
        remappings=[("image", image_topic), ("image/compressed", [image_topic, "/compressed"]),
                    ("probe_pose", pose_topic)],
    )
    sim = Node(
        package=PACKAGE, executable="scanner_sim_node", name="scanner_sim_node", output="screen",
        condition=IfCondition(LaunchConfiguration("use_sim")),
        parameters=[{"target_plane": LaunchConfiguration("target_plane"),
                     "subject_seed": ParameterValue(LaunchConfiguration("subject_seed"), value_type=int)}],
        remappings=[("image", image_topic), ("probe_pose", pose_topic)],
    )
    return LaunchDescription([*args, sim, recorder])
