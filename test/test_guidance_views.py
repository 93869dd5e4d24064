"""guidance_node: target_plane is any view of the loaded bundle (issue 15, item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import rclpy  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from cardiac_copilot_ros.model.bundle import build_metadata, save_bundle  # noqa: E402
from cardiac_copilot_ros.model.policy import GuidanceModel  # noqa: E402
from cardiac_copilot_ros.nodes.guidance_node import GuidanceNode, StartupError  # noqa: E402
from cardiac_copilot_ros.runtime import default_model_path  # noqa: E402

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
