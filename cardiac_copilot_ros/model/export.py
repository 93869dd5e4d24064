"""``cardiac-copilot export RUN --out FILE.pt [--format torchscript|export]``.

Turns a run folder (its ``best.pt``) or a checkpoint into one model bundle (policy and Dreamer,
with metadata; see :mod:`.bundle`), then loads the file back and checks it against the eager
model (max abs diff <= 1e-4 mm/deg in both modes) before reporting success.

``cardiac-copilot export RUN_A RUN_B [...] --out FILE.pt``: one bundle whose output is the mean of the
models (an ensemble, :mod:`.ensemble`; members may also be TorchScript bundles), checked the same way.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

from cardiac_copilot_ros.model.bundle import (
    FORMATS,
    Bundle,
    BundleError,
    build_metadata,
    load_bundle,
    save_bundle,
)

#: Export check tolerance, paper units (mm, deg).
TOLERANCE = 1e-4


def export_checkpoint(source: str | Path, out: str | Path, fmt: str | None = None, check: bool = True,
                      fp16: bool = False) -> dict[str, Any]:
    """Export a run folder or checkpoint; returns {path, format, max_abs_diff, meta} (and, with
    ``fp16``, ``fp16_rounding``: the max abs change of the outputs from storing the weights in fp16,
    mm/deg; the check then compares with the eager model on the same rounded weights)."""
    from cardiac_copilot_ros.model.checkpoint import load_checkpoint, model_from_checkpoint

    state = load_checkpoint(source, prefer="best")
    reference = model_from_checkpoint(state)
    model = model_from_checkpoint(state)
    model.head.fold_plane_query()  # exact; a smaller file (the check below compares with the unfolded model)
    out = Path(out)
    if fmt is None:
        fmt = "export" if out.suffix == ".pt2" else "torchscript"
    h, w = state["input_size"]
    cfg = state.get("config", {})
    meta = build_metadata(model, (h, w), data_manifest_sha256=state.get("data_manifest_sha256"), extra={
        "model": cfg.get("model"), "training": {"checkpoint": str(state["path"]), "step": state.get("step"),
                                                "preset": cfg.get("preset"), "best": state.get("best"),
                                                "code_version": state.get("code_version"),
                                                "sim_subjects": state.get("sim_subjects") or {},
                                                "init_from": cfg.get("init_from") or None,
                                                "dagger_states": [p for p in str(cfg.get("dagger_states") or "")
                                                                  .split(",") if p]}})
    return _write_checked(model, reference, out, meta, fmt, check, fp16)


def _write_checked(model: torch.nn.Module, reference: torch.nn.Module, out: Path, meta: dict[str, Any], fmt: str,
                   check: bool, fp16: bool) -> dict[str, Any]:
    """Save ``model`` as a bundle, read it back once and compare it with ``reference`` (the eager model it came
    from); with ``fp16``, also report the rounding against ``reference`` and check against ``model``'s rounded
    weights. Returns {path, format, meta, max_abs_diff} (and ``fp16_rounding``)."""
    path = save_bundle(model, out, meta, fmt, weights_dtype="float16" if fp16 else "float32")
    bundle = load_bundle(path, allow_torch_export=True)  # the file this process just wrote, read back once
    result: dict[str, Any] = {"path": str(path), "format": fmt, "meta": bundle.meta, "max_abs_diff": None}
    if check:
        if fp16:
            result["fp16_rounding"] = max(check_bundle(reference, bundle).values())
            reference = copy.deepcopy(model).half().float()   # the saved weights, rounded as in the file
        result["max_abs_diff"] = check_bundle(reference, bundle)
    return result


def export_ensemble(sources: list[str | Path], out: str | Path, fmt: str | None = None, check: bool = True,
                    fp16: bool = False) -> dict[str, Any]:
    """One bundle averaging the models of ``sources`` (:mod:`.ensemble`); returns what
    :func:`export_checkpoint` does."""
    from cardiac_copilot_ros.model.ensemble import build_ensemble

    model, meta = build_ensemble(sources)
    out = Path(out)
    if fmt is None:
        fmt = "export" if out.suffix == ".pt2" else "torchscript"
    return _write_checked(model, model, out, meta, fmt, check, fp16)


def check_bundle(model: torch.nn.Module, bundle: Bundle | str | Path, batch: int = 3, seed: int = 0
                 ) -> dict[str, float]:
    """Max abs difference (mm/deg) between a saved bundle (loaded, or its path) and the eager model, per mode."""
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, allow_torch_export=True)  # the file this process just wrote
    h, w = bundle.input_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, h, w, generator=gen)
    plane = torch.arange(batch, dtype=torch.int64) % len(bundle.planes)
    diffs = {}
    model = model.eval()
    with torch.no_grad():
        for refine in (False, True):
            ref = model(x, plane, refine)
            diffs["refine" if refine else "policy"] = float((bundle(x, plane, refine) - ref).abs().max())
            if bundle.has_uncertainty:
                ref12 = model.forward_with_scale(x, plane, refine)
                key = "scale_refine" if refine else "scale_policy"
                diffs[key] = float((bundle.forward_with_scale(x, plane, refine) - ref12).abs().max())
    return diffs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", nargs="+",
                        help="run folder (uses best.pt) or checkpoint file; with --format onnx also a TorchScript "
                             "bundle (.pt) to convert. Two or more (runs, checkpoints or TorchScript bundles): one "
                             "bundle whose output is their mean (an ensemble; K times the model time)")
    parser.add_argument("--out", required=True, metavar="FILE", help="bundle to write (.pt, .pt2 or .onnx)")
    parser.add_argument("--format", choices=list(FORMATS), default=None,
                        help="torchscript (.pt, default), export (torch.export .pt2) or onnx (.onnx for ONNX Runtime; "
                             "RUN may also be a TorchScript bundle to convert); default from --out's suffix")
    parser.add_argument("--no-check", action="store_true", help="skip the reload-and-compare check")
    parser.add_argument("--fp16", action="store_true",
                        help="store the weights in half precision (TorchScript: half the file size; run in float32 "
                             "after loading; outputs change by about 1e-3 relative, reported)")


def run(args: argparse.Namespace) -> int:
    if args.format == "onnx" or (args.format is None and Path(args.out).suffix == ".onnx"):
        if args.fp16:
            print("export: --fp16 applies to TorchScript bundles (.pt); ONNX files keep float32 weights",
                  file=sys.stderr)
            return 2
        from cardiac_copilot_ros.model.onnx_bundle import run_export

        return run_export(args)  # from a run, checkpoint or TorchScript bundle; checked against it
    try:
        if len(args.run) > 1:
            res = export_ensemble(args.run, args.out, args.format, check=not args.no_check, fp16=args.fp16)
        else:
            res = export_checkpoint(args.run[0], args.out, args.format, check=not args.no_check, fp16=args.fp16)
    except (FileNotFoundError, ValueError, BundleError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    meta = res["meta"]
    print(f"wrote {res['path']} ({res['format']}; {meta['backbone']}, input {meta['input_size'][0]}x"
          f"{meta['input_size'][1]}, dreamer {'yes' if meta['has_dreamer'] else 'no'}, planes "
          f"{', '.join(meta['planes'])})")
    diffs = res["max_abs_diff"]
    if diffs is not None:
        print("check vs eager model: " + ", ".join(f"{k} max |diff| {v:.2e}" for k, v in diffs.items())
              + f" (tolerance {TOLERANCE:g} mm/deg)")
        if "fp16_rounding" in res:
            print(f"fp16 weights: outputs differ from the full-precision model by at most "
                  f"{res['fp16_rounding']:.2e} mm/deg (the check above uses the same rounded weights)")
        bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}  # NaN and inf fail too
        if bad:
            print("export: bundle outputs differ from the model (" + ", ".join(
                f"{k} {v:.3g}" for k, v in bad.items()) + f"; tolerance {TOLERANCE:g}, NaN/inf count as "
                "failures: check the checkpoint's weights)", file=sys.stderr)
            return 1
    return 0
