"""``cardiac-copilot evaluate``: the paper's Table 1 and Fig. 3 for runs and bundles.

``cardiac-copilot evaluate RUN_OR_BUNDLE... --data CACHE --split test [--json FILE] [--out DIR]``
``cardiac-copilot evaluate RUN_OR_BUNDLE... [--data CACHE] --approach [test|val]``

The approach set (issue 12; :func:`evaluate_approach`) predicts the closed loop: frames drawn over
the closed-loop bench's whole start range (+-40 mm x, y, +-8 mm z, +-40 deg) and near the target, on
held-out simulator subjects, rendered deterministically at 224 px. Its outputs (the same files,
plus ``table_ci.md``) go to ``OUT/approach/`` beside the cache split's (or to ``OUT`` without
``--data``); its ``details.json`` adds ``bootstrap`` (per plane and axis MAE with 95 % CIs by
bootstrap over subjects, the ratio to the train-mean predictor, every model pair's difference) and
``calibration`` (coverage of the 68 % / 95 % Laplace intervals of models with an uncertainty head).

Models: run folders (their ``best.pt``), training checkpoints, or bundles (``.pt`` TorchScript,
``.pt2`` torch.export), any number. A model without a Dreamer gives one entry named after it;
a Dreamer model gives two: ``<name>/policy`` (the policy alone) and ``<name>/dreamer`` (the
refined action ``U^-1(U(a) U(G(I(f, a), q)))``).

Metrics, per plane and per axis (x, y, z mm; roll, pitch, yaw deg): the mean absolute error
(MAE) and the standard deviation (population, ddof 0) of the absolute error; Euler-angle
errors are wrapped to [0, 180] deg (as in training's validation). The relative change of an
entry against the baseline entry is ``(mae_entry - mae_baseline) / mae_baseline * 100`` per
axis (negative = lower error). The "train mean" row is the error of always predicting the
train split's mean action (the cache manifest's ``action_stats``): what a model must beat.

Outputs (``--out DIR``; default: the folder of ``--json``, else ``outputs/eval-<time>``):

* ``results.json``: exactly ``{"<entry>": {"<PLANE>": {"mae": [6], "std": [6], "n": frames}}}``
  (top-level keys are entry names only; ``--json FILE`` writes the same content there too),
* ``details.json``: everything else (units, split, cache, baseline entry, relative changes,
  the train-mean row, all-plane summaries, held-out check, Fig. 3 curves, timings),
* ``table.md``, ``table.csv`` (columns ``plane, model, n, metric, x, y, z, roll, pitch, yaw``
  with ``metric`` in ``mae``, ``std``, ``rel_change_pct``), ``fig3.png``.

Fig. 3: the error against the size of the remaining motion to the target, one column per
plane: top row translation (x = ``|(x, y, z)|`` of the ground-truth action in mm, y = mean
absolute error of the three translation axes in mm), bottom row rotation (x = geodesic angle of
the ground-truth rotation in deg, y = mean absolute error of roll, pitch, yaw in deg); equal-
width bins up to the 98th percentile, bins with fewer than ``--fig-min-count`` frames left
out; a mean line and a +-1 std band per entry, the train-mean predictor dashed.

Held-out check: the test subjects must not be training subjects of any model. When a model
was trained on the evaluated cache (same manifest sha256) the split decides (``train`` or
``all``: refused; ``val``: a warning, it chose the checkpoint); otherwise the training cache
named in the run's config is read, when it still exists, and its train subjects are compared
by id (overlap: refused). Unverifiable cases print a warning. ``--allow-overlap`` turns
refusals into warnings.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cardiac_copilot_ros.pose import ACTION_AXES, ACTION_UNITS, euler_to_rotation, rotation_angle_deg

#: Column headers of the six axes with units.
AXIS_LABELS = tuple(f"{a} ({u})" for a, u in zip(ACTION_AXES, ACTION_UNITS, strict=True))
#: Name of the always-predict-the-train-mean row.
MEAN_ENTRY = "train mean"


class EvaluationError(RuntimeError):
    """Bad input for an evaluation (models, cache, split, held-out violation)."""


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


@dataclass
class EvalModel:
    """A model to evaluate: a run/checkpoint (eager) or a bundle, behind one call."""

    name: str
    source: Path
    kind: str                           # "run" or "bundle"
    has_dreamer: bool
    input_size: tuple[int, int]
    forward: Callable[..., Any]          # (image float (B,1,H,W) [0,1], plane int64 (B,), refine) -> (B, 6)
    manifest_sha256: str | None = None
    train_data: str | None = None       # the training cache named in the run's config, if known
    info: dict[str, Any] = field(default_factory=dict)
    planes: tuple[str, ...] | None = None  # the model's views (its plane query order); None: the data's
    #: (image, plane) -> (B, 6 * len(entries)): every entry in one forward (eval_pipeline), or None
    multi: Callable[..., Any] | None = None
    #: (image, plane, refine) -> (B, 12) action and Laplace scale b (mm, deg); None without uncertainty
    forward_scale: Callable[..., Any] | None = None
    #: subject ids the model trained / chose its checkpoint on with simulator frames rendered on the fly
    sim_subjects: dict[str, list[str]] = field(default_factory=dict)

    @property
    def entries(self) -> list[str]:
        """Entry names: ``name`` or ``name/policy`` and ``name/dreamer``."""
        return [f"{self.name}/policy", f"{self.name}/dreamer"] if self.has_dreamer else [self.name]


def _default_name(path: Path) -> str:
    if path.is_dir():
        return path.resolve().name
    if path.name == "best.pt" or path.parent.name == "checkpoints":
        run = path.parent if path.name == "best.pt" else path.parent.parent
        return run.resolve().name if path.name == "best.pt" else f"{run.resolve().name}@{path.stem}"
    return path.stem


def _run_config(checkpoint: Path) -> dict[str, Any] | None:
    """config.json of the run folder holding ``checkpoint`` (best.pt or checkpoints/step_*.pt)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text())
            except (OSError, ValueError):
                return None
    return None


