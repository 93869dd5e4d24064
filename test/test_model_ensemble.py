"""Ensemble bundles (``cardiac-copilot export A B --out E.pt``): the mean of the members' actions, the
mixture's Laplace scale, metadata naming the members, the runtime and ONNX conversion, and refusals
of members that do not fit together. Tiny models (ResNet-10 at 32 px) keep each export to seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cardiac_copilot_ros.cli import main  # noqa: E402
from cardiac_copilot_ros.model.bundle import (  # noqa: E402
    build_metadata,
    file_sha256,
    load_bundle,
    quiet_torch_deprecations,
    save_bundle,
)
from cardiac_copilot_ros.model.ensemble import GuidanceEnsemble  # noqa: E402
from cardiac_copilot_ros.model.policy import GuidanceModel  # noqa: E402
from cardiac_copilot_ros.runtime import GuidanceRuntime  # noqa: E402

SIZE = (32, 32)


def _member(path: Path, seed: int, size: tuple[int, int] = SIZE, dreamer: bool = False) -> Path:
    """A random ResNet-10 with uncertainty in the shipped form (folded plane query, fp16 weights)."""
    torch.manual_seed(seed)
    model = GuidanceModel(backbone="resnet10", dreamer=dreamer, uncertainty=True, dreamer_dim=64).eval()
    model.set_action_stats(torch.randn(6), torch.rand(6) * 10 + 1)
    with torch.no_grad():
        model.head.fold_plane_query()
    return save_bundle(model, path, build_metadata(model, size), weights_dtype="float16")


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two members and their ensemble, made by the CLI."""
    folder = tmp_path_factory.mktemp("ensemble")
    a, b = _member(folder / "a.pt", 1), _member(folder / "b.pt", 2)
    out = folder / "ab.pt"
    assert main(["export", str(a), str(b), "--out", str(out), "--fp16"]) == 0
    return a, b, out


def test_ensemble_is_the_mean_with_the_mixture_scale(members: tuple[Path, Path, Path]) -> None:
    a, b, out = members
    ens, ma, mb = load_bundle(out), load_bundle(a), load_bundle(b)
    listed = ens.meta["ensemble"]["members"]
    assert [m["sha256"] for m in listed] == [file_sha256(a), file_sha256(b)]
    assert [m["backbone"] for m in listed] == ["resnet10", "resnet10"] and ens.has_uncertainty
    assert ens.planes == ma.planes and ens.input_size == SIZE
    x, p = torch.rand(5, 1, *SIZE), torch.tensor([0, 1, 2, 0, 1])
    ya, yb, ye = (m.forward_with_scale(x, p).double().numpy() for m in (ma, mb, ens))
    acts, scales = np.stack([ya[:, :6], yb[:, :6]]), np.stack([ya[:, 6:], yb[:, 6:]])
    np.testing.assert_allclose(ye[:, :6], acts.mean(0), rtol=1e-5, atol=1e-4)
    # a Laplace of scale b has variance 2 b^2; the equal mixture's variance is mean(2 b^2) + var(a)
    mixture_var = (2 * scales ** 2).mean(0) + acts.var(0)
    np.testing.assert_allclose(ye[:, 6:], np.sqrt(mixture_var / 2), rtol=1e-5, atol=1e-4)
    assert np.all(ye[:, 6:] >= np.sqrt((scales ** 2).mean(0)) - 1e-5)   # disagreement only adds
    np.testing.assert_allclose(ens(x, p).numpy(), ye[:, :6], rtol=1e-6, atol=1e-5)


def test_runtime_runs_an_ensemble(members: tuple[Path, Path, Path]) -> None:
    a, b, out = members
    frame = (np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)
    preds = [GuidanceRuntime(path, engine="torch", warmup=0).predict(frame, "PSAX-AV") for path in (a, b, out)]
    np.testing.assert_allclose(preds[2].action, (preds[0].action + preds[1].action) / 2, rtol=1e-5, atol=1e-4)
    assert preds[2].action_scale is not None and np.all(preds[2].action_scale > 0)
    assert "ensemble of 2" in GuidanceRuntime(out, engine="torch", warmup=0).describe()


def test_ensemble_converts_to_onnx(members: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cardiac_copilot_ros.model import onnx_bundle

    _, _, out = members
    onnx_path = tmp_path / "ab.onnx"
    assert main(["export", str(out), "--format", "onnx", "--out", str(onnx_path)]) == 0
    om, ts = onnx_bundle.load_onnx(onnx_path), load_bundle(out)
    assert om.meta["ensemble"]["members"] == ts.meta["ensemble"]["members"]
    x, p = torch.rand(3, 1, *SIZE), torch.tensor([2, 0, 1])
    assert float((om.forward_with_scale(x, p) - ts.forward_with_scale(x, p)).abs().max()) <= 1e-3


def test_eager_ensemble_scripts_and_refines_all_or_none(tmp_path: Path) -> None:
    """A member without a Dreamer makes the whole ensemble plain: refine never mixes refined and plain."""
    torch.manual_seed(0)
    with_d = GuidanceModel(backbone="resnet10", dreamer=True, dreamer_dim=64).eval()
    without = GuidanceModel(backbone="resnet10", dreamer=False).eval()
    with quiet_torch_deprecations():
        ens = torch.jit.script(GuidanceEnsemble([with_d, without]).eval())
        both = torch.jit.script(GuidanceEnsemble([with_d, with_d]).eval())
    x, p = torch.rand(2, 1, *SIZE), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(ens(x, p, True), ens(x, p, False))
        assert not torch.allclose(both(x, p, True), both(x, p, False))
    with pytest.raises(ValueError, match="at least 2"):
        GuidanceEnsemble([with_d])


def test_members_that_do_not_fit_are_refused(members: tuple[Path, Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a, _, out = members
    other = _member(tmp_path / "big.pt", 3, size=(48, 48))
    assert main(["export", str(a), str(other), "--out", str(tmp_path / "x.pt")]) == 2
    assert "disagree on input_size" in capsys.readouterr().err
    assert main(["export", str(a), str(out), "--out", str(tmp_path / "y.pt")]) == 2
    assert "already an ensemble" in capsys.readouterr().err
    assert main(["export", str(a), str(tmp_path / "missing.pt"), "--out", str(tmp_path / "z.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("x.pt", "y.pt", "z.pt"))


@pytest.mark.parametrize("bad", [{"members": "a.pt"}, {"members": [{"backbone": "resnet10"}]}, ["a", "b"],
                                 {"members": [{"backbone": 1}, {"backbone": "resnet10"}]}])
def test_bad_ensemble_metadata_is_refused(bad: object, tmp_path: Path) -> None:
    """The member list travels in the file's metadata: a malformed one is a clear BundleError, not a crash."""
    from cardiac_copilot_ros.model.bundle import BundleError

    model = GuidanceModel(backbone="resnet10", dreamer=False).eval()
    meta = {**build_metadata(model, SIZE), "ensemble": bad}
    with pytest.raises(BundleError, match="bad ensemble metadata"):
        save_bundle(model, tmp_path / "bad.pt", meta)
    assert not (tmp_path / "bad.pt").exists()
