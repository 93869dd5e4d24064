"""ONNX bundles and the inference engines (issue 16): export and back, engine agreement on
simulator frames, engine=auto's measured choice, refused external data and custom ops, the
NaN check of the export, the uncertainty graph (``action_scale``), and the fast evaluate path.

Tiny models (ResNet-18 at 32 px) keep each ONNX export to seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cardiac_copilot_ros.cli import main  # noqa: E402
from cardiac_copilot_ros.model import onnx_bundle  # noqa: E402
from cardiac_copilot_ros.model.bundle import (  # noqa: E402
    BundleError,
    build_metadata,
    file_sha256,
    load_bundle,
    make_untrained_bundle,
)
from cardiac_copilot_ros.model.policy import GuidanceModel  # noqa: E402
from cardiac_copilot_ros.runtime import GuidanceRuntime  # noqa: E402

SIZE = (32, 32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny TorchScript Dreamer bundle and its ONNX conversion made by the CLI."""
    folder = tmp_path_factory.mktemp("onnx_pair")
    pt = make_untrained_bundle(folder / "tiny.pt", backbone="resnet18", input_size=SIZE, dreamer=True, seed=3)
    out = folder / "tiny.onnx"
    assert main(["export", str(pt), "--format", "onnx", "--out", str(out)]) == 0
    return pt, out


def _sim_frames(n: int = 6) -> list[np.ndarray]:
    """Simulator frames around the PLAX target (what the bench and the demo show the model)."""
    from cardiac_copilot_ros.bench.guidance import _render_frames

    frames, _, source = _render_frames((96, 96), n)
    assert "sim" in source.lower(), source
    return frames


def test_export_onnx_and_back(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pt, out = pair
    ts = load_bundle(pt)
    ox = load_bundle(out)
    assert ox.fmt == "onnx" and ox.meta == ts.meta  # the same metadata JSON
    proto = onnx.load(str(out), load_external_data=False)
    assert [p.key for p in proto.metadata_props] == ["cardiac_copilot.json"]
    assert json.loads(proto.metadata_props[0].value) == ts.meta
    assert [i.name for i in proto.graph.input] == ["image", "plane", "refine"]
    assert [o.name for o in proto.graph.output] == ["action"]
    for batch in (1, 5):  # dynamic batch
        x = torch.rand(batch, 1, *SIZE, generator=torch.Generator().manual_seed(batch))
        p = torch.arange(batch) % 3
        for refine in (False, True):
            got, want = ox(x, p, refine), ts(x, p, refine)
            assert got.shape == (batch, 6)
            assert float((got - want).abs().max()) <= 1e-3
    # refine really switches the Dreamer branch inside the graph
    x = torch.rand(2, 1, *SIZE)
    assert float((ox(x, torch.zeros(2, dtype=torch.int64), True) - ox(x, torch.zeros(2, dtype=torch.int64), False))
                 .abs().max()) > 0


def test_export_from_checkpoint_policy_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = GuidanceModel(backbone="resnet18", dreamer=False).eval()
    model.set_action_stats(np.arange(6) * 0.1, np.ones(6) * 2.0)
    ck = tmp_path / "best.pt"
    torch.save({"format": "cardiac_copilot_checkpoint", "format_version": 1, "model": model.state_dict(),
                "model_args": {"backbone": "resnet18", "dreamer": False}, "input_size": list(SIZE),
                "config": {"model": "baseline"}, "step": 7}, ck)
    out = tmp_path / "policy.onnx"
    assert main(["export", str(tmp_path), "--out", str(out)]) == 0  # format from the suffix
    text = capsys.readouterr().out
    assert "check vs eager model" in text and "policy max |diff|" in text
    ox = load_bundle(out)
    assert not ox.has_dreamer and ox.meta["training"]["step"] == 7
    x = torch.rand(3, 1, *SIZE)
    p = torch.tensor([0, 1, 2])
    with torch.no_grad():
        want = model(x, p, False)
    for refine in (False, True):  # refine is ignored without a Dreamer
        assert float((ox(x, p, refine) - want).abs().max()) <= 1e-3


def test_export_fails_on_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = GuidanceModel(backbone="resnet18", dreamer=False).eval()
    with torch.no_grad():
        model.head.fc[4].bias.fill_(float("nan"))
    torch.save({"format": "cardiac_copilot_checkpoint", "format_version": 1, "model": model.state_dict(),
                "model_args": {"backbone": "resnet18", "dreamer": False}, "input_size": list(SIZE)},
               tmp_path / "best.pt")
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "nan.onnx")]) == 1
    err = capsys.readouterr().err
    assert "differ" in err and "inf" in err