def _is_bundle(path: Path) -> bool:
    if path.suffix in (".pt2", ".onnx"):
        return True
    if path.suffix != ".pt" or path.name == "best.pt" or path.parent.name == "checkpoints":
        return False
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("cardiac_copilot.json") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_model(path: str | Path, name: str | None = None, device: str = "cpu",
               sha256: str | None = None) -> EvalModel:
    """A run folder (best.pt), a training checkpoint or a model bundle -> :class:`EvalModel`.

    ``sha256`` pins a bundle or checkpoint file (hex digest); a mismatch is an error.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: no such run folder, checkpoint or bundle")
    name = name or _default_name(path)
    dev = torch.device(device)
    from cardiac_copilot_ros.model.bundle import BundleError, check_sha256, load_bundle

    if sha256:
        if not path.is_file():
            raise EvaluationError(f"{path}: --model-sha256 pins a file; give the checkpoint or bundle file")
        try:
            check_sha256(path, sha256)
        except BundleError as exc:
            raise EvaluationError(str(exc)) from None
    if path.is_file() and _is_bundle(path):
        try:
            bundle = load_bundle(path, device=dev)
        except BundleError as exc:
            raise EvaluationError(str(exc)) from None
        meta = bundle.meta
        train_data = None
        ck = (meta.get("training") or {}).get("checkpoint")
        if ck:
            cfg = _run_config(Path(ck))
            train_data = (cfg or {}).get("data")
        return EvalModel(name=name, source=path, kind="bundle", has_dreamer=bundle.has_dreamer,
                         planes=tuple(bundle.planes),
                         input_size=bundle.input_size, forward=bundle,
                         manifest_sha256=meta.get("data_manifest_sha256"), train_data=train_data,
                         info={"format": bundle.fmt, "backbone": bundle.backbone, "model": meta.get("model"),
                               "training": meta.get("training")}, multi=_bundle_one_pass(bundle, dev),
                         forward_scale=bundle.forward_with_scale if bundle.has_uncertainty else None,
                         sim_subjects=dict((meta.get("training") or {}).get("sim_subjects") or {}))
    from cardiac_copilot_ros.model.checkpoint import load_checkpoint, model_from_checkpoint

    try:
        state = load_checkpoint(path, prefer="best")
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(str(exc)) from None
    model = model_from_checkpoint(state).to(dev)
    cfg = state.get("config") or {}

    def forward(image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        with torch.inference_mode():
            return model(image, plane, bool(refine))

    def forward_scale(image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        with torch.inference_mode():
            return model.forward_with_scale(image, plane, bool(refine))

    h, w = state["input_size"]
    from cardiac_copilot_ros.eval_pipeline import one_pass

    multi = one_pass(model, forward, (int(h), int(w)), int(model.n_planes), dev)
    return EvalModel(name=name, source=path, kind="run", has_dreamer=bool(model.has_dreamer),
                     planes=tuple(model.plane_names),
                     input_size=(int(h), int(w)), forward=forward, multi=multi,
                     forward_scale=forward_scale if getattr(model, "has_uncertainty", False) else None,
                     sim_subjects=dict(state.get("sim_subjects") or {}),
                     manifest_sha256=state.get("data_manifest_sha256"), train_data=cfg.get("data") or None,
                     info={"checkpoint": state["path"], "step": state.get("step"), "model": cfg.get("model"),
                           "preset": cfg.get("preset"), "backbone": state["model_args"].get("backbone"),
                           "best": (state.get("best") or {}).get("val_mae_mean")})


def _bundle_one_pass(bundle: Any, dev: Any) -> Callable[..., Any] | None:
    """eval_pipeline's one-pass function for a TorchScript bundle (its weights in the eager model)."""
    if bundle.fmt != "torchscript":
        return None
    from cardiac_copilot_ros.eval_pipeline import one_pass
    from cardiac_copilot_ros.model.bundle import BundleError
    from cardiac_copilot_ros.model.onnx_bundle import eager_from_torchscript

    try:
        eager = eager_from_torchscript(bundle.module, bundle.meta)
    except (BundleError, KeyError, AttributeError):
        return None
    return one_pass(eager, bundle, bundle.input_size, len(bundle.planes), dev)


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------


def abs_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """|pred - gt| per axis (N, 6); Euler-angle differences wrapped to [0, 180] deg."""
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(gt, np.float64))
    err[:, 3:] = np.abs(np.remainder(err[:, 3:] + 180.0, 360.0) - 180.0)
    return err


