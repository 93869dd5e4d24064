"""Inference runtime: a model bundle in, a frame in, a 6-DoF action (mm, deg) out.

No rclpy here: the guidance node, the demo and the benchmarks all use this module.

* :class:`GuidanceRuntime` loads a bundle (TorchScript ``.pt``, see ``model/bundle.py``, or
  ``.onnx``, see ``model/onnx_bundle.py``) on an engine (``torch`` or ``onnxruntime``; ``auto``
  picks the faster one measured at start-up: :mod:`.engines`), preprocesses a frame (crop ROI,
  grayscale, resize to the bundle's input size, scale to [0, 1]; the bundle normalises inside)
  and predicts the action for a plane, with or without the Dreamer refinement. It is thread-safe
  (one forward at a time) and returns the time spent per stage.
* :class:`LatestFrameWorker` runs a function on the newest submitted item on its own thread;
  an item still pending when a newer one arrives is dropped and counted, never queued, so
  latency stays bounded whatever the input rate.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from . import images
from .planes import match_view, parse_plane

PACKAGE = "cardiac_copilot_ros"
#: File name of the default bundle in the package's ``models/`` directory.
DEFAULT_MODEL_NAME = "default.pt"
#: File name of the default fine-stage bundle (coarse to fine) beside the default model.
DEFAULT_FINE_MODEL_NAME = "fine.pt"

#: How to get a model file, for error messages.
MODEL_HINT = ("make one with `cardiac-copilot train ...` then `cardiac-copilot export RUN --out FILE.pt` "
              "(an untrained one for trials: model.bundle.make_untrained_bundle), or pass another bundle "
              "(node parameter model_path:=FILE)")


class FrameError(ValueError):
    """A frame cannot be preprocessed (empty, wrong shape or dtype, not finite, ROI outside)."""


class InferenceError(RuntimeError):
    """The model failed on a frame or returned a non-finite action."""


def repo_models_dir() -> Path:
    """``models/`` of a source checkout (next to this package)."""
    return Path(__file__).resolve().parent.parent / "models"


def package_file_candidates(subdir: str, name: str) -> list[Path]:
    """Where the package's ``subdir/name`` may be: ``share/cardiac_copilot_ros/subdir/name`` when installed
    with ament (colcon), then the source checkout's ``subdir/name``."""
    candidates: list[Path] = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)) / subdir / name)
    except Exception:  # not installed with ament, or ament_index_python missing
        pass
    candidates.append(Path(__file__).resolve().parent.parent / subdir / name)
    return candidates


def default_model_path() -> Path:
    """The default bundle: ``share/cardiac_copilot_ros/models/default.pt`` when the package is
    installed with ament (colcon), else the checkout's ``models/default.pt``.

    The first of these that exists is returned; if none does, the installed location when there
    is one (so error messages name where the file is expected), else the checkout's.
    """
    candidates = package_file_candidates("models", DEFAULT_MODEL_NAME)
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


def default_fine_model_path() -> Path | None:
    """The default fine-stage bundle (``fine.pt`` beside :func:`default_model_path`), or None when absent."""
    path = default_model_path().with_name(DEFAULT_FINE_MODEL_NAME)
    return path if path.is_file() else None


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without CUDA -> ValueError."""
    import torch

    dev = str(device).lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available here; use 'cpu' or 'auto'")
        return dev
    if dev == "cpu":
        return dev
    raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")


def normalize_roi(roi: Sequence[int] | None) -> tuple[int, int, int, int] | None:
    """Validate a crop ROI ``[x, y, w, h]`` in pixels; all zeros or None -> None (full frame).

    ``w`` / ``h`` of 0 extend to the right / bottom edge.
    """
    if roi is None:
        return None
    vals = [int(v) for v in roi]
    if len(vals) != 4:
        raise ValueError(f"crop_roi must be [x, y, w, h], got {list(roi)}")
    if any(v < 0 for v in vals):
        raise ValueError(f"crop_roi values must be >= 0, got {vals}")
    if not any(vals):
        return None
    return vals[0], vals[1], vals[2], vals[3]


def to_gray(frame: np.ndarray) -> np.ndarray:
    """Any accepted frame -> (H, W) uint8: uint8/uint16 gray, HxWx3 RGB, HxWx4 RGBA, float in [0, 1]."""
    arr = np.asarray(frame)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise FrameError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise FrameError(f"empty image (shape {arr.shape})")
    if arr.shape[0] > images.MAX_SIDE_PX or arr.shape[1] > images.MAX_SIDE_PX:
        raise FrameError(f"image too large (shape {arr.shape}); limit {images.MAX_SIDE_PX} px per side")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise FrameError("image contains NaN or inf")
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype not in (np.uint8, np.uint16):
        raise FrameError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    return images.to_gray_u8(arr, "rgb8")


def crop(gray: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop ``roi`` (x, y, w, h; clipped to the image) out of ``gray``."""
    if roi is None:
        return gray
    x, y, w, h = roi
    H, W = gray.shape[:2]
    x1 = W if w == 0 else min(W, x + w)
    y1 = H if h == 0 else min(H, y + h)
    if x >= W or y >= H or x1 <= x or y1 <= y:
        raise FrameError(f"crop_roi {list(roi)} lies outside the {W} x {H} image")
    return gray[y:y1, x:x1]


