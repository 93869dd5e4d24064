"""Bedside guidance: guidance_node (+ simulated scanner, servo, RViz on request).

    ros2 launch cardiac_copilot_ros copilot.launch.py target_plane:=PLAX
    ros2 launch cardiac_copilot_ros copilot.launch.py use_sim:=true            # no hardware
    ros2 launch cardiac_copilot_ros copilot.launch.py servo:=true image_topic:=/probe/image
    ros2 launch cardiac_copilot_ros copilot.launch.py servo:=true \
        servo_params_file:=$(ros2 pkg prefix cardiac_copilot_ros)/share/cardiac_copilot_ros/config/\
servo_final_approach.yaml
    ros2 launch cardiac_copilot_ros copilot.launch.py pose_source:=tf   # probe pose from TF
    ros2 launch cardiac_copilot_ros copilot.launch.py model:=mine.pt fine_model:=mine_fine.pt

Only the documented launch / launch_ros API is used, so the file works on Humble and Jazzy.
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
    model = LaunchConfiguration("model")
    image_topic = LaunchConfiguration("image_topic")
    pose_topic = LaunchConfiguration("pose_topic")

    args = [
        DeclareLaunchArgument("model", default_value="",
                              description="model bundle (.pt/.pt2); empty = the package's models/default.pt"),
        DeclareLaunchArgument("fine_model", default_value="",
                              description="fine stage of coarse to fine (.pt/.onnx); empty = models/fine.pt with the "
                                          "default model; none = off"),
        DeclareLaunchArgument("target_plane", default_value="PLAX",
                              description="a view of the model (default model: PLAX, PSAX-AV, PSAX-MV; sim: +A4C)"),
        DeclareLaunchArgument("use_dreamer", default_value="true",
                              description="refine guidance with the Cardiac Dreamer world model"),
        DeclareLaunchArgument("image_topic", default_value="/us/image", description="ultrasound image topic"),
        DeclareLaunchArgument("pose_topic", default_value="/probe_pose",
                              description="probe pose topic (geometry_msgs/PoseStamped, e.g. franka current_pose)"),
        DeclareLaunchArgument("pose_source", default_value="topic",
                              description="probe pose for guidance_node: topic (pose_topic) or tf (a TF lookup "
                                          "base_frame -> probe_frame of config/guidance.yaml; needs tf2_ros)"),
        DeclareLaunchArgument("use_sim", default_value="false",
                              description="start scanner_sim_node (simulated probe and subject) instead of hardware"),
        DeclareLaunchArgument("subject_seed", default_value="1000", description="simulated subject (use_sim)"),
        DeclareLaunchArgument("servo", default_value="false",
                              description="start servo_node (closed loop via MoveIt Servo; off until ~/enable)"),
        DeclareLaunchArgument("servo_params_file", default_value=PathJoinSubstitution([config_dir, "servo.yaml"]),
                              description="parameter file for servo_node loaded after config/servo.yaml (e.g. the "
                                          "package's config/servo_final_approach.yaml: the final-approach survey)"),
        DeclareLaunchArgument("rviz", default_value="true", description="start RViz with config/copilot.rviz"),
    ]

    guidance = Node(
        package=PACKAGE, executable="guidance_node", name="guidance_node", output="screen",
        parameters=[PathJoinSubstitution([config_dir, "guidance.yaml"]),
                    {"model_path": model,
                     "fine_model_path": ParameterValue(LaunchConfiguration("fine_model"), value_type=str),
                     "target_plane": LaunchConfiguration("target_plane"),
                     "use_dreamer": LaunchConfiguration("use_dreamer"),
                     "pose_source": ParameterValue(LaunchConfiguration("pose_source"), value_type=str)}],
        remappings=[("image", image_topic), ("image/compressed", [image_topic, "/compressed"]),
                    ("probe_pose", pose_topic)],
    )
    sim = Node(
        package=PACKAGE, executable="scanner_sim_node", name="scanner_sim_node", output="screen",
        condition=IfCondition(LaunchConfiguration("use_sim")),
        parameters=[{"subject_seed": LaunchConfiguration("subject_seed"),
                     "target_plane": LaunchConfiguration("target_plane")}],
        remappings=[("image", image_topic), ("probe_pose", pose_topic)],
    )
    servo = Node(
        package=PACKAGE, executable="servo_node", name="copilot_servo", output="screen",
        condition=IfCondition(LaunchConfiguration("servo")),
        parameters=[PathJoinSubstitution([config_dir, "servo.yaml"]), LaunchConfiguration("servo_params_file")],
        remappings=[("probe_pose", pose_topic)],
    )
    rviz = Node(
        package="rviz2", executable="rviz2", name="rviz2", output="log",
        condition=IfCondition(LaunchConfiguration("rviz")),
        arguments=["-d", PathJoinSubstitution([config_dir, "copilot.rviz"])],
    )
    return LaunchDescription([*args, sim, guidance, servo, rviz])