def per_plane_stats(err: np.ndarray, plane: np.ndarray, planes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{PLANE: {"mae": [6], "std": [6], "n": frames}}`` for the planes that have frames."""
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(planes):
        e = err[plane == i]
        if len(e):
            out[name] = {"mae": [round(float(v), 4) for v in e.mean(0)],
                         "std": [round(float(v), 4) for v in e.std(0)], "n": len(e)}
    return out


def relative_change(entry: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]
                    ) -> dict[str, list[float | None]]:
    """Per plane and axis ``(mae - mae_baseline) / mae_baseline * 100`` (None where the baseline is 0)."""
    out: dict[str, list[float | None]] = {}
    for plane, st in entry.items():
        if plane not in baseline:
            continue
        out[plane] = [round((m - b) / b * 100.0, 2) if b > 0 else None
                      for m, b in zip(st["mae"], baseline[plane]["mae"], strict=True)]
    return out


def _details_head(**extra_metrics: str) -> dict[str, Any]:
    """The first keys of details.json (format, time, axes, units, what each metric means)."""
    return {"format": "cardiac_copilot_evaluation", "format_version": 1,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "axes": list(ACTION_AXES), "units": list(ACTION_UNITS),
            "metrics": {"mae": "mean absolute error per axis",
                        "std": "standard deviation (ddof 0) of the absolute error",
                        "rel_change_pct": "(mae - mae_baseline) / mae_baseline * 100; negative = better",
                        "angles": "Euler-angle errors wrapped to [0, 180] deg", **extra_metrics}}


def _tables(errors: dict[str, np.ndarray], plane: np.ndarray, planes: Sequence[str], entries: list[str],
            models: Sequence[EvalModel], baseline: str | None
            ) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Per-plane statistics of every entry, the baseline entry (default: the first model without a
    Dreamer) and every other entry's relative change against it."""
    results = {e: per_plane_stats(errors[e], plane, planes) for e in entries}
    if baseline is None:
        baseline = next((m.name for m in models if not m.has_dreamer), models[0].entries[0])
    if baseline not in results:
        raise EvaluationError(f"--baseline {baseline!r} is not one of the entries: {', '.join(entries)}")
    rel = {e: relative_change(results[e], results[baseline]) for e in entries if e != baseline}
    return results, baseline, rel


def motion_size(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size of the remaining motion of ground-truth actions: (translation mm, geodesic angle deg)."""
    a = np.asarray(actions, np.float64)
    return np.linalg.norm(a[:, :3], axis=1), rotation_angle_deg(euler_to_rotation(a[:, 3:]))


def binned_curve(x: np.ndarray, y: np.ndarray, edges: np.ndarray, min_count: int) -> dict[str, list[float]]:
    """Mean and std of ``y`` in the bins of ``x`` holding at least ``min_count`` samples."""
    idx = np.digitize(x, edges[1:-1])
    centers, means, stds, counts = [], [], [], []
    for b in range(len(edges) - 1):
        sel = y[idx == b]
        if len(sel) >= max(1, min_count):
            centers.append(round(float((edges[b] + edges[b + 1]) / 2), 4))
            means.append(round(float(sel.mean()), 4))
            stds.append(round(float(sel.std()), 4))
            counts.append(len(sel))
    return {"center": centers, "mean": means, "std": stds, "n": counts}


def fig3_curves(errors: dict[str, np.ndarray], gt: np.ndarray, plane: np.ndarray, planes: Sequence[str],
                bins: int = 8, min_count: int = 10) -> dict[str, Any]:
    """The data of Fig. 3: per plane, for translation and rotation, bin edges and per-entry curves."""
    dist_mm, angle_deg = motion_size(gt)
    out: dict[str, Any] = {}
    for i, name in enumerate(planes):
        sel = plane == i
        if not sel.any():
            continue
        out[name] = {}
        for part, x, axes in (("translation", dist_mm, slice(0, 3)), ("rotation", angle_deg, slice(3, 6))):
            xs = x[sel]
            hi = float(np.percentile(xs, 98)) if len(xs) else 1.0
            edges = np.linspace(0.0, max(hi, 1e-6), bins + 1)
            curves = {entry: binned_curve(xs, err[sel][:, axes].mean(1), edges, min_count)
                      for entry, err in errors.items()}
            out[name][part] = {"edges": [round(float(v), 4) for v in edges], "curves": curves,
                               "unit": "mm" if part == "translation" else "deg"}
    return out


#: Two-sided probability of the central Laplace intervals reported by :func:`calibration`.
COVERAGE_LEVELS = (0.68, 0.95)


def bootstrap_subjects(errors: dict[str, np.ndarray], subject: np.ndarray, plane: np.ndarray,
                       planes: Sequence[str], reference: str = MEAN_ENTRY, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> dict[str, Any]:
    """MAE per plane (and ``ALL`` planes) and axis with percentile bootstrap CIs over subjects.

    Subjects are resampled with replacement (``n_boot`` times, fixed ``seed``); in each resample the
    MAE is the mean absolute error over all frames of the drawn subjects (a subject drawn twice counts
    twice). The same resamples serve every entry, so ratios and differences are paired.

    Returns ``{"entries": {entry: {plane: {"mae", "lo", "hi", "ratio", "ratio_lo", "ratio_hi"}}},
    "pairs": {"A - B": {plane: {"diff", "lo", "hi"}}}, ...}``, each a list of 6 (mm, deg; ratio =
    MAE / MAE of ``reference``).
    """
    subject = np.asarray(subject)
    subs = np.unique(subject)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(subs), size=(int(n_boot), len(subs)))
    alpha = (1.0 - level) / 2.0
    groups = [(name, plane == i) for i, name in enumerate(planes) if (plane == i).any()]
    groups.append(("ALL", np.ones(len(plane), bool)))
    sums: dict[str, dict[str, np.ndarray]] = {e: {} for e in errors}
    counts: dict[str, np.ndarray] = {}
    sub_idx = np.searchsorted(subs, subject)
    for gname, sel in groups:
        cnt = np.bincount(sub_idx[sel], minlength=len(subs)).astype(np.float64)
        counts[gname] = cnt
        for e, err in errors.items():
            tot = np.zeros((len(subs), 6))
            np.add.at(tot, sub_idx[sel], np.asarray(err, np.float64)[sel])
            sums[e][gname] = tot

    def boot(e: str, g: str) -> tuple[np.ndarray, np.ndarray]:
        c = counts[g][draws].sum(1)[:, None]
        return sums[e][g].sum(0) / max(counts[g].sum(), 1.0), sums[e][g][draws].sum(1) / np.maximum(c, 1.0)

    def q(x: np.ndarray) -> tuple[list[float], list[float]]:
        return ([round(float(v), 4) for v in np.quantile(x, alpha, axis=0)],
                [round(float(v), 4) for v in np.quantile(x, 1 - alpha, axis=0)])

    out: dict[str, Any] = {"method": f"percentile bootstrap over subjects, {int(n_boot)} resamples, seed {seed}",
                           "level": level, "n_subjects": int(len(subs)), "reference": reference,
                           "entries": {}, "pairs": {}}
    cache = {(e, g): boot(e, g) for e in errors for g, _ in groups}
    for e in errors:
        out["entries"][e] = {}
        for g, _ in groups:
            m, b = cache[(e, g)]
            lo, hi = q(b)
            row = {"mae": [round(float(v), 4) for v in m], "lo": lo, "hi": hi}
            if reference in errors:
                mr, br = cache[(reference, g)]
                with np.errstate(divide="ignore", invalid="ignore"):
                    r_lo, r_hi = q(b / br)
                    row.update(ratio=[round(float(v), 4) for v in m / mr], ratio_lo=r_lo, ratio_hi=r_hi)
            out["entries"][e][g] = row
    names = [e for e in errors if e != reference]
    for i, a in enumerate(names):
        for b_name in names[i + 1:]:
            key = f"{a} - {b_name}"
            out["pairs"][key] = {}
            for g, _ in groups:
                ma, ba = cache[(a, g)]
                mb, bb = cache[(b_name, g)]
                lo, hi = q(ba - bb)
                out["pairs"][key][g] = {"diff": [round(float(v), 4) for v in ma - mb], "lo": lo, "hi": hi}
    return out


def calibration(errors: np.ndarray, scale: np.ndarray, levels: Sequence[float] = COVERAGE_LEVELS
                ) -> dict[str, Any]:
    """Coverage of the model's central Laplace intervals ``|error| <= b ln(1 / (1 - p))`` per axis.

    ``errors`` (N, 6) absolute errors, ``scale`` (N, 6) predicted Laplace scales b (same units). A
    calibrated model covers fraction ``p`` of the frames at level ``p`` and has mean b = MAE.
    """
    e = np.asarray(errors, np.float64)
    b = np.asarray(scale, np.float64)
    out: dict[str, Any] = {"n": len(e), "mean_scale": [round(float(v), 4) for v in b.mean(0)],
                           "mae": [round(float(v), 4) for v in e.mean(0)], "coverage": {}}
    for p in levels:
        k = -np.log(1.0 - p)
        out["coverage"][f"{p:.2f}"] = [round(float(v), 4) for v in (e <= k * b).mean(0)]
    return out


# ---------------------------------------------------------------------------------------
# Held-out check
# ---------------------------------------------------------------------------------------


def held_out_check(model: EvalModel, cache_dir: Path, split: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Whether ``split`` of ``cache_dir`` shares subjects with ``model``'s training data.

    Returns ``{"status": "ok"|"overlap"|"warn"|"unknown", "message", "overlap": [subject ids]}``;
    "overlap" means training subjects are evaluated.
    """
    names = _split_subjects(manifest, split)
    sim = sim_held_out_check(model, names)
    if sim is not None and (sim["status"] == "overlap" or not (model.manifest_sha256 or model.train_data)):
        return sim
    if model.manifest_sha256 and model.manifest_sha256 == manifest.get("manifest_sha256"):
        if split in ("train", "all"):
            return {"status": "overlap", "overlap": sorted(set(manifest["splits"]["train"]) & set(names)),
                    "message": f"{model.name} was trained on this cache's train split; split {split!r} "
                               "contains its training subjects"}
        if split == "val":
            return {"status": "warn", "overlap": [],
                    "message": f"{model.name}: the val split chose its checkpoint (best.pt); use --split test "
                               "for held-out numbers"}
        return {"status": "ok", "overlap": [],
                "message": f"{model.name}: trained on this cache, {split} subjects are disjoint from train"}
    if model.train_data:
        from cardiac_copilot_ros.data.dataset import CacheError, load_manifest

        try:
            train_manifest = load_manifest(model.train_data, verify=False)
        except (CacheError, OSError):
            train_manifest = None
        if train_manifest is not None:
            if model.manifest_sha256 and train_manifest.get("manifest_sha256") != model.manifest_sha256:
                return {"status": "unknown", "overlap": [],
                        "message": f"{model.name}: its training cache {model.train_data} has changed since "
                                   "training; cannot verify that the evaluated subjects are held out"}
            trained = set(train_manifest["splits"]["train"]) | set(train_manifest["splits"]["val"])
            overlap = sorted(trained & set(names))
            if overlap:
                return {"status": "overlap", "overlap": overlap,
                        "message": f"{model.name}: {len(overlap)} evaluated subject(s) were in its training "
                                   f"cache's train/val splits ({', '.join(overlap[:5])}"
                                   f"{' ...' if len(overlap) > 5 else ''})"}
            return {"status": "ok", "overlap": [],
                    "message": f"{model.name}: no evaluated subject is in its training cache {model.train_data}"}
    return {"status": "unknown", "overlap": [],
            "message": f"{model.name}: training data unknown or not found (manifest "
                       f"{(model.manifest_sha256 or '?')[:12]}); cannot verify that the evaluated subjects "
                       "are held out"}


def sim_held_out_check(model: EvalModel, names: Sequence[str]) -> dict[str, Any] | None:
    """Overlap of ``names`` with the simulator subjects ``model`` trained or validated on (None: the
    model used no frames rendered on the fly)."""
    if not model.sim_subjects:
        return None
    trained = set(model.sim_subjects.get("train", [])) | set(model.sim_subjects.get("val", []))
    overlap = sorted(trained & set(names))
    if overlap:
        return {"status": "overlap", "overlap": overlap,
                "message": f"{model.name}: {len(overlap)} evaluated subject(s) were among its simulator "
                           f"training/validation subjects ({', '.join(overlap[:5])}"
                           f"{' ...' if len(overlap) > 5 else ''})"}
    return {"status": "ok", "overlap": [],
            "message": f"{model.name}: no evaluated subject is among its {len(trained)} simulator training/"
                       "validation subjects"}


def _split_subjects(manifest: dict[str, Any], split: str) -> list[str]:
    if split == "all":
        return list(manifest["subjects"])
    return list(manifest["splits"][split])


# ---------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything one evaluation produced."""

    results: dict[str, dict[str, dict[str, Any]]]    # the results.json layout
    details: dict[str, Any]
    errors: dict[str, np.ndarray]                     # entry -> (N, 6) absolute errors, incl. MEAN_ENTRY
    gt: np.ndarray                                    # (N, 6)
    plane: np.ndarray                                 # (N,)
    planes: tuple[str, ...]


def _resize(x: Any, size: tuple[int, int]) -> Any:
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0]
    return F.interpolate(x, size=size, mode="area" if shrink else "bilinear",
                         align_corners=None if shrink else False)


def predict(model: EvalModel, images: np.ndarray, plane: np.ndarray, indices: np.ndarray, batch_size: int = 64,
            device: str = "cpu", progress: bool = True) -> dict[str, np.ndarray]:
    """Predictions (N, 6) mm/deg per entry of ``model`` for the frames ``indices`` of the cache arrays."""
    import torch

    dev = torch.device(device)
    modes = [False, True] if model.has_dreamer else [False]
    preds = {e: np.zeros((len(indices), 6), np.float32) for e in model.entries}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), unit="frame", desc=f"evaluate {model.name}", dynamic_ncols=True,
                   file=sys.stderr)
    try:
        with torch.inference_mode():
            for start in range(0, len(indices), batch_size):
                idx = indices[start:start + batch_size]
                x = torch.from_numpy(np.asarray(images[idx], np.uint8)).unsqueeze(1).to(dev).float().div_(255.0)
                x = _resize(x, model.input_size)
                p = torch.from_numpy(np.asarray(plane[idx], np.int64)).to(dev)
                for entry, refine in zip(model.entries, modes, strict=True):
                    preds[entry][start:start + len(idx)] = model.forward(x, p, refine).float().cpu().numpy()
                if bar is not None:
                    bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return preds


