"""Inference engines of the runtime: TorchScript (``torch``) or ONNX Runtime (``onnxruntime``).

No rclpy here. :class:`~cardiac_copilot_ros.runtime.GuidanceRuntime` (and through it the
guidance node, parameter ``engine``) uses :func:`onnx_candidate` to find an ONNX Runtime version
of a TorchScript bundle and :func:`choose` to pick the faster engine at start-up.

``engine``:

* ``torch``: the TorchScript bundle (frozen, optimised for inference on the CPU).
* ``onnxruntime``: ONNX Runtime on the CPU. Given an ``.onnx`` bundle it runs that file. Given a
  ``.pt`` bundle it uses ``<same name>.onnx`` beside it when that file carries exactly the same
  metadata and the ``.pt`` is not pinned by ``model_sha256`` (a pin covers one file; an unpinned
  sibling would bypass it); otherwise it converts the ``.pt`` in memory at start-up (needs
  onnxscript; tens of seconds for ResNet-18 on 2 busy cores). Both engines must then agree to
  1e-3 mm/deg on a warm-up frame.
* ``auto`` (default): an ``.onnx`` bundle runs on ``onnxruntime``. A ``.pt`` bundle on the CPU with
  a usable ``<same name>.onnx`` beside it (as above) runs both engines on the same warm-up frames
  (median time per frame) and keeps the faster; the choice and both times are logged. Without
  such a file (or without onnxruntime, or on CUDA) it is ``torch``, and the log line says how to
  get the other engine: convert once with
  ``cardiac-copilot export MODEL.pt --format onnx --out MODEL.onnx`` (``auto`` does not convert in
  memory: that would add tens of seconds to every start). ``make setup`` converts the shipped
  bundles (``models/*.onnx``, generated at set-up, not in git).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = ("auto", "torch", "onnxruntime")
#: Agreement the two engines must reach on a warm-up frame (mm, deg).
AGREEMENT_TOLERANCE = 1e-3


def check_engine(engine: str) -> str:
    """Validate an ``engine`` value (ValueError naming the choices)."""
    name = str(engine).strip().lower()
    if name not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return name


def onnx_candidate(path: Path, bundle: Any, sha256: str | None, num_threads: int | None,
                   required: bool) -> tuple[Any | None, str]:
    """An ONNX Runtime model for the TorchScript ``bundle`` loaded from ``path``, and where it came from.

    ``required`` (engine onnxruntime): convert in memory when there is no usable ``.onnx`` beside
    ``path``, and raise BundleError when nothing works. Otherwise (auto) returns (None, reason).
    """
    from cardiac_copilot_ros.model import onnx_bundle
    from cardiac_copilot_ros.model.bundle import BundleError

    def fail(reason: str) -> tuple[None, str]:
        if required:
            raise BundleError(f"engine onnxruntime: {reason}")
        return None, reason

    if not onnx_bundle.onnxruntime_available():
        return fail(f"onnxruntime is not installed ({onnx_bundle.INSTALL_HINT})")
    sibling = path.with_suffix(".onnx")
    note = ""
    if sibling.is_file():
        if sha256:
            note = f"{sibling.name} beside it ignored (model_sha256 pins {path.name} only); "
        else:
            try:
                model = onnx_bundle.load_onnx(sibling, num_threads=num_threads)
            except BundleError as exc:
                note = f"{sibling.name} beside it ignored ({exc}); "
            else:
                if model.meta == bundle.meta:
                    return model, f"file {sibling}"
                note = f"{sibling.name} beside it ignored (its metadata differs: another model); "
    if not required:
        return None, (note + f"no {sibling.name} beside the bundle; to measure ONNX Runtime too, convert once: "
                      f"cardiac-copilot export {path} --format onnx --out {sibling}")
    if not onnx_bundle.exporter_available():
        return fail(note + f"no .onnx file and no exporter to convert in memory ({onnx_bundle.INSTALL_HINT})")
    t0 = time.perf_counter()
    try:
        eager = onnx_bundle.eager_from_torchscript(bundle.module, bundle.meta)
        data = onnx_bundle.export_onnx(eager, bundle.meta)
        model = onnx_bundle.session_from_bytes(data, f"{path} (converted in memory)", num_threads)
    except BundleError as exc:
        return fail(note + f"in-memory conversion failed: {exc}")
    return model, note + f"{path.name} converted in memory in {time.perf_counter() - t0:.1f} s"


def time_engine(infer: Callable[[], Any], frames: int) -> float:
    """Median milliseconds of ``infer()`` over ``frames`` calls after one untimed call."""
    infer()
    times = []
    for _ in range(max(1, frames)):
        t0 = time.perf_counter()
        infer()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs difference of two engines' outputs; inf when either is not finite or shapes differ."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max())


def choose(times_ms: dict[str, float]) -> str:
    """The engine with the lowest median time."""
    return min(times_ms, key=lambda k: times_ms[k])


def summary(requested: str, chosen: str, times_ms: dict[str, float], source: str, frames: int) -> str:
    """One log line: the choice, both times, the speed-up and where the ONNX model came from."""
    parts = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(times_ms.items()))
    line = f"engine {requested}: {chosen}"
    if len(times_ms) > 1:
        slow = max(times_ms.values())
        line += (f" (model time per frame, median of {frames} warm-up frames: {parts}; "
                 f"{slow / max(times_ms[chosen], 1e-9):.2f}x)")
    elif times_ms:
        line += f" ({parts} per frame)"
    if source:
        line += f"; ONNX model: {source}"
    return line
