"""Latest-frame worker and frame preprocessing (no model, no ROS)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cardiac_copilot_ros import runtime


def test_worker_processes_latest_and_counts_drops() -> None:
    gate = threading.Event()
    started = threading.Event()
    seen: list[int] = []

    def process(item: int) -> int:
        started.set()
        gate.wait(30.0)
        return item * 10

    worker = runtime.LatestFrameWorker(process, on_result=lambda i, r: seen.append(r))
    try:
        worker.submit(0)           # picked up by the worker, blocks on the gate
        assert started.wait(30.0)  # (an event, not a fixed pick-up window: CI machines are slow)
        dropped = [worker.submit(i) for i in range(1, 6)]   # 1..4 replaced by the next one
        assert dropped == [False, True, True, True, True]
        gate.set()
        assert worker.wait_idle(5.0)
        assert seen == [0, 50]     # the newest, never the backlog
        assert worker.submitted == 6 and worker.dropped == 4 and worker.processed == 2
    finally:
        worker.stop()
    assert not worker._thread.is_alive()


def test_worker_survives_errors_in_process_and_callback() -> None:
    errors: list[str] = []
    results: list[int] = []

    def process(item: int) -> int:
        if item == 1:
            raise RuntimeError("bad frame")
        return item

    def on_result(item: int, result: int) -> None:
        if item == 2:
            raise ValueError("publisher failed")
        results.append(result)

    worker = runtime.LatestFrameWorker(process, on_result=on_result,
                                       on_error=lambda i, e: errors.append(f"{i}:{e}"))
    try:
        for item in (1, 2, 3):
            worker.submit(item)
            assert worker.wait_idle(5.0)
        assert errors == ["1:bad frame", "2:publisher failed"]
        assert results == [3] and worker.errors == 2
    finally:
        worker.stop()


def test_worker_bounded_under_flood() -> None:
    """Submitting far faster than processing keeps at most one item waiting: every item is either
    processed or dropped (none queued), in order, and the newest one always wins."""
    done: list[int] = []
    worker = runtime.LatestFrameWorker(lambda k: time.sleep(0.01) or k, on_result=lambda i, r: done.append(r))
    n = 0
    try:
        t_end = time.monotonic() + 0.3
        while time.monotonic() < t_end:
            worker.submit(n)
            n += 1
            time.sleep(0.0005)
        assert worker.wait_idle(2.0)
    finally:
        worker.stop()
    assert worker.dropped > worker.processed > 5
    assert worker.processed + worker.dropped == worker.submitted == n   # nothing waits in a queue
    assert done == sorted(done) and done[-1] == n - 1                  # in order; the newest is answered


def test_stop_is_idempotent_and_rejects_new_items() -> None:
    worker = runtime.LatestFrameWorker(lambda x: x)
    worker.stop()
    worker.stop()
    assert worker.submit(1) is False


@pytest.mark.parametrize("frame,shape", [
    (np.full((40, 30), 255, np.uint8), (16, 16)),
    (np.full((40, 30, 3), 255, np.uint8), (16, 16)),
    (np.full((40, 30, 4), 255, np.uint8), (16, 16)),
    (np.full((40, 30), 65535, np.uint16), (16, 16)),
    (np.ones((40, 30), np.float32), (16, 16)),
    (np.full((8, 6), 255, np.uint8), (16, 16)),        # upsampling
])
def test_preprocess_accepts_formats(frame: np.ndarray, shape: tuple[int, int]) -> None:
    x = runtime.preprocess_frame(frame, shape)
    assert x.shape == shape and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0, atol=1.0 / 255.0 + 1e-6)


def test_preprocess_crop_roi() -> None:
    frame = np.zeros((20, 30), np.uint8)
    frame[5:15, 10:20] = 200
    x = runtime.preprocess_frame(frame, (10, 10), runtime.normalize_roi([10, 5, 10, 10]))
    np.testing.assert_allclose(x, 200 / 255.0, atol=1e-6)
    tail = runtime.crop(frame, runtime.normalize_roi([25, 0, 0, 0]))   # w = 0: to the right edge
    assert tail.shape == (20, 5)
    assert runtime.normalize_roi([0, 0, 0, 0]) is None


@pytest.mark.parametrize("frame", [
    np.zeros((0, 5), np.uint8), np.zeros((5, 5, 2), np.uint8), np.zeros((5,), np.uint8),
    np.full((4, 4), np.nan, np.float32), np.zeros((4, 4), np.int32), np.zeros((9000, 2), np.uint8),
])
def test_preprocess_rejects_bad_frames(frame: np.ndarray) -> None:
    with pytest.raises(runtime.FrameError):
        runtime.preprocess_frame(frame, (8, 8))


def test_roi_validation() -> None:
    with pytest.raises(ValueError):
        runtime.normalize_roi([1, 2, 3])
    with pytest.raises(ValueError):
        runtime.normalize_roi([-1, 0, 4, 4])
    with pytest.raises(runtime.FrameError):
        runtime.crop(np.zeros((10, 10), np.uint8), (20, 0, 5, 5))


def test_default_model_path_points_at_models_dir() -> None:
    path = runtime.default_model_path()
    assert path.name == "default.pt" and path.parent.name == "models"


def test_resolve_device() -> None:
    assert runtime.resolve_device("cpu") == "cpu"
    assert runtime.resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError):
        runtime.resolve_device("tpu")
