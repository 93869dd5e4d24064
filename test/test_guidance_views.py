"""guidance_node: target_plane is any view of the loaded bundle (issue 15, item 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ros_helpers import ros_node, spin_until, spinning_node

torch = pytest.importorskip("torch")

import rclpy  # noqa: E402
from geometry_msgs.msg import PoseStamped  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from cardiac_copilot_ros import pose as pose_alg  # noqa: E402
from cardiac_copilot_ros.data.calibration import load_calibration  # noqa: E402
from cardiac_copilot_ros.model.bundle import build_metadata, save_bundle  # noqa: E402
from cardiac_copilot_ros.model.policy import GuidanceModel  # noqa: E402
from cardiac_copilot_ros.nodes import conversions as conv  # noqa: E402
from cardiac_copilot_ros.nodes.guidance_node import GuidanceNode, StartupError  # noqa: E402
from cardiac_copilot_ros.runtime import GuidanceRuntime, default_model_path  # noqa: E402

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def views_bundle(tmp_path_factory) -> Path:
    """A bundle of two views, one of which this process has never registered."""
    torch.manual_seed(0)
    model = GuidanceModel(backbone="resnet18", n_planes=2, dreamer=False).eval()
    model.plane_names = ["A4C", "MY-VIEW"]
    path = tmp_path_factory.mktemp("views") / "views.pt"
    return save_bundle(model, path, build_metadata(model, (32, 32), extra={"untrained": True}))


def _params(bundle: Path, **extra: object) -> list[Parameter]:
    values = {"model_path": str(bundle), "device": "cpu", "num_threads": 1, **extra}
    return [Parameter(k, value=v) for k, v in values.items()]


@pytest.fixture
def ctx():
    c = Context()
    rclpy.init(context=c)
    yield c
    rclpy.shutdown(context=c)


def test_any_view_of_the_bundle_is_accepted_others_rejected(views_bundle, ctx):
    node = GuidanceNode(context=ctx, parameter_overrides=_params(views_bundle, target_plane="my_view"))
    try:
        assert node.runtime.planes == ("A4C", "MY-VIEW")
        res = node.set_parameters([Parameter("target_plane", value="apical four chamber")])[0]
        assert res.successful, res.reason
        res = node.set_parameters([Parameter("target_plane", value="PLAX")])[0]
        assert not res.successful
        assert "PLAX" in res.reason and "valid planes: A4C, MY-VIEW" in res.reason
        assert node.get_parameter("target_plane").value == "apical four chamber"
    finally:
        node.destroy_node()


def test_default_model_rejects_a4c_at_startup_and_at_run_time(ctx):
    with pytest.raises(StartupError, match=r"target_plane: plane A4C is not a view of the model default\.pt; "
                                           r"valid planes: PLAX, PSAX-AV, PSAX-MV"):
        GuidanceNode(context=ctx, parameter_overrides=_params(default_model_path(), target_plane="A4C"))
    node = GuidanceNode(context=ctx, parameter_overrides=_params(default_model_path()))
    try:
        res = node.set_parameters([Parameter("target_plane", value="a4c")])[0]
        assert not res.successful and "valid planes: PLAX, PSAX-AV, PSAX-MV" in res.reason
        assert node.set_parameters([Parameter("target_plane", value="psax_mv")])[0].successful
    finally:
        node.destroy_node()


CALIB = """parent_frame: tool0
child_frame: us_probe
translation_m: [0.01, -0.02, 0.105]
quaternion_xyzw: [0.0, 0.0, 0.3826834, 0.9238795]
"""


def test_probe_calibration_turns_tool_poses_into_image_poses(views_bundle, tmp_path):
    """probe_pose carries the tool pose; target_pose = (T_tool X) U(action), X from the YAML."""
    (tmp_path / "probe.yaml").write_text(CALIB)
    X = load_calibration(tmp_path / "probe.yaml").matrix_mm()
    ns = "/gviews"
    reference = GuidanceRuntime(views_bundle, device="cpu", warmup=0)
    frame = np.random.default_rng(3).integers(0, 256, (40, 48), dtype=np.uint8)
    T_tool = pose_alg.action_to_matrix(np.array([400.0, 20.0, 300.0, 170.0, 10.0, -30.0]))
    params = _params(views_bundle, target_plane="A4C", probe_calibration=str(tmp_path / "probe.yaml"),
                     publish_tf=False, max_pose_age_s=0.5)
    with spinning_node(lambda ctx: GuidanceNode(context=ctx, namespace=ns, parameter_overrides=params)):
        with ros_node("gviews_probe") as probe:
            targets: dict[int, PoseStamped] = {}
            pub_img = probe.create_publisher(Image, f"{ns}/image", qos_profile_sensor_data)
            pub_pose = probe.create_publisher(PoseStamped, f"{ns}/probe_pose", qos_profile_sensor_data)
            probe.create_subscription(PoseStamped, f"{ns}/target_pose",
                                      lambda m: targets.__setitem__(conv.stamp_to_ns(m.header.stamp), m), 10)
            assert spin_until(probe, lambda: pub_img.get_subscription_count() > 0
                              and pub_pose.get_subscription_count() > 0, 15.0)
            got = None
            for k in range(10):   # best effort: retry with a fresh stamp if a message is lost
                stamp = 1_700_000_000_000_000_000 + k * 100_000_000
                pub_pose.publish(conv.matrix_to_pose_stamped(T_tool, stamp, "panda_link0"))
                spin_until(probe, lambda: False, 0.05)
                pub_img.publish(conv.gray_to_image_msg(frame, stamp, "us_probe"))
                if spin_until(probe, lambda s=stamp: s in targets, 3.0):
                    got = targets[stamp]
                    break
            assert got is not None, "no target_pose"
        _, T_target = conv.pose_stamped_to_matrix(got)
        expected = pose_alg.apply_action(T_tool @ X, reference.predict(frame, "A4C").action)
        np.testing.assert_allclose(T_target, expected, atol=1e-3)
        without = pose_alg.apply_action(T_tool, reference.predict(frame, "A4C").action)
        assert np.abs(T_target[:3, 3] - without[:3, 3]).max() > 10.0   # the calibration matters


def test_bad_probe_calibration_fails_at_startup(views_bundle, tmp_path, ctx):
    (tmp_path / "bad.yaml").write_text(CALIB.replace("0.105", "105.0"))
    with pytest.raises(StartupError, match="probe_calibration: .*not millimetres"):
        GuidanceNode(context=ctx, parameter_overrides=_params(views_bundle, probe_calibration=str(
            tmp_path / "bad.yaml")))