def test_worst_disagreement_is_the_one_tolerance_check() -> None:
    """export --format onnx and dagger's .onnx beside a bundle accept a conversion by the same rule."""
    assert onnx_bundle.worst_disagreement({"action": 2e-4, "scale": 6e-4}) == (6e-4, True)
    assert onnx_bundle.worst_disagreement({"action": 2 * onnx_bundle.TOLERANCE})[1] is False
    assert onnx_bundle.worst_disagreement({"action": float("inf")})[1] is False
    worst, ok = onnx_bundle.worst_disagreement(None)   # not checked: never accepted
    assert np.isnan(worst) and ok is False


def test_uncertainty_graph_action_scale(tmp_path: Path) -> None:
    """Bundles with ``has_uncertainty`` export forward_with_scale as output ``action_scale`` (B, 12)."""

    class ScaleModel(GuidanceModel):
        has_uncertainty = True

        def forward_with_scale(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
            action = self.forward(image, plane, refine)
            return torch.cat([action, torch.nn.functional.softplus(self.head(self.encode(image)[1], plane)) + 0.1],
                             dim=1)

    torch.manual_seed(1)
    model = ScaleModel(backbone="resnet18", dreamer=True).eval()
    meta = build_metadata(model, SIZE, extra={"has_uncertainty": True})
    path = tmp_path / "scale.onnx"
    onnx_bundle.export_onnx(model, meta, path)
    om = onnx_bundle.load_onnx(path)
    assert om.output == "action_scale" and om.has_scale
    diffs = onnx_bundle.compare(model.forward_with_scale, om, SIZE, 3, True)
    assert max(diffs.values()) <= 1e-3
    x = torch.rand(2, 1, *SIZE)
    p = torch.tensor([0, 2])
    assert om.forward_with_scale(x, p, True).shape == (2, 12)
    with torch.no_grad():
        assert float((om(x, p, True) - model(x, p, True)).abs().max()) <= 1e-3  # (B, 6) action
    rt = GuidanceRuntime(path, device="cpu", warmup=1)
    frame = np.full((40, 40), 128, np.uint8)
    assert rt.engine == "onnxruntime" and rt.predict(frame, "PLAX").action.shape == (6,)


def test_engines_agree_on_simulator_frames(pair: tuple[Path, Path]) -> None:
    pt, out = pair
    torch_rt = GuidanceRuntime(pt, device="cpu", engine="torch", warmup=1)
    onnx_rt = GuidanceRuntime(out, device="cpu", engine="onnxruntime", warmup=1)
    assert torch_rt.engine == "torch" and onnx_rt.engine == "onnxruntime"
    worst = 0.0
    for i, frame in enumerate(_sim_frames()):
        plane = ("PLAX", "PSAX-AV", "PSAX-MV")[i % 3]
        for refine in (False, True):
            a = torch_rt.predict(frame, plane, refine).action
            b = onnx_rt.predict(frame, plane, refine).action
            worst = max(worst, float(np.abs(a - b).max()))
    assert worst <= 1e-3


def test_engine_auto_measures_both_and_logs_choice(pair: tuple[Path, Path], tmp_path: Path) -> None:
    pt, out = pair
    shutil.copy(pt, tmp_path / "m.pt")
    lines: list[str] = []
    # no .onnx beside the .pt: torch, and the log says how to get the other engine
    rt = GuidanceRuntime(tmp_path / "m.pt", device="cpu", engine="auto", warmup=2, log=lines.append)
    assert rt.engine == "torch" and "--format onnx" in lines[-1]
    shutil.copy(out, tmp_path / "m.onnx")
    rt = GuidanceRuntime(tmp_path / "m.pt", device="cpu", engine="auto", warmup=2, log=lines.append)
    times = rt.engine_times_ms
    assert set(times) == {"torch", "onnxruntime"} and all(v > 0 for v in times.values())
    assert rt.engine == min(times, key=times.get)
    line = lines[-1]
    assert line.startswith(f"engine auto: {rt.engine}") and "torch" in line and "onnxruntime" in line
    assert f"{times['torch']:.1f} ms" in line and f"{times['onnxruntime']:.1f} ms" in line
    assert rt.model_ms == times[rt.engine]
    # a pin covers the .pt only: the unpinned .onnx beside it is not used
    rt = GuidanceRuntime(tmp_path / "m.pt", device="cpu", engine="auto", warmup=1, log=lines.append,
                         model_sha256=file_sha256(tmp_path / "m.pt"))
    assert rt.engine == "torch" and "model_sha256" in lines[-1]
    # another model's .onnx beside it is not used either
    other = make_untrained_bundle(tmp_path / "o.pt", backbone="resnet18", input_size=SIZE, seed=9)
    shutil.copy(out, other.with_suffix(".onnx"))
    rt = GuidanceRuntime(other, device="cpu", engine="auto", warmup=1, log=lines.append)
    assert rt.engine == "torch" and "metadata differs" in lines[-1]
    # the slow-machine warning names the time and the options
    assert rt.slow_warning(1e6) is not None and "engine" in rt.slow_warning(1e6)
    assert rt.slow_warning(0.001) is None
    with pytest.raises(ValueError, match="engine torch cannot run"):
        GuidanceRuntime(out, device="cpu", engine="torch", warmup=0)


def test_refuses_external_data_and_custom_ops(pair: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = pair
    proto = onnx.load(str(out))
    ext = tmp_path / "ext.onnx"
    onnx.save_model(proto, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=1024)
    assert (tmp_path / "weights.bin").is_file()
    with pytest.raises(BundleError, match="external data"):
        load_bundle(ext)
    with pytest.raises(BundleError, match="external data"):
        GuidanceRuntime(ext, device="cpu", warmup=0)

    proto = onnx.load(str(out))
    graph = proto.graph
    while all(n.op_type == "If" for n in graph.node):  # the Dreamer switch: look inside its branch
        graph = next(a.g for a in graph.node[0].attribute if a.type == onnx.AttributeProto.GRAPH)
    node = next(n for n in graph.node if n.op_type != "If")
    node.domain = "com.example.evil"
    bad = tmp_path / "custom.onnx"
    onnx.save_model(proto, str(bad))
    with pytest.raises(BundleError, match="custom operator com.example.evil"):
        load_bundle(bad)

    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save_model(proto, str(plain))
    with pytest.raises(BundleError, match="not a Cardiac Copilot bundle"):
        load_bundle(plain)
    # sha256 pins .onnx files too
    with pytest.raises(BundleError, match="does not match the pinned"):
        load_bundle(out, sha256="0" * 64)
    assert load_bundle(out, sha256=file_sha256(out)).fmt == "onnx"


def test_eval_one_pass_matches_first_implementation(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """evaluate's fast path (one forward for both entries, loader thread) gives the old numbers."""
    from cardiac_copilot_ros import eval_pipeline, evaluation

    pt, out = pair
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(70, 48, 48), dtype=np.uint8)  # resized to 32 px once
    plane = rng.integers(0, 3, size=70).astype(np.int64)
    idx = np.arange(3, 70, 2)
    models = [evaluation.load_model(pt, name="ts"), evaluation.load_model(out, name="onnx")]
    assert models[0].multi is not None and models[1].multi is None
    new, seconds, wall = eval_pipeline.predict_models(models, images, plane, idx, batch_size=8, progress=False)
    assert set(seconds) == {"ts", "onnx"} and wall > 0
    for m in models:
        old = evaluation.predict(m, images, plane, idx, batch_size=8, progress=False)
        assert set(old) == set(m.entries)
        for entry, pred in old.items():
            assert np.abs(pred - new[entry]).max() <= 1e-3, entry
    assert np.abs(new["ts/dreamer"] - new["onnx/dreamer"]).max() <= 1e-3


def test_convert_folded_uncertainty_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default model's form (plane query folded into a bias at export, uncertainty head) converts:
    `cardiac-copilot export models/default.pt --format onnx` must work for users."""
    from cardiac_copilot_ros.model.bundle import save_bundle

    torch.manual_seed(4)
    model = GuidanceModel(backbone="resnet10", dreamer=True, uncertainty=True, dreamer_dim=64).eval()
    with torch.no_grad():
        model.head.fold_plane_query()
    pt = save_bundle(model, tmp_path / "folded.pt", build_metadata(model, SIZE))
    out = tmp_path / "folded.onnx"
    assert main(["export", str(pt), "--format", "onnx", "--out", str(out)]) == 0, capsys.readouterr().err
    om = onnx_bundle.load_onnx(out)
    assert om.has_scale
    x, p = torch.rand(2, 1, *SIZE), torch.tensor([0, 2])
    with torch.no_grad():
        assert float((om.forward_with_scale(x, p, True) - model.forward_with_scale(x, p, True)).abs().max()) <= 1e-3
