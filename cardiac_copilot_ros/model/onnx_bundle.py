"""ONNX model bundles: the guidance model as one ``.onnx`` file for ONNX Runtime.

``cardiac-copilot export RUN_OR_BUNDLE [...] --format onnx --out FILE.onnx`` (see :func:`export_onnx_bundle`).

The graph (one graph for policy and Dreamer):

* inputs ``image`` float32 (B, 1, H, W) in [0, 1], ``plane`` int64 (B,), ``refine`` bool scalar
  (0-d tensor; an ONNX ``If`` keeps both branches: False = the policy alone, True = with the
  Dreamer refinement; ignored by models without a Dreamer); B is dynamic.
* output ``action`` float32 (B, 6) in mm/deg (the TorchScript bundle's ``forward``), or, when the
  bundle metadata has ``"has_uncertainty": true``, ``action_scale`` float32 (B, 12): the bundle's
  ``forward_with_scale`` (columns 0..5 the action, 6..11 the per-axis Laplace scale b, mm/deg).
* the bundle metadata JSON (the same as the TorchScript bundle's) in the model's
  ``metadata_props`` under the key ``cardiac_copilot.json``.

Exported with the torch.export-based ONNX exporter (``torch.onnx.export(dynamo=True)``, needs
``onnxscript``); the legacy TorchScript-based exporter cannot express the Dreamer's adaptive
pooling. A TorchScript bundle is converted by rebuilding the eager model from its weights and
checking the ONNX outputs against the TorchScript module itself.

Security: an ONNX file is a protobuf of operators and tensors; it holds no code to run. Loading
(:func:`load_onnx`) parses the bytes in memory and refuses tensors stored in other files
(external data: a path inside the model could read any file) and operators outside the standard
ONNX domain (custom ops would need native code registered by the caller); ``sha256`` pins the file.

Needs the optional packages of the ``onnx`` extra (``requirements/onnx.txt``): onnx and onnxruntime to
load, onnxscript as well to export. Training does not need them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cardiac_copilot_ros.model.bundle import (
    MAX_META_BYTES,
    META_FILE,
    BundleError,
    check_sha256,
    quiet_torch_deprecations,
    validate_metadata,
)

#: ONNX opset the exporter targets.
OPSET = 18
#: Key of the bundle metadata JSON in the model's metadata_props.
META_KEY = META_FILE
#: Agreement required between the ONNX graph and the model it came from (mm, deg).
TOLERANCE = 1e-3
#: Operator domains a bundle may use (the standard ONNX operator set).
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
INPUT_NAMES = ("image", "plane", "refine")
INSTALL_HINT = "pip install -r requirements/onnx.txt (or the package's `onnx` extra)"


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as exc:
        raise BundleError(f"ONNX bundles need the Python package {name!r} ({INSTALL_HINT}): {exc}") from None


def onnxruntime_available() -> bool:
    """onnx and onnxruntime importable (enough to load and run an ONNX bundle)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def exporter_available() -> bool:
    """Everything :func:`export_onnx` needs (onnx, onnxscript) and onnxruntime to check it."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return onnxruntime_available()


def is_onnx_file(path: str | Path) -> bool:
    """``.onnx`` suffix, or not a zip and starting like an ONNX ModelProto (field 1, ir_version)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x08 and head[:2] != b"PK"


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------


