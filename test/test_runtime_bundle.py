"""GuidanceRuntime on real (untrained) bundles: same numbers as the bundle, thread-safe, clear errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cardiac_copilot_ros import runtime  # noqa: E402
from cardiac_copilot_ros.model.bundle import BundleError, load_bundle, make_untrained_bundle  # noqa: E402


def _cached_bundle(factory: pytest.TempPathFactory, name: str, **kw: object) -> Path:
    path = factory.getbasetemp() / name
    if not path.exists():
        make_untrained_bundle(path, **kw)
    return path


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cached_bundle(tmp_path_factory, "guidance_r18_64.pt", backbone="resnet18", input_size=(64, 64))


@pytest.fixture(scope="module")
def rt(bundle_path: Path) -> runtime.GuidanceRuntime:
    return runtime.GuidanceRuntime(bundle_path, device="cpu")


def _frame(seed: int = 0, shape: tuple[int, int] = (120, 100)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_predict_matches_bundle(rt: runtime.GuidanceRuntime, bundle_path: Path) -> None:
    bundle = load_bundle(bundle_path)
    frame = _frame()
    x = torch.from_numpy(runtime.preprocess_frame(frame, rt.input_size))[None, None]
    for plane_idx, plane in enumerate(rt.planes):
        for refine in (False, True):
            pred = rt.predict(frame, plane, refine)
            ref = bundle(x, torch.tensor([plane_idx]), refine).double().numpy()[0]
            np.testing.assert_allclose(pred.action, ref, atol=1e-4, rtol=1e-4)
            assert pred.plane == plane and pred.refined is refine
            assert pred.action.dtype == np.float64 and pred.action.shape == (6,)
            assert set(pred.timings_ms) == {"preprocess", "inference", "total"}
            assert pred.timings_ms["total"] >= pred.timings_ms["inference"] > 0


def test_metadata_and_planes(rt: runtime.GuidanceRuntime) -> None:
    assert rt.input_size == (64, 64) and rt.has_dreamer
    assert rt.planes == ("PLAX", "PSAX-AV", "PSAX-MV")
    assert rt.predict(_frame(), "psax av").plane == "PSAX-AV"     # any common spelling
    assert rt.predict(_frame(), 2).plane == "PSAX-MV"
    with pytest.raises(ValueError, match="PLAX, PSAX-AV, PSAX-MV"):
        rt.predict(_frame(), "A4C")


def test_refinement_changes_the_action(rt: runtime.GuidanceRuntime) -> None:
    frame = _frame(3)
    plain, refined = rt.predict(frame, "PLAX", False), rt.predict(frame, "PLAX", True)
    assert not np.allclose(plain.action, refined.action)
    assert rt.predict(frame, "PLAX").refined is True      # default: refine when a Dreamer exists


def test_crop_roi(rt: runtime.GuidanceRuntime, bundle_path: Path) -> None:
    frame = _frame(5, (200, 300))
    cropped = runtime.GuidanceRuntime(bundle_path, device="cpu", crop_roi=[50, 20, 128, 128], warmup=0)
    np.testing.assert_allclose(cropped.predict(frame, "PLAX", False).action,
                               rt.predict(frame[20:148, 50:178], "PLAX", False).action, atol=1e-6)
    cropped.crop_roi = [0, 0, 0, 0]
    assert cropped.crop_roi is None
    with pytest.raises(runtime.FrameError):
        runtime.GuidanceRuntime(bundle_path, device="cpu", crop_roi=[500, 0, 10, 10], warmup=0).predict(frame)


def test_thread_safe(rt: runtime.GuidanceRuntime) -> None:
    frames = [_frame(i) for i in range(4)]
    expected = [rt.predict(f, "PSAX-MV", True).action for f in frames]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(4)}

    def work(i: int) -> None:
        for _ in range(3):
            results[i].append(rt.predict(frames[i], "PSAX-MV", True).action)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for got in results[i]:
            np.testing.assert_allclose(got, expected[i], atol=1e-6)


def test_bad_frames_raise_frame_error(rt: runtime.GuidanceRuntime) -> None:
    for bad in (np.zeros((0, 0), np.uint8), np.full((8, 8), np.nan, np.float32), np.zeros((4, 4, 2), np.uint8)):
        with pytest.raises(runtime.FrameError):
            rt.predict(bad)


def test_bundle_without_dreamer(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _cached_bundle(tmp_path_factory, "guidance_r18_32_nodreamer.pt", backbone="resnet18",
                          input_size=(32, 32), dreamer=False)
    rt = runtime.GuidanceRuntime(path, device="cpu", warmup=1)
    assert not rt.has_dreamer
    pred = rt.predict(_frame(), "PLAX", True)
    assert pred.refined is False
    np.testing.assert_allclose(pred.action, rt.predict(_frame(), "PLAX", False).action)


def test_missing_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(BundleError, match="nope.pt"):
        runtime.GuidanceRuntime(missing, device="cpu")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BundleError, match="corrupt.pt"):
        runtime.GuidanceRuntime(corrupt, device="cpu")


def test_runtime_refuses_torch_export_bundles(tmp_path: Path) -> None:
    """torch.export.load can unpickle parts of the file: the runtime never loads one."""
    pt2 = make_untrained_bundle(tmp_path / "b.pt2", backbone="resnet18", input_size=(32, 32), fmt="export",
                                dreamer=False)
    with pytest.raises(BundleError, match="refusing a torch.export archive"):
        runtime.GuidanceRuntime(pt2, device="cpu")
