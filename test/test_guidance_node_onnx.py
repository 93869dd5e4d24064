"""guidance_node on ONNX Runtime (engine=onnxruntime, an .onnx bundle) answering a frame over DDS."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import ros_node, spin_until, spinning_node

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from geometry_msgs.msg import TwistStamped  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from cardiac_copilot_ros import images  # noqa: E402
from cardiac_copilot_ros import pose as pose_alg  # noqa: E402
from cardiac_copilot_ros.model.bundle import build_metadata  # noqa: E402
from cardiac_copilot_ros.model.onnx_bundle import export_onnx  # noqa: E402
from cardiac_copilot_ros.model.policy import GuidanceModel  # noqa: E402
from cardiac_copilot_ros.nodes import conversions as conv  # noqa: E402
from cardiac_copilot_ros.nodes.guidance_node import GuidanceNode  # noqa: E402

pytestmark = pytest.mark.ros
NS = "/gonnx"


def test_guidance_node_on_onnxruntime_answers_a_frame(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = GuidanceModel(backbone="resnet18", dreamer=True).eval()
    path = tmp_path / "node.onnx"
    export_onnx(model, build_metadata(model, (32, 32)), path)
    frame = np.random.default_rng(4).integers(0, 256, size=(48, 64), dtype=np.uint8)
    with torch.no_grad():  # what the eager model says for this frame at 32 x 32 (PLAX, Dreamer on)
        small = images.resize_gray(frame, (32, 32)).astype(np.float32) / 255.0
        x = torch.from_numpy(small)[None, None]
        expected = model(x, torch.zeros(1, dtype=torch.int64), True)[0].double().numpy()

    params = {"model_path": str(path), "engine": "onnxruntime", "device": "cpu", "num_threads": 1}
    with spinning_node(lambda ctx: GuidanceNode(context=ctx, namespace=NS, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])) as node:
        assert node.runtime.engine == "onnxruntime" and node.runtime.bundle.fmt == "onnx"
        with ros_node("onnx_probe") as probe:
            got: dict[int, TwistStamped] = {}
            pub = probe.create_publisher(Image, f"{NS}/image", qos_profile_sensor_data)
            probe.create_subscription(TwistStamped, f"{NS}/guidance",
                                      lambda m: got.__setitem__(conv.stamp_to_ns(m.header.stamp), m), 10)
            assert spin_until(probe, lambda: pub.get_subscription_count() > 0, 15.0)
            stamp = 0
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline and stamp not in got:  # best effort: re-send until answered
                stamp = time.time_ns()
                pub.publish(conv.gray_to_image_msg(frame, stamp, "us_image"))
                spin_until(probe, lambda s=stamp: s in got, 2.0)
            assert stamp in got, "no guidance from the node on onnxruntime"
            lin, ang = pose_alg.action_to_twist(expected)
            t = got[stamp].twist
            np.testing.assert_allclose([t.linear.x, t.linear.y, t.linear.z], lin, atol=1e-6)
            np.testing.assert_allclose([t.angular.x, t.angular.y, t.angular.z], ang, atol=2e-5)
