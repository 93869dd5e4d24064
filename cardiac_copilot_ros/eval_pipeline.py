"""The fast prediction pipeline of ``cardiac-copilot evaluate`` (issue 16, item 4).

What makes it fast, against the first implementation (:func:`.evaluation.predict`, kept for
comparison: ``python -m cardiac_copilot_ros.eval_pipeline CACHE MODEL`` measures both):

* **one encoder pass per frame for every entry of a model**: a Dreamer model's ``/policy`` and
  ``/dreamer`` entries come from one forward (:class:`AllEntries`: encode, policy head, then the
  Dreamer refinement on the same feature map) instead of two full forwards; checked against the
  model's own ``forward`` on a sample batch at load (1e-3 mm/deg), else the two forwards are used;
* **frozen and optimised for inference** on the CPU (TorchScript freeze; the encoder also with
  conv+BN folding and oneDNN kernels, ``torch.jit.optimize_for_inference``);
* **loaded and resized once**: each batch of frames is read from the cache, scaled to [0, 1]
  and resized once per input size, and serves every model of that size;
* **the loader overlaps inference**: a background thread prepares the next batches while the
  models run on the current one.

The numbers are those of the first implementation (same resize, same arithmetic up to float
rounding of the fused kernels).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cardiac_copilot_ros.model import torch_pose

#: Agreement required between the one-pass entries and the model's own forward (mm, deg).
ONE_PASS_TOLERANCE = 1e-3


class Encode(nn.Module):
    """The encoder alone, ``image -> (feature map, pooled feature)`` (optimised apart: oneDNN)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(image)