class OnnxGraph(nn.Module):
    """What is exported: ``(image, plane, refine 0-d bool) -> action (B, 6) | action_scale (B, 12)``."""

    def __init__(self, model: nn.Module, with_scale: bool) -> None:
        super().__init__()
        self.model = model
        self.with_scale = bool(with_scale)

    def _call(self, image: torch.Tensor, plane: torch.Tensor, refine: bool) -> torch.Tensor:
        if self.with_scale:
            return self.model.forward_with_scale(image, plane, refine)
        return self.model(image, plane, refine)

    def forward(self, image: torch.Tensor, plane: torch.Tensor, refine: torch.Tensor) -> torch.Tensor:
        if not getattr(self.model, "has_dreamer", False):
            # keep `refine` an input of the graph (same signature for every bundle)
            return self._call(image, plane, False) + refine.to(image.dtype) * 0.0

        def _refined(image: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
            return self._call(image, plane, True)

        def _plain(image: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
            return self._call(image, plane, False)

        return torch.cond(refine, _refined, _plain, (image, plane))


def output_name(meta: dict[str, Any]) -> str:
    """``action_scale`` for bundles with uncertainty, else ``action``."""
    return "action_scale" if meta.get("has_uncertainty") else "action"


def export_onnx(model: nn.Module, meta: dict[str, Any], path: str | Path | None = None) -> bytes:
    """Export an eager GuidanceModel (eval, CPU) with ``meta``; writes ``path`` when given.

    Returns the serialised model. Raises :class:`BundleError` when the exporter is missing or
    the model does not export.
    """
    onnx = _import("onnx")
    _import("onnxscript")
    validate_metadata(meta, path or "<onnx export>")
    with_scale = bool(meta.get("has_uncertainty"))
    if with_scale and not hasattr(model, "forward_with_scale"):
        raise BundleError("metadata says has_uncertainty but the model has no forward_with_scale")
    model = model.eval().cpu()
    h, w = (int(v) for v in meta["input_size"])
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = (torch.rand(2, 1, h, w), torch.zeros(2, dtype=torch.int64), torch.tensor(True))
    try:
        with quiet_torch_deprecations(), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*")
            program = torch.onnx.export(OnnxGraph(model, with_scale).eval(), example, dynamo=True,
                                        input_names=list(INPUT_NAMES), output_names=[output_name(meta)],
                                        dynamic_shapes=({0: batch}, {0: batch}, None), opset_version=OPSET,
                                        optimize=True, verbose=False, external_data=False)
    except Exception as exc:
        raise BundleError(f"ONNX export failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    proto = program.model_proto
    for graph in _graphs(onnx, proto.graph):  # the exporter's per-node debug notes: 20 % of the file
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = json.dumps(meta, indent=1, sort_keys=True)
    proto.producer_name = "cardiac_copilot_ros"
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_model_from_string(data))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return data


def eager_from_torchscript(module: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """Rebuild the eager GuidanceModel from a TorchScript bundle module (weights + hyper-parameters).

    An ensemble bundle (metadata ``ensemble``) gives the eager :class:`~.ensemble.GuidanceEnsemble` of its
    members. Raises :class:`BundleError` when the weights do not fit this code's GuidanceModel.
    """
    from cardiac_copilot_ros.model.policy import GuidanceModel

    members = (meta.get("ensemble") or {}).get("members") or []
    if members:
        from cardiac_copilot_ros.model.ensemble import GuidanceEnsemble

        try:
            subs = [getattr(module.members, str(i)) for i in range(len(members))]
        except AttributeError:
            raise BundleError(f"the metadata lists {len(members)} ensemble members that the module lacks") from None
        return GuidanceEnsemble([eager_from_torchscript(sub, {
            **meta, "ensemble": None, **{k: m.get(k) for k in ("backbone", "has_dreamer", "has_uncertainty")}})
            for sub, m in zip(subs, members, strict=True)]).eval()

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    kwargs: dict[str, Any] = {"backbone": str(meta["backbone"]), "n_planes": len(meta["planes"]),
                              "dreamer": bool(meta["has_dreamer"])}
    if meta["has_dreamer"]:
        kwargs["dreamer_dim"] = int(state["dreamer.feat_in.weight"].shape[0])
        kwargs["dreamer_depth"] = len({k.split(".")[2] for k in state if k.startswith("dreamer.blocks.")})
        try:
            kwargs["dreamer_heads"] = int(getattr(module.dreamer.blocks, "0").heads)
        except AttributeError:
            pass
    params = inspect.signature(GuidanceModel).parameters
    if meta.get("has_uncertainty"):
        if "uncertainty" not in params:
            raise BundleError("this bundle has uncertainty outputs, which this code's GuidanceModel cannot rebuild")
        kwargs["uncertainty"] = True
    try:
        model = GuidanceModel(**kwargs)
        if "head.fc.0.bias" not in state:  # exported with the plane query folded into a per-plane bias
            with torch.no_grad():
                model.head.fold_plane_query()
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise BundleError(f"the bundle's weights do not fit this code's GuidanceModel ({kwargs}): "
                          f"{str(exc).splitlines()[0]}") from exc
    return model.eval()


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _graphs(onnx: Any, graph: Any) -> Any:
    """``graph`` and every subgraph inside it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(onnx, attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(onnx, g)


def _tensors(onnx: Any, graph: Any) -> Any:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


def check_model_proto(proto: Any, path: str | Path) -> None:
    """Refuse external data and operators outside the standard domain (or the model's own functions)."""
    onnx = _import("onnx")
    local = {(f.domain, f.name) for f in proto.functions}
    graphs = [g for top in [proto.graph] for g in _graphs(onnx, top)]
    nodes = [n for g in graphs for n in g.node]
    for func in proto.functions:
        nodes.extend(func.node)
        for n in func.node:
            for attr in n.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(_graphs(onnx, attr.g))
    for g in graphs:
        for t in _tensors(onnx, g):
            if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
                refs = {e.key: e.value for e in t.external_data}
                raise BundleError(f"{path}: refusing an ONNX model with external data (tensor {t.name!r} "
                                  f"refers to {refs.get('location', '?')!r}); bundles must hold all their "
                                  f"tensors")
    for n in nodes:
        if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in local:
            raise BundleError(f"{path}: refusing an ONNX model with custom operator {n.domain}::{n.op_type}; "
                              f"bundles use the standard ONNX operators only")


def read_onnx_meta(proto: Any, path: str | Path) -> dict[str, Any]:
    """The bundle metadata from ``metadata_props`` (validated)."""
    values = [p.value for p in proto.metadata_props if p.key == META_KEY]
    if not values:
        raise BundleError(f"{path}: no {META_KEY} metadata in the ONNX model; not a Cardiac Copilot bundle "
                          f"(convert with `cardiac-copilot export MODEL --format onnx --out FILE.onnx`)")
    if len(values[0].encode("utf-8")) > MAX_META_BYTES:
        raise BundleError(f"{path}: {META_KEY} metadata is larger than {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(values[0])
    except ValueError as exc:
        raise BundleError(f"{path}: corrupt {META_KEY} metadata ({exc})") from exc
    return validate_metadata(meta, path)


def _check_signature(proto: Any, meta: dict[str, Any], path: str | Path) -> None:
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    want = output_name(meta)
    if inputs != list(INPUT_NAMES) or outputs != [want]:
        raise BundleError(f"{path}: ONNX graph has inputs {inputs} and outputs {outputs}; a bundle has inputs "
                          f"{list(INPUT_NAMES)} and output [{want!r}]")


@dataclass
class OnnxModel:
    """A loaded ONNX bundle on ONNX Runtime's CPU provider.

    Call it like a TorchScript bundle module (torch tensors in, (B, 6) torch tensor out) or use
    :meth:`run` with numpy arrays (returns (B, 6), or (B, 12) with ``action_scale``).
    """

    session: Any
    meta: dict[str, Any]
    path: Path
    output: str
    threads: int

    @property
    def has_scale(self) -> bool:
        return self.output == "action_scale"

    def run(self, image: np.ndarray, plane: np.ndarray, refine: bool) -> np.ndarray:
        feeds = {"image": np.ascontiguousarray(image, np.float32), "plane": np.ascontiguousarray(plane, np.int64),
                 "refine": np.array(bool(refine))}
        return self.session.run([self.output], feeds)[0]

    def __call__(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        out = self.run(image.detach().cpu().numpy(), plane.detach().cpu().numpy(), refine)
        return torch.from_numpy(out[:, :6].copy())

    def forward_with_scale(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        if not self.has_scale:
            raise RuntimeError(f"{self.path.name} has no uncertainty output")
        return torch.from_numpy(self.run(image.detach().cpu().numpy(), plane.detach().cpu().numpy(), refine))

    def eval(self) -> OnnxModel:
        return self


def session_from_bytes(data: bytes, path: str | Path, num_threads: int | None = None) -> OnnxModel:
    """Check an ONNX bundle held in memory and open an ONNX Runtime session on it."""
    onnx = _import("onnx")
    ort = _import("onnxruntime")
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # DecodeError and friends
        raise BundleError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from exc
    meta = read_onnx_meta(proto, path)
    check_model_proto(proto, path)
    _check_signature(proto, meta, path)
    opts = ort.SessionOptions()
    threads = int(num_threads) if num_threads else int(torch.get_num_threads())
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only (no "removing unused initializer" chatter)
    # idle worker threads sleep instead of spinning: the node shares its cores with DDS and the executor
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BundleError(f"{path}: ONNX Runtime cannot load this model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return OnnxModel(session=session, meta=meta, path=Path(path), output=output_name(meta), threads=threads)


def load_onnx(path: str | Path, *, sha256: str | None = None, num_threads: int | None = None) -> OnnxModel:
    """Load an ``.onnx`` bundle (pinned by ``sha256`` when given); :class:`BundleError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: model bundle not found")
    if not path.is_file():
        raise BundleError(f"{path}: not a file")
    check_sha256(path, sha256)
    return session_from_bytes(path.read_bytes(), path, num_threads)


# ---------------------------------------------------------------------------------------
# The export command (``cardiac-copilot export ... --format onnx``)
# ---------------------------------------------------------------------------------------


def compare(reference: Any, onnx_model: OnnxModel, input_size: tuple[int, int], n_planes: int,
            has_dreamer: bool, batch: int = 3, seed: int = 0) -> dict[str, float]:
    """Max abs difference (mm/deg) between ``reference(image, plane, refine)`` and the ONNX model.

    Per mode (``policy``, ``refine``); for ``action_scale`` graphs ``reference`` must return
    (B, 12). NaN or inf anywhere counts as an infinite difference.
    """
    h, w = input_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, h, w, generator=gen)
    x[0] = 0.0  # an empty frame too
    plane = torch.arange(batch, dtype=torch.int64) % n_planes
    diffs: dict[str, float] = {}
    for refine in ((False, True) if has_dreamer else (False,)):
        with torch.inference_mode():
            ref = reference(x, plane, refine).detach().cpu().double().numpy()
        got = onnx_model.run(x.numpy(), plane.numpy(), refine).astype(np.float64)
        if ref.shape != got.shape or not (np.isfinite(ref).all() and np.isfinite(got).all()):
            diffs["refine" if refine else "policy"] = float("inf")
        else:
            diffs["refine" if refine else "policy"] = float(np.abs(ref - got).max())
    return diffs


def _source_model(source: Path) -> tuple[nn.Module, dict[str, Any], Any, str]:
    """(eager model, metadata, reference callable, reference name) for a run, checkpoint or bundle."""
    from cardiac_copilot_ros.model.bundle import build_metadata, load_bundle

    if is_bundle_file(source):
        bundle = load_bundle(source)
        if bundle.fmt != "torchscript":
            raise BundleError(f"{source}: only TorchScript bundles convert to ONNX")
        meta = dict(bundle.meta)
        model = eager_from_torchscript(bundle.module, meta)
        module = bundle.module
        if meta.get("has_uncertainty"):
            def reference(image: torch.Tensor, plane: torch.Tensor, refine: bool) -> torch.Tensor:
                return module.forward_with_scale(image, plane, refine)
        else:
            def reference(image: torch.Tensor, plane: torch.Tensor, refine: bool) -> torch.Tensor:
                return module(image, plane, refine)
        return model, meta, reference, "TorchScript bundle"
    from cardiac_copilot_ros.model.checkpoint import load_checkpoint, model_from_checkpoint

    state = load_checkpoint(source, prefer="best")
    model = model_from_checkpoint(state)
    cfg = state.get("config", {})
    extra: dict[str, Any] = {
        "model": cfg.get("model"), "training": {"checkpoint": str(state["path"]), "step": state.get("step"),
                                                "preset": cfg.get("preset"), "best": state.get("best"),
                                                "code_version": state.get("code_version")}}
    if getattr(model, "has_uncertainty", False):
        extra["has_uncertainty"] = True
    meta = build_metadata(model, tuple(state["input_size"]), data_manifest_sha256=state.get("data_manifest_sha256"),
                          extra=extra)
    meta.update({k: v for k, v in extra.items() if k not in meta})
    call = model.forward_with_scale if meta.get("has_uncertainty") else model
    return model, meta, lambda i, p, r: call(i, p, r), "eager model"


def is_bundle_file(path: Path) -> bool:
    """Whether ``path`` is a TorchScript model bundle file (a ``.pt`` archive with bundle metadata; a training
    run's ``best.pt`` is a checkpoint), as opposed to a run folder or a checkpoint."""
    import zipfile

    if not (path.is_file() and path.suffix == ".pt" and path.name != "best.pt"):
        return False

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith(f"/extra/{META_FILE}") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def export_onnx_bundle(source: str | Path | list[str | Path], out: str | Path, check: bool = True) -> dict[str, Any]:
    """Convert a run folder, checkpoint or TorchScript bundle to ``out`` (.onnx); a list of two or more
    gives their ensemble (:mod:`.ensemble`).

    Returns {path, format, meta, max_abs_diff (per mode or None), reference}.
    """
    sources = [Path(s) for s in (source if isinstance(source, (list, tuple)) else [source])]
    for s in sources:
        if not s.exists():
            raise FileNotFoundError(f"{s}: no such run folder, checkpoint or bundle")
    if len(sources) > 1:
        from cardiac_copilot_ros.model.ensemble import build_ensemble

        model, meta = build_ensemble(sources)
        call = model.forward_with_scale if meta.get("has_uncertainty") else model
        reference, ref_name = (lambda i, p, r: call(i, p, r)), "eager ensemble"
    else:
        model, meta, reference, ref_name = _source_model(sources[0])
    out = Path(out)
    data = export_onnx(model, meta, out)
    result: dict[str, Any] = {"path": str(out), "format": "onnx", "meta": meta, "max_abs_diff": None,
                              "reference": ref_name}
    if check:
        onnx_model = session_from_bytes(data, out)
        result["max_abs_diff"] = compare(reference, onnx_model, tuple(meta["input_size"]), len(meta["planes"]),
                                         bool(meta["has_dreamer"]))
    return result


def worst_disagreement(diffs: dict[str, float] | None) -> tuple[float, bool]:
    """The largest of :func:`compare`'s max |diff| per output (mm, deg; nan when there is none) and whether it
    is within :data:`TOLERANCE` (a NaN or inf is not)."""
    worst = max(diffs.values()) if diffs else float("nan")
    return worst, bool(np.isfinite(worst) and worst <= TOLERANCE)


def run_export(args: argparse.Namespace) -> int:
    """``cardiac-copilot export ... --format onnx``: 0 ok, 1 check failed, 2 bad input."""
    try:
        res = export_onnx_bundle(list(args.run), args.out, check=not args.no_check)
    except (FileNotFoundError, ValueError, BundleError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    meta = res["meta"]
    print(f"wrote {res['path']} (onnx, output {output_name(meta)!r}; {meta['backbone']}, input "
          f"{meta['input_size'][0]}x{meta['input_size'][1]}, dreamer {'yes' if meta['has_dreamer'] else 'no'}, "
          f"planes {', '.join(meta['planes'])})")
    diffs = res["max_abs_diff"]
    if diffs is not None:
        print(f"check vs {res['reference']} (ONNX Runtime): "
              + ", ".join(f"{k} max |diff| {v:.2e}" for k, v in diffs.items())
              + f" (tolerance {TOLERANCE:g} mm/deg)")
        worst, ok = worst_disagreement(diffs)
        if not ok:
            print(f"export: ONNX outputs differ from the {res['reference']} by {worst:.3g} > {TOLERANCE:g} "
                  f"(inf = NaN or inf in an output)", file=sys.stderr)
            return 1
    return 0