def model_planes(model: EvalModel, planes: Sequence[str], plane_all: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """The cache's plane column in ``model``'s plane-query order (views matched by name).

    :class:`EvaluationError` when frames of the evaluated split show a view the model lacks.
    """
    if model.planes is None or tuple(model.planes) == tuple(planes):
        return plane_all
    from cardiac_copilot_ros.planes import match_view

    lut = np.full(len(planes), -1, np.int64)
    for i, name in enumerate(planes):
        try:
            lut[i] = list(model.planes).index(match_view(name, model.planes))
        except ValueError:
            pass
    missing = [planes[i] for i in np.unique(plane) if lut[i] < 0]
    if missing:
        raise EvaluationError(f"{model.name} was trained on the views {', '.join(model.planes)}; the data's frames "
                              f"also show {', '.join(missing)} (evaluate on a cache of its views)")
    return np.maximum(lut[np.asarray(plane_all, np.int64)], 0)


def evaluate(models: Sequence[EvalModel], cache_dir: str | Path, split: str = "test", batch_size: int = 64,
             device: str = "cpu", baseline: str | None = None, allow_overlap: bool = False,
             fig_bins: int = 8, fig_min_count: int = 10, progress: bool = True,
             log: Callable[[str], None] = print) -> EvalResult:
    """Evaluate ``models`` on ``split`` of the cache; raises :class:`EvaluationError` on bad input."""
    from cardiac_copilot_ros.data.dataset import CacheError, load_manifest, split_indices

    cache_dir = Path(cache_dir)
    if not models:
        raise EvaluationError("no model to evaluate")
    try:
        manifest = load_manifest(cache_dir)
    except CacheError as exc:
        raise EvaluationError(str(exc)) from None
    if split not in ("train", "val", "test", "all"):
        raise EvaluationError(f"unknown split {split!r}; choose test, val, train or all")
    planes = tuple(manifest["planes"])
    entries = [e for m in models for e in m.entries]
    if len(set(entries)) != len(entries):
        raise EvaluationError(f"duplicate model names {entries}; pass --names")
    checks = []
    for m in models:
        chk = held_out_check(m, cache_dir, split, manifest)
        checks.append({"model": m.name, **chk})
        if chk["status"] == "overlap":
            if not allow_overlap:
                raise EvaluationError(f"not held out: {chk['message']}. Evaluate on --split test, or pass "
                                      "--allow-overlap to evaluate anyway")
            log(f"warning: not held out: {chk['message']}")
        elif chk["status"] in ("warn", "unknown"):
            log(f"warning: {chk['message']}")
    indices = split_indices(cache_dir, split, manifest)
    if len(indices) == 0:
        raise EvaluationError(f"{cache_dir}: the {split} split has no frames")
    images = np.load(cache_dir / "images.npy", mmap_mode="r")
    gt = np.asarray(np.load(cache_dir / "actions.npy", mmap_mode="r")[indices], np.float64)
    plane_all = np.load(cache_dir / "plane.npy", mmap_mode="r")
    plane = np.asarray(plane_all[indices], np.int64)

    errors: dict[str, np.ndarray] = {}
    from cardiac_copilot_ros.eval_pipeline import predict_models

    plane_for = {m.name: model_planes(m, planes, plane_all, plane) for m in models}
    preds, seconds, wall_s = predict_models(models, images, plane_all, indices, batch_size, device, progress,
                                            plane_for=plane_for)
    timings = {name: round(v, 3) for name, v in seconds.items()}
    for entry, pred in preds.items():
        if not np.isfinite(pred).all():
            raise EvaluationError(f"{entry}: non-finite predictions")
        errors[entry] = abs_errors(pred, gt)
    mean_action = np.asarray(manifest["action_stats"]["mean"], np.float64)
    errors[MEAN_ENTRY] = abs_errors(np.broadcast_to(mean_action, gt.shape), gt)

    results, baseline, rel = _tables(errors, plane, planes, entries, models, baseline)
    every = np.zeros(len(plane), np.int64)
    details: dict[str, Any] = {
        **_details_head(),
        "cache": str(cache_dir), "manifest_sha256": manifest.get("manifest_sha256"), "split": split,
        "split_subjects": _split_subjects(manifest, split), "n_frames": len(indices),
        "n_frames_per_plane": {p: int((plane == i).sum()) for i, p in enumerate(planes) if (plane == i).any()},
        "entries": entries, "baseline": baseline, "relative_change_pct": rel,
        "train_mean": {"action": [round(float(v), 4) for v in mean_action],
                       "per_plane": per_plane_stats(errors[MEAN_ENTRY], plane, planes)},
        "all_planes": {e: per_plane_stats(errors[e], every, ["ALL"])["ALL"] for e in [*entries, MEAN_ENTRY]},
        "models": [{"name": m.name, "source": str(m.source), "kind": m.kind, "has_dreamer": m.has_dreamer,
                    "entries": m.entries, "input_size": list(m.input_size),
                    "data_manifest_sha256": m.manifest_sha256, "train_data": m.train_data, **m.info,
                    "seconds": timings[m.name], "one_pass": m.multi is not None,
                    "frames_per_s": round(len(indices) / max(timings[m.name], 1e-9), 1)} for m in models],
        "frames_per_s": round(len(indices) * len(models) / max(wall_s, 1e-9), 1),
        "predict_seconds": round(wall_s, 3),
        "held_out": checks, "device": device,
        "fig3": {"x": {"translation": "|(x, y, z)| of the ground-truth action (mm)",
                       "rotation": "geodesic angle of the ground-truth rotation (deg)"},
                 "y": {"translation": "mean |error| of x, y, z (mm)", "rotation": "mean |error| of roll, pitch, "
                       "yaw (deg)"}, "bins": fig_bins, "min_count": fig_min_count,
                 "planes": fig3_curves(errors, gt, plane, planes, fig_bins, fig_min_count)},
    }
    return EvalResult(results=results, details=details, errors=errors, gt=gt, plane=plane, planes=planes)


# ---------------------------------------------------------------------------------------
# The approach set: frames over the closed loop's whole start range, held-out subjects
# ---------------------------------------------------------------------------------------

#: Approach-set defaults: held-out split, subjects, frames per subject and plane, generator seed.
APPROACH_DEFAULTS = {"split": "test", "subjects": 24, "frames_per_plane": 40, "seed": 12}
#: Training subjects and frames per plane whose label mean is the approach set's "train mean" predictor.
APPROACH_MEAN_SUBJECTS = 200


def predict_scales(model: EvalModel, images: np.ndarray, plane: np.ndarray, indices: np.ndarray,
                   batch_size: int = 64, device: str = "cpu") -> np.ndarray | None:
    """The policy's Laplace scales b (N, 6) mm/deg (None for a model without uncertainty)."""
    if model.forward_scale is None:
        return None
    import torch

    dev = torch.device(device)
    out = np.zeros((len(indices), 6), np.float32)
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            x = torch.from_numpy(np.asarray(images[idx], np.uint8)).unsqueeze(1).to(dev).float().div_(255.0)
            x = _resize(x, model.input_size)
            p = torch.from_numpy(np.asarray(plane[idx], np.int64)).to(dev)
            out[start:start + len(idx)] = model.forward_scale(x, p, False)[:, 6:].float().cpu().numpy()
    return out


def evaluate_approach(models: Sequence[EvalModel], split: str = "test", n_subjects: int = 24,
                      frames_per_plane: int = 40, seed: int = 12, batch_size: int = 64, device: str = "cpu",
                      baseline: str | None = None, allow_overlap: bool = False, fig_bins: int = 8,
                      fig_min_count: int = 10, n_boot: int = 2000, progress: bool = True,
                      log: Callable[[str], None] = print, max_offset_mm: float = 40.0,
                      max_offset_deg: float = 40.0) -> EvalResult:
    """Evaluate ``models`` on the held-out approach set (:func:`~.data.approach.make_approach_set`).

    ``max_offset_mm`` / ``max_offset_deg``: the range the poses are drawn from (the closed loop's
    start range by default; e.g. 15 / 15 for a fine-stage model, preset ``fine``).

    The set is rendered at 224 px (as scanner_sim_node publishes) on the ``split`` subjects
    (:data:`~.data.approach.SPLIT_SEEDS`), deterministically from ``seed``. The train-mean row
    always predicts the mean label of the same recipe on the first :data:`APPROACH_MEAN_SUBJECTS`
    train subjects. ``details`` adds ``bootstrap`` (:func:`bootstrap_subjects`: MAE, ratio to the
    train-mean row and every pairwise difference, with 95 % CIs over subjects) and ``calibration``
    (:func:`calibration`, models with an uncertainty head).
    """
    from cardiac_copilot_ros.data.approach import approach_label_mean, make_approach_set, split_seeds, subject_ids

    if not models:
        raise EvaluationError("no model to evaluate")
    if split not in ("val", "test"):
        raise EvaluationError(f"approach split must be val or test, got {split!r}")
    entries = [e for m in models for e in m.entries]
    if len(set(entries)) != len(entries):
        raise EvaluationError(f"duplicate model names {entries}; pass --names")
    sizes = {m.input_size for m in models}
    seeds = split_seeds(split, n_subjects)
    names = subject_ids(seeds)
    checks = []
    for m in models:
        chk = sim_held_out_check(m, names) or {
            "status": "unknown", "overlap": [],
            "message": f"{m.name}: its training subjects are not recorded in the model; cannot verify that "
                       f"the approach {split} subjects ({names[0]}..{names[-1]}) are held out"}
        checks.append({"model": m.name, **chk})
        if chk["status"] == "overlap":
            if not allow_overlap:
                raise EvaluationError(f"not held out: {chk['message']}; pass --allow-overlap to evaluate anyway")
            log(f"warning: not held out: {chk['message']}")
        elif chk["status"] != "ok":
            log(f"warning: {chk['message']}")
    # one rendering per input size (the runtime's area resize from 224 px)
    if not (0 < max_offset_mm <= 100 and 0 < max_offset_deg <= 90):
        raise EvaluationError("approach range: max offset must be in (0, 100] mm and (0, 90] deg")
    sets = {hw: make_approach_set(seeds, frames_per_plane, image_size=hw[0], render_size=224, seed=seed,
                                  max_offset_mm=max_offset_mm, max_offset_deg=max_offset_deg,
                                  progress=progress) for hw in sizes if hw[0] == hw[1]}
    if len(sets) != len(sizes):
        raise EvaluationError("approach set: non-square model inputs are not supported")
    first = next(iter(sets.values()))
    gt = np.asarray(first.actions, np.float64)
    plane = first.plane
    subject = first.subject
    indices = np.arange(len(gt))
    planes = tuple(first.meta["planes"])
    errors: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    calib: dict[str, Any] = {}
    for m in models:
        aset = sets[m.input_size]
        t0 = time.perf_counter()
        own_plane = model_planes(m, planes, aset.plane, aset.plane)  # the model's view order
        preds = predict(m, aset.images, own_plane, indices, batch_size, device, progress)
        for entry, pred in preds.items():
            if not np.isfinite(pred).all():
                raise EvaluationError(f"{entry}: non-finite predictions")
            errors[entry] = abs_errors(pred, gt)
        scales = predict_scales(m, aset.images, own_plane, indices, batch_size, device)
        if scales is not None:
            for entry in m.entries:
                calib[entry] = {"ALL": calibration(errors[entry], scales),
                                **{p: calibration(errors[entry][plane == i], scales[plane == i])
                                   for i, p in enumerate(planes) if (plane == i).any()}}
        timings[m.name] = round(time.perf_counter() - t0, 3)
    mean_action = approach_label_mean(split_seeds("train", APPROACH_MEAN_SUBJECTS), frames_per_plane, seed,
                                      max_offset_mm=max_offset_mm, max_offset_deg=max_offset_deg)
    errors[MEAN_ENTRY] = abs_errors(np.broadcast_to(mean_action, gt.shape), gt)
    results, baseline, rel = _tables(errors, plane, planes, entries, models, baseline)
    every = np.zeros(len(plane), np.int64)
    details: dict[str, Any] = {
        **_details_head(ratio="MAE / MAE of the train-mean predictor (bootstrap)",
                        coverage="fraction of frames inside the model's central Laplace interval"),
        "cache": None, "manifest_sha256": None, "split": f"approach-{split}", "approach": first.meta,
        "split_subjects": names, "n_frames": len(gt),
        "n_frames_per_plane": {p: int((plane == i).sum()) for i, p in enumerate(planes) if (plane == i).any()},
        "n_frames_per_source": {str(k): int(v) for k, v in zip(*np.unique(first.source, return_counts=True),
                                                              strict=True)},
        "entries": entries, "baseline": baseline, "relative_change_pct": rel,
        "train_mean": {"action": [round(float(v), 4) for v in mean_action],
                       "per_plane": per_plane_stats(errors[MEAN_ENTRY], plane, planes),
                       "from": f"label mean of the same recipe on train subjects {SPLIT_TRAIN_NOTE}"},
        "all_planes": {e: per_plane_stats(errors[e], every, ["ALL"])["ALL"] for e in [*entries, MEAN_ENTRY]},
        "models": [{"name": m.name, "source": str(m.source), "kind": m.kind, "has_dreamer": m.has_dreamer,
                    "has_uncertainty": m.forward_scale is not None, "entries": m.entries,
                    "input_size": list(m.input_size), "data_manifest_sha256": m.manifest_sha256,
                    "train_data": m.train_data, **m.info, "seconds": timings[m.name]} for m in models],
        "held_out": checks, "device": device,
        "bootstrap": bootstrap_subjects(errors, subject, plane, planes, MEAN_ENTRY, n_boot=n_boot),
        "calibration": calib,
        "fig3": {"x": {"translation": "|(x, y, z)| of the ground-truth action (mm)",
                       "rotation": "geodesic angle of the ground-truth rotation (deg)"},
                 "y": {"translation": "mean |error| of x, y, z (mm)", "rotation": "mean |error| of roll, pitch, "
                       "yaw (deg)"}, "bins": fig_bins, "min_count": fig_min_count,
                 "planes": fig3_curves(errors, gt, plane, planes, fig_bins, fig_min_count)},
    }
    return EvalResult(results=results, details=details, errors=errors, gt=gt, plane=plane, planes=planes)


SPLIT_TRAIN_NOTE = f"(the first {APPROACH_MEAN_SUBJECTS} of data.approach's train seeds)"


def format_ci_markdown(res: EvalResult) -> str:
    """MAE [95 % CI], ratio to the train mean [CI], pairwise differences [CI] and calibration."""
    d = res.details
    boot = d.get("bootstrap")
    if not boot:
        return ""
    lines = [f"MAE [95 % CI] and ratio to the train-mean predictor [95 % CI]; {boot['method']}, "
             f"{boot['n_subjects']} subjects.", "",
             f"| plane | model | {' | '.join(AXIS_LABELS)} |", "|---|---|" + "---|" * 6]
    groups = [*d["n_frames_per_plane"], "ALL"]
    for g in groups:
        for e, per in boot["entries"].items():
            r = per[g]
            cells = [f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in zip(r["mae"], r["lo"], r["hi"], strict=True)]
            lines.append(f"| {g} | {e} | {' | '.join(cells)} |")
            if "ratio" in r and e != boot["reference"]:
                cells = [f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in
                         zip(r["ratio"], r["ratio_lo"], r["ratio_hi"], strict=True)]
                lines.append(f"| {g} | *ratio {e} / {boot['reference']}* | {' | '.join(cells)} |")
    if boot["pairs"]:
        lines += ["", "Differences of MAE between models (first minus second; an interval that excludes 0 is a "
                  "difference beyond the subject-to-subject noise):", "",
                  f"| plane | pair | {' | '.join(AXIS_LABELS)} |", "|---|---|" + "---|" * 6]
        for g in groups:
            for key, per in boot["pairs"].items():
                r = per[g]
                cells = [f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for m, lo, hi in
                         zip(r["diff"], r["lo"], r["hi"], strict=True)]
                lines.append(f"| {g} | {key} | {' | '.join(cells)} |")
    if d.get("calibration"):
        lines += ["", "Calibration of the predicted Laplace scale b (all planes): coverage of the central 68 % / "
                  "95 % intervals (|error| <= 1.14 b / 3.00 b), mean b against the MAE:", "",
                  f"| model | quantity | {' | '.join(AXIS_LABELS)} |", "|---|---|" + "---|" * 6]
        for e, per in d["calibration"].items():
            c = per["ALL"]
            for lvl, cov in c["coverage"].items():
                lines.append(f"| {e} | coverage of the {float(lvl) * 100:.0f} % interval | "
                             f"{' | '.join(f'{v * 100:.0f} %' for v in cov)} |")
            pairs = (f"{b:.2f} / {m:.2f}" for b, m in zip(c["mean_scale"], c["mae"], strict=True))
            lines.append(f"| {e} | mean b / MAE | {' | '.join(pairs)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Tables and the figure
# ---------------------------------------------------------------------------------------


def _rows(res: EvalResult) -> list[tuple[str, str, int, str, list[float | None]]]:
    """(plane, model, n, metric, 6 values) in table order."""
    rows = []
    d = res.details
    for plane in d["n_frames_per_plane"]:
        n = d["n_frames_per_plane"][plane]
        st = d["train_mean"]["per_plane"][plane]
        rows += [(plane, MEAN_ENTRY, n, "mae", st["mae"]), (plane, MEAN_ENTRY, n, "std", st["std"])]
        for entry in d["entries"]:
            st = res.results[entry][plane]
            rows += [(plane, entry, n, "mae", st["mae"]), (plane, entry, n, "std", st["std"])]
        for entry, rel in d["relative_change_pct"].items():
            if plane in rel:
                rows.append((plane, f"{entry} vs {d['baseline']}", n, "rel_change_pct", rel[plane]))
    return rows


def format_markdown(res: EvalResult) -> str:
    """Table 1 as Markdown: MAE +- std per plane and axis, and the relative change in %."""
    d = res.details
    lines = [f"| plane | model | n | {' | '.join(AXIS_LABELS)} |", "|---|---|---|" + "---|" * 6]
    by_key: dict[tuple[str, str], dict[str, list[float | None]]] = {}
    order: list[tuple[str, str, int]] = []
    for plane, model, n, metric, vals in _rows(res):
        if (plane, model) not in by_key:
            order.append((plane, model, n))
        by_key.setdefault((plane, model), {})[metric] = vals
    for plane, model, n in order:
        m = by_key[(plane, model)]
        if "rel_change_pct" in m:
            cells = ["n/a" if v is None else f"{v:+.1f} %" for v in m["rel_change_pct"]]
            lines.append(f"| {plane} | *change: {model}* | | {' | '.join(cells)} |")
        else:
            cells = [f"{a:.2f} ± {s:.2f}" for a, s in zip(m["mae"], m["std"], strict=True)]
            name = f"**{model}**" if model.endswith("/dreamer") else model
            lines.append(f"| {plane} | {name} | {n} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"MAE ± std of the absolute error on the {d['split']} split ({d['n_frames']} frames, subjects "
                 f"{', '.join(d['split_subjects'][:8])}{' ...' if len(d['split_subjects']) > 8 else ''}); "
                 f"change = (MAE - MAE of {d['baseline']}) / MAE of {d['baseline']}, negative = lower error; "
                 f"'{MEAN_ENTRY}' always predicts the train split's mean action.")
    return "\n".join(lines) + "\n"


def format_text(res: EvalResult) -> str:
    """Table 1 for the terminal."""
    header = ["plane", "model", "n", *AXIS_LABELS]
    rows = []
    for plane, model, n, metric, vals in _rows(res):
        if metric == "std":
            continue
        if metric == "rel_change_pct":
            rows.append([plane, f"  change {model.split(' vs ')[0]}", "",
                         *["n/a" if v is None else f"{v:+.1f}%" for v in vals]])
        else:
            std = res.details["train_mean"]["per_plane"][plane]["std"] if model == MEAN_ENTRY \
                else res.results[model][plane]["std"]
            rows.append([plane, model, str(n), *[f"{a:.2f}±{s:.2f}" for a, s in zip(vals, std, strict=True)]])
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if k < 2 else c.rjust(w)  # noqa: E731
                              for k, (c, w) in enumerate(zip(r, widths, strict=True)))
    out = [fmt(header), fmt(["-" * w for w in widths])]
    last = None
    for r in rows:
        if last is not None and r[0] != last:
            out.append("")
        out.append(fmt(r))
        last = r[0]
    return "\n".join(out)


def write_csv(res: EvalResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["plane", "model", "n", "metric", *ACTION_AXES])
        for plane, model, n, metric, vals in _rows(res):
            w.writerow([plane, model, n, metric, *["" if v is None else v for v in vals]])


def plot_fig3(res: EvalResult, path: Path, title: str | None = None) -> Path:
    """Fig. 3 as PNG: error vs remaining motion, per plane (columns), translation / rotation (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig3 = res.details["fig3"]["planes"]
    planes = list(fig3)
    fig, axes = plt.subplots(2, max(1, len(planes)), figsize=(4.2 * max(1, len(planes)), 7.0), squeeze=False)
    entries = res.details["entries"]
    colors = plt.get_cmap("tab10")
    for c, plane in enumerate(planes):
        for r, part in enumerate(("translation", "rotation")):
            ax = axes[r][c]
            data = fig3[plane][part]
            unit = data["unit"]
            drawn = False
            for k, entry in enumerate([*entries, MEAN_ENTRY]):
                cur = data["curves"][entry]
                if not cur["center"]:
                    continue
                x, m, s = (np.asarray(cur[key]) for key in ("center", "mean", "std"))
                if entry == MEAN_ENTRY:
                    ax.plot(x, m, "--", color="0.5", lw=1.2, label=MEAN_ENTRY)
                    continue
                color = colors(k % 10)
                ax.plot(x, m, "-o", color=color, lw=1.8, ms=3, label=entry)
                ax.fill_between(x, np.maximum(m - s, 0), m + s, color=color, alpha=0.15, lw=0)
                drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "too few frames per bin", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(f"{'distance' if part == 'translation' else 'angle'} to the target ({unit})")
            ax.set_ylabel(f"mean abs. {part} error ({unit})")
            ax.set_title(f"{plane}: {part}")
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=8)
    fig.suptitle(title or f"Error vs. remaining motion ({res.details['split']} split, "
                          f"{res.details['n_frames']} frames; mean ± std per bin)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(res: EvalResult, out: Path, json_path: Path | None = None, title: str | None = None
                  ) -> dict[str, Path]:
    """results.json (+ ``json_path``), details.json, table.md, table.csv, fig3.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "details": out / "details.json", "table_md": out / "table.md",
             "table_csv": out / "table.csv", "fig3": out / "fig3.png"}
    text = json.dumps(res.results, indent=2) + "\n"
    paths["results"].write_text(text)
    if json_path is not None and json_path.resolve() != paths["results"].resolve():
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
        paths["json"] = json_path
    paths["details"].write_text(json.dumps(res.details, indent=2) + "\n")
    paths["table_md"].write_text(format_markdown(res))
    if res.details.get("bootstrap"):
        paths["table_ci_md"] = out / "table_ci.md"
        paths["table_ci_md"].write_text(format_ci_markdown(res))
    write_csv(res, paths["table_csv"])
    plot_fig3(res, paths["fig3"], title)
    return paths


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="RUN_OR_BUNDLE",
                        help="run folders (best.pt), training checkpoints, or bundles (.pt, .pt2)")
    parser.add_argument("--data", default=None, type=Path, metavar="DIR",
                        help="training cache to evaluate on (its --split); optional with --approach")
    parser.add_argument("--split", default="test", choices=("test", "val", "train", "all"),
                        help="split of the cache (default test: subjects held out from training)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help='also write {"<model>": {"<PLANE>": {"mae": [6], "std": [6], "n": N}}} here')
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: --json's folder, else outputs/eval-<time>)")
    parser.add_argument("--names", nargs="+", default=None, metavar="NAME", help="model names (one per model)")
    parser.add_argument("--model-sha256", nargs="+", default=None, metavar="HEX",
                        help="SHA-256 digests that pin the model files, one per model ('-' = not pinned)")
    parser.add_argument("--baseline", default=None, metavar="ENTRY",
                        help="entry the relative change is computed against (default: the first model without "
                             "a Dreamer, else the policy mode <name>/policy of the first model)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default torch's; 1 is faster on a small shared machine)")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="evaluate even when the split contains a model's training subjects (warn only)")
    parser.add_argument("--fig-bins", type=int, default=8, metavar="N", help="bins per Fig. 3 panel (8)")
    parser.add_argument("--fig-min-count", type=int, default=10, metavar="N",
                        help="leave out Fig. 3 bins with fewer frames (10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("approach set (frames over the closed loop's whole start range, rendered "
                                  "deterministically on held-out simulator subjects; written to OUT/approach/)")
    g.add_argument("--approach", nargs="?", const=APPROACH_DEFAULTS["split"], choices=("test", "val"), default=None,
                   help="also evaluate on the approach set of these subjects (test: seeds 9000.., val: 8000..; "
                        "default test)")
    g.add_argument("--approach-subjects", type=int, default=APPROACH_DEFAULTS["subjects"], metavar="N",
                   help=f"subjects (default {APPROACH_DEFAULTS['subjects']})")
    g.add_argument("--approach-frames", type=int, default=APPROACH_DEFAULTS["frames_per_plane"], metavar="N",
                   help=f"frames per subject and plane (default {APPROACH_DEFAULTS['frames_per_plane']})")
    g.add_argument("--approach-seed", type=int, default=APPROACH_DEFAULTS["seed"], metavar="S",
                   help=f"generator seed of the set (default {APPROACH_DEFAULTS['seed']})")
    g.add_argument("--approach-max-offset-mm", type=float, default=40.0, metavar="MM",
                   help="range of the poses: +-MM in x, y, a fifth in z (default 40: the closed loop's start range; "
                        "15 for a fine-stage model)")
    g.add_argument("--approach-max-offset-deg", type=float, default=40.0, metavar="DEG",
                   help="range of the poses: +-DEG per angle (default 40)")
    g.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (2000)")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"--device {name}: CUDA is not available")
    return name


def run(args: argparse.Namespace) -> int:
    try:
        if args.data is None and args.approach is None:
            raise EvaluationError("give --data CACHE (its --split) and/or --approach [test|val]")
        if args.names is not None and len(args.names) != len(args.models):
            raise EvaluationError(f"--names gives {len(args.names)} names for {len(args.models)} models")
        if args.batch_size < 1 or args.fig_bins < 1:
            raise EvaluationError("--batch-size and --fig-bins must be >= 1")
        if args.approach is not None and (args.approach_subjects < 2 or args.approach_frames < 1
                                          or args.bootstrap < 100):
            raise EvaluationError("--approach-subjects must be >= 2, --approach-frames >= 1, --bootstrap >= 100")
        device = resolve_device(args.device)
        if args.threads is not None:
            import torch

            torch.set_num_threads(max(1, args.threads))
        names = args.names or [None] * len(args.models)
        pins = args.model_sha256 or [None] * len(args.models)
        if len(pins) != len(args.models):
            raise EvaluationError(f"--model-sha256 gives {len(pins)} digests for {len(args.models)} models")
        pins = [None if p in ("", "-") else p for p in pins]
        models = [load_model(p, n, device, sha) for p, n, sha in zip(args.models, names, pins, strict=True)]
        log = lambda s: print(s, file=sys.stderr)  # noqa: E731
        res = None
        if args.data is not None:
            res = evaluate(models, args.data, args.split, batch_size=args.batch_size, device=device,
                           baseline=args.baseline, allow_overlap=args.allow_overlap, fig_bins=args.fig_bins,
                           fig_min_count=args.fig_min_count, progress=not args.no_progress, log=log)
        res_a = None
        if args.approach is not None:
            res_a = evaluate_approach(models, args.approach, args.approach_subjects, args.approach_frames,
                                      args.approach_seed, batch_size=args.batch_size, device=device,
                                      baseline=args.baseline, allow_overlap=args.allow_overlap,
                                      fig_bins=args.fig_bins, fig_min_count=args.fig_min_count,
                                      n_boot=args.bootstrap, progress=not args.no_progress, log=log,
                                      max_offset_mm=args.approach_max_offset_mm,
                                      max_offset_deg=args.approach_max_offset_deg)
    except EvaluationError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    out = args.out or (args.json.parent if args.json else Path("outputs") / f"eval-{_dt.datetime.now():%Y%m%d_%H%M%S}")
    written: list[Path] = []
    if res is not None:
        written += write_outputs(res, out, args.json).values()
        print(format_text(res))
    if res_a is not None:
        written += write_outputs(res_a, out / "approach" if res is not None else out,
                                 args.json if res is None else None,
                                 title=f"Approach set ({res_a.details['split']}, {res_a.details['n_frames']} frames)"
                                 ).values()
        print(("\n" if res is not None else "") + f"approach set ({res_a.details['split']}):")
        print(format_text(res_a))
        print("\n" + format_ci_markdown(res_a))
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0