class Heads(nn.Module):
    """``(feature map, pooled feature, plane) -> (B, 6 * entries)``: the policy action, then (with a
    Dreamer) the refined one, as GuidanceModel.forward computes them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fmap: torch.Tensor, feat: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        m = self.model
        action = m.denormalize_action(m.head(feat, plane))
        dreamer = m.dreamer
        if dreamer is None:
            return action
        imagined = dreamer(fmap, m.normalize_action(action), plane)
        residual = m.denormalize_action(m.head(imagined, plane))
        return torch.cat([action, torch_pose.compose_actions(action, residual)], dim=1)


class AllEntries(nn.Module):
    """``(image, plane) -> (B, 6 * entries)``: :class:`Encode` then :class:`Heads`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encode = Encode(model)
        self.heads = Heads(model)

    def forward(self, image: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        fmap, feat = self.encode(image)
        return self.heads(fmap, feat, plane)


def one_pass(model: nn.Module, reference: Callable[..., torch.Tensor], input_size: tuple[int, int],
             n_planes: int, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """A frozen one-pass function for the eager GuidanceModel ``model``, or None when it does not
    reproduce ``reference(image, plane, refine)`` (the model as loaded) within 1e-3 mm/deg."""
    from cardiac_copilot_ros.model.bundle import quiet_torch_deprecations

    has_dreamer = getattr(model, "dreamer", None) is not None
    try:
        wrapper = AllEntries(model).eval().to(device)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(4, 1, *input_size, generator=gen).to(device)
        p = (torch.arange(4, dtype=torch.int64) % n_planes).to(device)
        with torch.inference_mode():
            want = [reference(x, p, False)] + ([reference(x, p, True)] if has_dreamer else [])
        want_t = torch.cat([w.float() for w in want], dim=1)
    except Exception:  # a model this code cannot take apart: the per-mode forwards are used
        return None

    def frozen(module: nn.Module, optimize: bool) -> Any:
        with quiet_torch_deprecations():
            fn = torch.jit.freeze(torch.jit.script(module).eval())
            return torch.jit.optimize_for_inference(fn) if optimize else fn

    def split() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        # oneDNN for the convolutions; the heads frozen apart (oneDNN refuses the Dreamer's
        # adaptive pooling of a 1x1 or 2x2 map up to 4x4)
        encode, heads = frozen(wrapper.encode, True), frozen(wrapper.heads, False)

        def fn(image: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
            fmap, feat = encode(image)
            return heads(fmap, feat, plane)

        return fn

    # fastest first
    makers = ([split, lambda: frozen(wrapper, False)] if device.type == "cpu" else []) + [lambda: wrapper]
    for make in makers:
        try:
            fn = make()
            with torch.inference_mode():
                got = fn(x, p)
        except Exception:
            continue
        if (got.shape == want_t.shape and bool(torch.isfinite(got).all())
                and float((got - want_t).abs().max()) <= ONE_PASS_TOLERANCE):
            return fn
    return None


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from cardiac_copilot_ros.evaluation import _resize as resize

    return resize(x, size)


def batches(images: np.ndarray, plane: np.ndarray, indices: np.ndarray, batch_size: int,
            size: tuple[int, int], device: torch.device, prefetch: int = 3) -> Iterator[tuple[int, torch.Tensor,
                                                                                            torch.Tensor]]:
    """(start, image (B, 1, H, W) float in [0, 1] at ``size``, plane (B,)) batches, prepared on a
    background thread ``prefetch`` batches ahead of the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def load() -> None:
        try:
            for start in range(0, len(indices), batch_size):
                if stop.is_set():
                    return
                idx = indices[start:start + batch_size]
                x = torch.from_numpy(np.asarray(images[idx], np.uint8)).unsqueeze(1).to(device).float().div_(255.0)
                x = _resize(x, size)
                p = torch.from_numpy(np.asarray(plane[idx], np.int64)).to(device)
                while not stop.is_set():
                    try:
                        q.put((start, x, p), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
            return
        q.put(None)

    thread = threading.Thread(target=load, name="evaluate-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)


def predict_models(models: Sequence[Any], images: np.ndarray, plane: np.ndarray, indices: np.ndarray,
                   batch_size: int = 64, device: str = "cpu", progress: bool = True,
                   plane_for: dict[str, np.ndarray] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
    """Predictions (N, 6) mm/deg for every entry of every model (:class:`.evaluation.EvalModel`).

    ``plane_for``: per model name, the plane column in that model's plane-query order (where its
    views are ordered differently from the cache's, see ``evaluation.model_planes``).

    Returns (predictions per entry, inference seconds per model name, wall seconds in all).
    """
    dev = torch.device(device)
    preds: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {m.name: 0.0 for m in models}
    for m in models:
        for e in m.entries:
            preds[e] = np.zeros((len(indices), 6), np.float32)
    groups: dict[tuple[int, int], list[Any]] = {}
    for m in models:
        groups.setdefault(tuple(m.input_size), []).append(m)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices) * len(models), unit="frame", desc="evaluate", dynamic_ncols=True,
                   file=sys.stderr)
    t_all = time.perf_counter()
    try:
        with torch.inference_mode():
            for size, group in groups.items():
                for start, x, p in batches(images, plane, indices, batch_size, size, dev):
                    n = len(p)
                    for m in group:
                        t0 = time.perf_counter()
                        own = (plane_for or {}).get(m.name, plane)
                        pm = p if own is plane else torch.from_numpy(
                            np.asarray(own[indices[start:start + n]], np.int64)).to(dev)
                        multi = getattr(m, "multi", None)
                        if multi is not None:
                            out = multi(x, pm).float().cpu().numpy()
                            for k, entry in enumerate(m.entries):
                                preds[entry][start:start + n] = out[:, 6 * k:6 * (k + 1)]
                        else:
                            modes = [False, True] if m.has_dreamer else [False]
                            for entry, refine in zip(m.entries, modes, strict=True):
                                preds[entry][start:start + n] = m.forward(x, pm, refine).float().cpu().numpy()
                        seconds[m.name] += time.perf_counter() - t0
                        if bar is not None:
                            bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return preds, seconds, time.perf_counter() - t_all


def compare_main(argv: list[str] | None = None) -> int:
    """Old vs new prediction throughput on one cache, back to back in one process."""
    from cardiac_copilot_ros import evaluation
    from cardiac_copilot_ros.data.dataset import load_manifest, split_indices

    ap = argparse.ArgumentParser(prog="python -m cardiac_copilot_ros.eval_pipeline",
                                 description="Frames/s of evaluate's first prediction loop and of this pipeline, "
                                             "on the same cache and models, one after the other.")
    ap.add_argument("data", type=Path, help="dataset cache")
    ap.add_argument("models", nargs="+", help="run folders, checkpoints or bundles")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="alternate old/new this many times (median)")
    args = ap.parse_args(argv)
    manifest = load_manifest(args.data)
    indices = split_indices(args.data, args.split, manifest)
    images = np.load(args.data / "images.npy", mmap_mode="r")
    plane = np.load(args.data / "plane.npy", mmap_mode="r")
    models = [evaluation.load_model(p) for p in args.models]
    old_t, new_t, worst = [], [], 0.0
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        old = {}
        for m in models:
            old.update(evaluation.predict(m, images, plane, indices, args.batch_size, progress=False))
        old_t.append(time.perf_counter() - t0)
        new, _, wall = predict_models(models, images, plane, indices, args.batch_size, progress=False)
        new_t.append(wall)
        worst = max(worst, max(float(np.abs(old[e] - new[e]).max()) for e in old))
    n = len(indices) * len(models)
    old_fps, new_fps = n / float(np.median(old_t)), n / float(np.median(new_t))
    print(f"{len(indices)} frames x {len(models)} model(s) ({', '.join(e for m in models for e in m.entries)}), "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"first implementation: {old_fps:.1f} frames/s; this pipeline: {new_fps:.1f} frames/s; "
          f"speed-up {new_fps / old_fps:.2f}x; max |difference| {worst:.2e} mm/deg")
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