def preprocess_frame(frame: np.ndarray, input_size_hw: tuple[int, int],
                     roi: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Frame -> (H, W) float32 in [0, 1] at the model's input size (crop, gray, resize, scale)."""
    gray = crop(to_gray(frame), roi)
    small = images.resize_gray(gray, input_size_hw)
    return small.astype(np.float32) * np.float32(1.0 / 255.0)


@dataclass
class Prediction:
    """One guidance prediction."""

    action: np.ndarray  #: (6,) float64: x, y, z in mm; roll, pitch, yaw in deg ('sxyz')
    plane: str  #: canonical plane name
    refined: bool  #: True when the Dreamer refinement was applied
    #: (6,) float64 per-axis Laplace scale b of the action (mm, deg; the expected absolute error), or
    #: None for bundles without uncertainty (metadata ``has_uncertainty``)
    action_scale: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  #: preprocess, inference, total


class GuidanceRuntime:
    """A loaded bundle ready to predict guidance for single frames; thread-safe.

    ``device``: ``auto`` (CUDA when present), ``cpu`` or ``cuda``. ``num_threads``: torch intra-op
    threads (process-wide; None keeps torch's default). ``crop_roi``: ``[x, y, w, h]`` px or None.
    ``model_sha256``: hex digest that pins the bundle file (None or '' = not pinned).
    ``engine``: ``auto``, ``torch`` or ``onnxruntime`` (:mod:`.engines`); the choice is in
    :attr:`engine`, the measured times in :attr:`engine_times_ms`, the log line in
    :attr:`engine_summary` (also passed to ``log``); :attr:`model_ms` is the model time per frame
    of the chosen engine measured on the warm-up frames (None without warm-up).
    Raises ``model.bundle.BundleError`` (naming the file) when the bundle cannot be loaded.
    """

    def __init__(self, bundle_path: str | Path, device: str = "auto", num_threads: int | None = None,
                 crop_roi: Sequence[int] | None = None, warmup: int = 3, optimize: bool = True,
                 model_sha256: str | None = None, engine: str = "auto",
                 log: Callable[[str], None] | None = None) -> None:
        import torch

        from .model.bundle import load_bundle

        self._torch = torch
        if num_threads is not None and int(num_threads) > 0:
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
        self.bundle = load_bundle(bundle_path, device=self.device, sha256=model_sha256)
        self.path = Path(self.bundle.path)
        self.meta: dict[str, Any] = dict(self.bundle.meta)
        self.input_size: tuple[int, int] = (int(self.bundle.input_size[0]), int(self.bundle.input_size[1]))
        self.planes: tuple[str, ...] = tuple(str(p) for p in self.bundle.planes)
        self.has_dreamer: bool = bool(self.bundle.has_dreamer)
        self.has_uncertainty: bool = bool(self.bundle.has_uncertainty)
        self._plane_index = {name: i for i, name in enumerate(self.planes)}
        self._module, self.optimization = self._optimized(self.bundle.module, optimize)
        self._lock = threading.Lock()
        self._roi = normalize_roi(crop_roi)
        self._buf = torch.empty((1, 1, *self.input_size), dtype=torch.float32)
        if self.device != "cpu":
            self._buf = self._buf.pin_memory()
        self._onnx: Any = None  # the ONNX Runtime model when that engine runs
        self._select_engine(engine, model_sha256, warmup, log)
        inference_ms = []
        for _ in range(max(0, int(warmup))):
            frame = np.zeros(self.input_size, dtype=np.uint8)
            self.predict(frame, self.planes[0], refine=False)
            if self.has_dreamer:
                inference_ms.append(self.predict(frame, self.planes[0], refine=True).timings_ms["inference"])
            else:
                inference_ms.append(self.predict(frame, self.planes[0], refine=False).timings_ms["inference"])
        #: Model time per frame (ms) of the chosen engine on the warm-up frames (median), or None.
        self.model_ms: float | None = (float(np.median(inference_ms[1:] or inference_ms)) if inference_ms
                                       else None)
        if self.engine_times_ms.get(self.engine) is not None:
            self.model_ms = self.engine_times_ms[self.engine]

    def _select_engine(self, engine: str, sha256: str | None, warmup: int,
                       log: Callable[[str], None] | None) -> None:
        """Set :attr:`engine` (and the ONNX Runtime model) from the ``engine`` request."""
        from . import engines

        requested = engines.check_engine(engine)
        self.engine_requested = requested
        self.engine_times_ms: dict[str, float] = {}
        self.engine_source = ""
        if self.bundle.fmt == "onnx":
            if requested == "torch":
                raise ValueError(f"engine torch cannot run the ONNX bundle {self.path.name}; use engine "
                                 f"onnxruntime or auto, or give the TorchScript .pt bundle")
            self._onnx = self.bundle.module
            self.engine_source = f"file {self.path}"
        elif requested != "torch":
            if self.device != "cpu":
                if requested == "onnxruntime":
                    raise ValueError("engine onnxruntime runs on the CPU; use device cpu (or engine torch / auto)")
                self.engine_source = "not tried on CUDA"
            else:
                self._onnx, self.engine_source = engines.onnx_candidate(
                    self.path, self.bundle, sha256, self._torch.get_num_threads(), required=requested == "onnxruntime")
        self.engine = "onnxruntime" if self._onnx is not None else "torch"
        if self._onnx is not None and self.bundle.fmt != "onnx":
            # both engines exist: they must agree, and auto keeps the faster
            refine = self.has_dreamer
            x = np.random.default_rng(0).random((1, 1, *self.input_size), dtype=np.float32)
            plane = np.zeros(1, np.int64)
            torch = self._torch

            def run_torch() -> np.ndarray:
                with torch.inference_mode():
                    return self._module(torch.from_numpy(x), torch.from_numpy(plane), refine).numpy()

            def run_onnx() -> np.ndarray:
                return self._onnx.run(x, plane, refine)[:, :6]

            diff = engines.agreement(run_torch(), run_onnx())
            if diff > engines.AGREEMENT_TOLERANCE:
                msg = (f"ONNX Runtime model ({self.engine_source}) disagrees with the TorchScript bundle by "
                       f"{diff:.3g} mm/deg > {engines.AGREEMENT_TOLERANCE:g}")
                if requested == "onnxruntime":
                    from .model.bundle import BundleError

                    raise BundleError(msg)
                self._onnx, self.engine, self.engine_source = None, "torch", msg + "; not used"
            elif requested == "auto":
                frames = max(3, int(warmup))
                self.engine_times_ms = {"torch": engines.time_engine(run_torch, frames),
                                        "onnxruntime": engines.time_engine(run_onnx, frames)}
                self.engine = engines.choose(self.engine_times_ms)
                if self.engine == "torch":
                    self._onnx = None
        self.engine_summary = engines.summary(requested, self.engine, self.engine_times_ms, self.engine_source,
                                              max(3, int(warmup)))
        if self._onnx is not None:
            self.optimization = "onnxruntime (graph optimisation all)"
        if log is not None:
            log(self.engine_summary)

    def slow_warning(self, rate_hz: float) -> str | None:
        """A warning line when the model time exceeds the frame period at ``rate_hz``, else None."""
        if self.model_ms is None or rate_hz <= 0:
            return None
        period_ms = 1e3 / float(rate_hz)
        if self.model_ms <= period_ms:
            return None
        h, w = self.input_size
        other = "onnxruntime" if self.engine == "torch" else "torch"
        return (f"this machine is too slow for {rate_hz:g} Hz: the model takes {self.model_ms:.1f} ms per frame "
                f"(engine {self.engine}, {self.meta.get('backbone', '?')} at {w}x{h} px) > the "
                f"{period_ms:.1f} ms frame period, so frames will be dropped and guidance will lag. Options: "
                f"engine:={other} or auto (measures both), a bundle with a smaller input size or backbone, "
                f"fewer competing processes / more num_threads, or a lower rate (expected_rate_hz; the "
                f"camera's frame rate)")

    def _optimized(self, module: Any, optimize: bool) -> tuple[Any, str]:
        """Freeze a TorchScript module (and fold conv+BN / pick CPU kernels on CPU).

        Measured on 2 CPU cores, ResNet-18 at 64 px: 16.8 -> 11.6 ms per frame (bench guidance).
        Any failure keeps the module as loaded.
        """
        torch = self._torch
        module.eval()
        if not optimize or not isinstance(module, torch.jit.ScriptModule):
            return module, "none"
        from .model.bundle import quiet_torch_deprecations

        try:
            with quiet_torch_deprecations():
                keep = ["forward_with_scale"] if self.bundle.has_uncertainty else []
                frozen = torch.jit.freeze(module, preserved_attrs=keep)
                if self.device == "cpu":
                    return torch.jit.optimize_for_inference(frozen, keep), "frozen+optimize_for_inference"
                return frozen, "frozen"
        except Exception:
            return module, "none (freeze failed)"

    # -- settings -----------------------------------------------------------------------

    @property
    def crop_roi(self) -> tuple[int, int, int, int] | None:
        """The crop ROI (x, y, w, h) in pixels, or None for the full frame."""
        return self._roi

    @crop_roi.setter
    def crop_roi(self, roi: Sequence[int] | None) -> None:
        self._roi = normalize_roi(roi)

    def plane_name(self, plane: str | int) -> str:
        """The model's name of view ``plane`` (any spelling or alias, or an index into the
        model's views); ValueError naming the model's views otherwise."""
        try:
            return match_view(plane, self.planes)
        except ValueError:
            pass
        try:
            name = parse_plane(plane).name
        except ValueError:
            name = str(plane)
        raise ValueError(f"plane {name} is not a view of the model {self.path.name}; "
                         f"valid planes: {', '.join(self.planes)}") from None

    # -- inference ----------------------------------------------------------------------

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        """Frame -> (H, W) float32 in [0, 1] at the input size; :class:`FrameError` on bad input."""
        return preprocess_frame(frame, self.input_size, self._roi)

    def predict(self, frame: np.ndarray, plane: str | int | None = None,
                refine: bool | None = None) -> Prediction:
        """Predict the action for one frame.

        ``frame``: (H, W) uint8 (or any array :func:`to_gray` accepts). ``plane``: a view of
        the model (default its first). ``refine``: apply the
        Dreamer refinement (default: when the bundle has a Dreamer). Raises :class:`FrameError`
        for a bad frame, ValueError for an unknown plane, :class:`InferenceError` when the
        model fails or returns a non-finite action.
        """
        torch = self._torch
        t0 = time.perf_counter()
        name = self.plane_name(self.planes[0] if plane is None else plane)
        refined = self.has_dreamer if refine is None else bool(refine) and self.has_dreamer
        x = self.preprocess(frame)
        t1 = time.perf_counter()
        with self._lock:
            try:
                if self._onnx is not None:  # engine onnxruntime: (1, 12) with uncertainty, else (1, 6)
                    out = np.asarray(self._onnx.run(x[None, None], np.array([self._plane_index[name]], np.int64),
                                                    refined), np.float64).reshape(-1)
                else:
                    self._buf[0, 0].copy_(torch.from_numpy(x))
                    inp = self._buf.to(self.device, non_blocking=True) if self.device != "cpu" else self._buf
                    plane_t = torch.tensor([self._plane_index[name]], dtype=torch.int64, device=self.device)
                    with torch.inference_mode():
                        if self.has_uncertainty:
                            out_t = self._module.forward_with_scale(inp, plane_t, refined)
                        else:
                            out_t = self._module(inp, plane_t, refined)
                    out = out_t.detach().to("cpu", torch.float64).numpy().reshape(-1)
                action, scale = (out[:6], out[6:12]) if self.has_uncertainty else (out[:6], None)
            except Exception as exc:
                raise InferenceError(f"model {self.path.name} failed on a {x.shape} frame: "
                                     f"{type(exc).__name__}: {exc}") from exc
        t2 = time.perf_counter()
        if action.shape != (6,):
            raise InferenceError(f"model {self.path.name} returned shape {action.shape}, expected (6,)")
        if not np.all(np.isfinite(action)):
            raise InferenceError(f"model {self.path.name} returned a non-finite action {action.tolist()}")
        if scale is not None and not (scale.shape == (6,) and np.all(np.isfinite(scale))):
            raise InferenceError(f"model {self.path.name} returned a bad action scale {scale.tolist()}")
        return Prediction(action=action.copy(), plane=name, refined=refined,
                          action_scale=None if scale is None else scale.copy(),
                          timings_ms={"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                                      "total": (t2 - t0) * 1e3})

    def describe(self) -> str:
        """One line for logs: file, backbone, input size, planes, Dreamer, device, threads."""
        h, w = self.input_size
        return (f"{self.path} ({self.meta.get('backbone', '?')}, input {w}x{h}, "
                f"planes {', '.join(self.planes)}, dreamer {'yes' if self.has_dreamer else 'no'}, "
                f"device {self.device}, torch threads {self._torch.get_num_threads()}, "
                f"optimisation {self.optimization}, engine {getattr(self, 'engine', 'torch')})")


# ---------------------------------------------------------------------------------------
# Latest-frame worker
# ---------------------------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


class LatestFrameWorker(Generic[T, R]):
    """Process the newest submitted item on a thread of its own; never queue.

    ``process(item) -> result`` runs on the worker thread; ``on_result(item, result)`` and
    ``on_error(item, exc)`` are called there too. :meth:`submit` replaces a pending item that
    has not started yet and counts it as dropped.
    """

    def __init__(self, process: Callable[[T], R],
                 on_result: Callable[[T, R], None] | None = None,
                 on_error: Callable[[T, BaseException], None] | None = None,
                 name: str = "latest-frame-worker", start: bool = True) -> None:
        self._process = process
        self._on_result = on_result
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: list[T] = []  # 0 or 1 item
        self._busy = False
        self._stopping = False
        self.submitted = 0
        self.processed = 0
        self.dropped = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the thread (done by the constructor unless ``start=False``)."""
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, item: T) -> bool:
        """Make ``item`` the next to process; returns True when a pending item was dropped."""
        with self._cond:
            if self._stopping:
                return False
            self.submitted += 1
            replaced = bool(self._pending)
            if replaced:
                self.dropped += 1
            self._pending[:] = [item]
            self._cond.notify()
            return replaced

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing being processed."""
        with self._cond:
            return not self._pending and not self._busy

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """Block until idle (or timeout); returns whether it is idle."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Drop any pending item, let the current one finish and join the thread."""
        with self._cond:
            self._stopping = True
            if self._pending:
                self._pending.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._cond.notify_all()
                    return
                item = self._pending.pop()
                self._busy = True
            try:
                try:
                    result = self._process(item)
                except Exception as exc:  # reported, never kills the thread
                    self.errors += 1
                    if self._on_error is not None:
                        self._on_error(item, exc)
                else:
                    self.processed += 1
                    if self._on_result is not None:
                        try:
                            self._on_result(item, result)
                        except Exception as exc:
                            self.errors += 1
                            if self._on_error is not None:
                                self._on_error(item, exc)
            except Exception:  # an on_error callback failed: keep the worker alive
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def default_num_threads() -> int:
    """Intra-op threads for inference: all cores but one left to DDS and the executor (min 1)."""
    return max(1, (os.cpu_count() or 1) - 1)
