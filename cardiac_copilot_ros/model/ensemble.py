"""Ensembles of guidance models: one bundle whose output is the mean of K members.

``cardiac-copilot export A B [C ...] --out FILE.pt`` (each a run folder, checkpoint or TorchScript
bundle) writes one TorchScript bundle that runs every member on the frame and returns:

* ``forward``: the mean of the members' actions (mm, deg);
* ``forward_with_scale`` (when every member has uncertainty): the mean action and, per axis, the
  Laplace scale of the mixture: a Laplace of scale b has variance 2 b^2, so the mixture's variance is
  ``mean(2 b_k^2) + var_k(a_k)`` and its scale ``sqrt(mean(b_k^2) + var_k(a_k) / 2)``: the members'
  own expected error plus their disagreement.

Everything downstream (runtime, guidance_node, rollouts, benches, ONNX conversion) takes the file
like any other bundle. Members must agree on views, input size and image normalisation. The
metadata key ``ensemble`` lists the members (source, sha256 where a file, backbone, training).

Cost: K times the model time per frame and K times the file (fp16 weights: about 14 MB per
ResNet-10). docs/BENCHMARK.md has the measured effect of a two-member fine stage.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cardiac_copilot_ros import code_version
from cardiac_copilot_ros.model.bundle import BundleError, file_sha256

#: Metadata that must be equal across members (what the frame and the output mean).
COMPATIBLE_KEYS = ("planes", "input_size", "input", "action_axes", "action_units", "euler_axes")


def mixture_scale(actions: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-axis Laplace scale of the equal mixture of K Laplace distributions (K, ..., 6) -> (..., 6)."""
    return torch.sqrt((scales * scales).mean(0) + 0.5 * actions.var(0, unbiased=False))


class GuidanceEnsemble(nn.Module):
    """Mean of K :class:`~.policy.GuidanceModel` (or compatible) members; the bundle contract of one."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.has_dreamer = all(bool(getattr(m, "has_dreamer", False)) for m in members)
        self.has_uncertainty = all(bool(getattr(m, "has_uncertainty", False)) for m in members)
        self.n_planes = int(getattr(members[0], "n_planes", 3))

    def forward(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        refine = refine and self.has_dreamer   # every member refines, or none
        actions: list[torch.Tensor] = []
        for member in self.members:
            actions.append(member(image, plane, refine))
        return torch.stack(actions, 0).mean(0)

    @torch.jit.export
    def forward_with_scale(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        """(B, 12): the mean action (mm, deg) and the mixture's per-axis Laplace scale (mm, deg)."""
        refine = refine and self.has_dreamer
        outs: list[torch.Tensor] = []
        for member in self.members:
            outs.append(member.forward_with_scale(image, plane, refine))
        stacked = torch.stack(outs, 0)   # (K, B, 12)
        actions = stacked[:, :, :6]
        return torch.cat([actions.mean(0), mixture_scale(actions, stacked[:, :, 6:])], dim=1)


def _member(source: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(eager model in inference form, its bundle metadata, its entry in ``ensemble.members``)."""
    from cardiac_copilot_ros.model.onnx_bundle import _source_model

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder, checkpoint or bundle")
    model, meta, _, _ = _source_model(path)   # a TorchScript bundle, a run folder or a checkpoint
    if meta.get("ensemble"):
        raise BundleError(f"{path}: already an ensemble; list its members instead")
    head = getattr(model, "head", None)
    if head is not None and not head.folded:
        head.fold_plane_query()   # exact; the form bundles store
    entry = {"source": str(path), "sha256": file_sha256(path) if path.is_file() else None}
    entry.update({k: meta.get(k) for k in ("backbone", "has_dreamer", "has_uncertainty", "training", "created")})
    entry["weights_dtype"] = meta.get("weights_dtype", "float32")
    return model.eval(), meta, entry


def build_ensemble(sources: Sequence[str | Path]) -> tuple[GuidanceEnsemble, dict[str, Any]]:
    """The eager ensemble of ``sources`` (run folders, checkpoints or TorchScript bundles) and its bundle
    metadata; ValueError when they do not fit together (views, input size, normalisation)."""
    if len(sources) < 2:
        raise ValueError("an ensemble needs at least 2 members")
    models, metas, entries = [], [], []
    for s in sources:
        model, meta, entry = _member(s)
        models.append(model)
        metas.append(meta)
        entries.append(entry)
    for key in COMPATIBLE_KEYS:
        values = [m.get(key) for m in metas]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"ensemble members disagree on {key}: " + "; ".join(
                f"{e['source']}: {v!r}" for e, v in zip(entries, values, strict=True)))
    ensemble = GuidanceEnsemble(models).eval()
    backbones = sorted({str(m.get("backbone")) for m in metas})
    meta = {k: v for k, v in metas[0].items() if k not in ("training", "data_manifest_sha256", "weights_dtype")}
    meta.update({
        "backbone": f"ensemble of {len(models)} x {'/'.join(backbones)}",
        "has_dreamer": ensemble.has_dreamer,
        "has_uncertainty": ensemble.has_uncertainty,
        "ensemble": {"members": entries, "combine": "mean action; Laplace scale sqrt(mean(b^2) + var(a) / 2)"},
        "action_mean": [float(v) for v in torch.stack([torch.as_tensor(m["action_mean"]) for m in metas]).mean(0)],
        "action_std": [float(v) for v in torch.stack([torch.as_tensor(m["action_std"]) for m in metas]).mean(0)],
        "data_manifest_sha256": None,
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return ensemble, meta


__all__ = ["COMPATIBLE_KEYS", "GuidanceEnsemble", "build_ensemble", "mixture_scale"]
