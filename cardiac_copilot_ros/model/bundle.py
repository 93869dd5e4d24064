"""The model bundle: one file that holds the guidance model and its metadata.

Two formats with one calling convention (docs/ARCHITECTURE.md, "Model bundle"):

* ``.pt`` TorchScript (default; loads with ``torch.jit.load`` without pickle, also in libtorch
  C++ and older PyTorch): ``forward(image, plane, refine: bool)``.
* ``.pt2`` torch.export ExportedProgram (TorchScript's successor; PyTorch >= 2.6 to load):
  ``forward(image, plane, refine)`` with ``refine`` a 0-d bool tensor (``torch.cond`` keeps
  both branches in the graph). :func:`load_bundle` wraps it so that it takes a bool as well.

Security: a model file is untrusted input, and loading it must never run code from it.
``torch.jit.load`` reads TorchScript archives with the C++ unpickler, which rebuilds tensors and
TorchScript objects only (no Python callables). ``torch.export.load`` does not have that
property: in torch 2.14 it unpickles weights marked ``use_pickle``, opaque-object constants and
the archive's sample inputs, falling back to ``weights_only=False``. :func:`load_bundle`
therefore refuses torch.export archives (whatever their name) before any torch loader sees them;
only ``cardiac-copilot export`` reloads the ``.pt2`` it has just written itself, to check it
(``allow_torch_export=True``). ``sha256=`` pins the exact file (node parameter ``model_sha256``,
CLI option ``--model-sha256``).

``image`` float32 (B, 1, H, W) in [0, 1], ``plane`` int64 (B,) -> float32 (B, 6) in mm/deg.
The metadata JSON sits in the archive as the extra file ``cardiac_copilot.json``.

Bundles whose metadata says ``"has_uncertainty": true`` (TorchScript) also export
``forward_with_scale(image, plane, refine) -> (B, 12)``: the action in columns 0..5 exactly as
``forward`` returns it, the per-axis Laplace scale b (mm, deg; the expected absolute error of the
policy head) in columns 6..11. Absent or false: no uncertainty (bundles before issue 12).

PyTorch 2.14 deprecates torch.jit (FutureWarning on script, save, load); this module silences
those warnings around its own calls so none reaches users.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cardiac_copilot_ros import code_version, pose
from cardiac_copilot_ros.planes import PLANE_NAMES, plane_key

FORMAT = "cardiac_copilot_bundle"
FORMAT_VERSION = 2
#: Bundle format versions: 1 = float32 weights; 2 = adds ``weights_dtype`` ("float16": half-size files,
#: weights stored in fp16 and cast to float32 on load; written only for such bundles, so fp32 bundles
#: stay readable by older code).
WEIGHTS_DTYPES = ("float32", "float16")
META_FILE = "cardiac_copilot.json"
#: Bundle file formats: name -> file suffix (onnx: see model/onnx_bundle.py; needs the `onnx` extra).
FORMATS = {"torchscript": ".pt", "export": ".pt2", "onnx": ".onnx"}

_REQUIRED_KEYS = ("format", "format_version", "planes", "input_size", "action_units", "euler_axes",
                  "backbone", "has_dreamer", "action_mean", "action_std")


#: Largest metadata JSON read from an archive, bytes (a zip entry can claim any size).
MAX_META_BYTES = 1 << 20


class BundleError(RuntimeError):
    """A model bundle file is missing, corrupt, not trusted, or not compatible with this code."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str | None) -> None:
    """Raise :class:`BundleError` unless ``path`` hashes to ``expected`` (hex; None/'' = no pin)."""
    if not expected:
        return
    want = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise BundleError(f"model_sha256 {expected!r} is not a SHA-256 hex digest (64 hex digits)")
    have = file_sha256(path)
    if have != want:
        raise BundleError(f"{path}: SHA-256 {have} does not match the pinned model_sha256 {want}; "
                          f"refusing to load a model file that is not the expected one")


@contextmanager
def quiet_torch_deprecations() -> Iterator[None]:
    """Silence torch.jit's FutureWarnings (PyTorch >= 2.14) and torch.export chatter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        yield


# ---------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------


def build_metadata(model: nn.Module, input_size: tuple[int, int], *,
                   data_manifest_sha256: str | None = None, extra: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Metadata for a :class:`~cardiac_copilot_ros.model.policy.GuidanceModel`."""
    h, w = (int(v) for v in input_size)
    # the model's views (set by training from the dataset); older models: the paper planes
    planes = [str(p) for p in (getattr(model, "plane_names", None)
                               or PLANE_NAMES[: int(getattr(model, "n_planes", len(PLANE_NAMES)))])]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "planes": list(planes),
        "plane_indices": {name: i for i, name in enumerate(planes)},
        "input_size": [h, w],
        "input": {
            "shape": ["B", 1, h, w], "dtype": "float32", "range": [0.0, 1.0],
            "description": "grey-level B-mode image resized to input_size, intensity / 255",
            "normalisation": {"mean": float(getattr(model, "image_mean", 0.5)),
                              "std": float(getattr(model, "image_std", 0.25))},
        },
        "output": {"shape": ["B", 6], "dtype": "float32",
                   "description": "action to the target plane in the current probe frame"},
        "action_axes": list(pose.ACTION_AXES),
        "action_units": list(pose.ACTION_UNITS),
        "euler_axes": pose.EULER_AXES,
        "backbone": getattr(getattr(model, "encoder", None), "backbone", "unknown"),
        "has_dreamer": bool(getattr(model, "has_dreamer", False)),
        "has_uncertainty": bool(getattr(model, "has_uncertainty", False)),
        "action_mean": [float(v) for v in model.action_mean.detach().cpu().tolist()],
        "action_std": [float(v) for v in model.action_std.detach().cpu().tolist()],
        "data_manifest_sha256": data_manifest_sha256,
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        meta.update(extra)
    return meta


def validate_metadata(meta: Any, path: Path | str) -> dict[str, Any]:
    """Check metadata against this code; raise :class:`BundleError` naming ``path``."""
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: metadata {META_FILE} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}: not a Cardiac Copilot model bundle (format {meta.get('format')!r})")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{path}: bundle metadata lacks {', '.join(missing)}")
    version = meta["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise BundleError(f"{path}: bundle format version {version!r} is not supported by this code "
                          f"(supports 1..{FORMAT_VERSION}); update cardiac_copilot_ros or re-export")
    dtype = meta.get("weights_dtype", "float32")
    if dtype not in WEIGHTS_DTYPES:
        raise BundleError(f"{path}: bad weights_dtype {dtype!r} in bundle metadata "
                          f"(one of {', '.join(WEIGHTS_DTYPES)})")
    planes = meta["planes"]
    # any list of distinct view names (the model's plane query indexes it); they need not be
    # views known to this code (user views travel with the bundle)
    if (not isinstance(planes, list) or not planes
            or not all(isinstance(p, str) and p.strip() for p in planes)
            or len({plane_key(p) for p in planes}) != len(planes)):
        raise BundleError(f"{path}: bundle planes {planes!r} must be a non-empty list of distinct view names")
    size = meta["input_size"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)):
        raise BundleError(f"{path}: bad input_size {size!r} in bundle metadata")
    ensemble = meta.get("ensemble")
    if ensemble is not None:   # model/ensemble.py: what ONNX conversion rebuilds the members from
        members = ensemble.get("members") if isinstance(ensemble, dict) else None
        if not (isinstance(members, list) and len(members) >= 2
                and all(isinstance(m, dict) and isinstance(m.get("backbone"), str) for m in members)):
            raise BundleError(f"{path}: bad ensemble metadata: 'members' must list 2 or more members, each with "
                              f"its backbone")
    if meta["euler_axes"] != pose.EULER_AXES or list(meta["action_units"]) != list(pose.ACTION_UNITS):
        raise BundleError(f"{path}: bundle uses Euler axes {meta['euler_axes']!r} / units "
                          f"{meta['action_units']!r}; this code expects {pose.EULER_AXES!r} / "
                          f"{list(pose.ACTION_UNITS)}")
    return meta


def _inspect_archive(path: Path) -> tuple[str, dict[str, Any]]:
    """Find the file's format ('torchscript' or 'export') and read its metadata, unloaded."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path}: not a model bundle (not a TorchScript or torch.export archive: "
                          f"{exc})") from exc
    with zf:
        names = zf.namelist()
        if any(n.endswith("/archive_format") for n in names):
            fmt = "export"
        elif any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            fmt = "torchscript"
        elif any(n.endswith("data.pkl") for n in names):
            raise BundleError(f"{path}: this is a torch.save file (e.g. a training checkpoint), not a "
                              f"model bundle; make one with `cardiac-copilot export RUN --out FILE.pt`")
        else:
            raise BundleError(f"{path}: not a model bundle (unknown archive layout)")
        meta_names = [n for n in names if n.endswith(f"/extra/{META_FILE}")]
        if not meta_names:
            raise BundleError(f"{path}: no {META_FILE} metadata inside; not a Cardiac Copilot bundle")
        if zf.getinfo(meta_names[0]).file_size > MAX_META_BYTES:
            raise BundleError(f"{path}: {META_FILE} metadata is larger than {MAX_META_BYTES} bytes")
        try:
            meta = json.loads(zf.read(meta_names[0]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as exc:
            raise BundleError(f"{path}: corrupt {META_FILE} metadata ({exc})") from exc
    return fmt, meta


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


class ExportWrapper(nn.Module):
    """torch.export entry: ``refine`` is a 0-d bool tensor, both branches kept via torch.cond."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, plane: torch.Tensor, refine: torch.Tensor) -> torch.Tensor:
        if not getattr(self.model, "has_dreamer", False):
            return self.model(image, plane, False)

        def _refined(image: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
            return self.model(image, plane, True)

        def _plain(image: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
            return self.model(image, plane, False)

        return torch.cond(refine, _refined, _plain, (image, plane))


def save_bundle(model: nn.Module, path: str | Path, meta: dict[str, Any], fmt: str | None = None,
                weights_dtype: str = "float32") -> Path:
    """Write ``model`` (a GuidanceModel, in eval mode on CPU) as a bundle file; returns the path.

    ``fmt`` is 'torchscript' or 'export'; by default it follows the suffix (.pt2 -> export).
    ``weights_dtype`` ``float16`` (TorchScript only) stores the weights in half precision (half the
    file; :func:`load_bundle` casts them back to float32, so inference runs in float32 on weights
    rounded to fp16: about 1e-3 relative).
    """
    path = Path(path)
    if fmt is None:
        fmt = "export" if path.suffix == ".pt2" else "onnx" if path.suffix == ".onnx" else "torchscript"
    if fmt not in FORMATS:
        raise ValueError(f"unknown bundle format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        from cardiac_copilot_ros.model.onnx_bundle import export_onnx

        export_onnx(model, meta, path)
        return path
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    if weights_dtype == "float16":
        if fmt != "torchscript":
            raise ValueError("float16 weights are supported for TorchScript bundles (.pt) only")
        meta = {**meta, "weights_dtype": "float16", "format_version": 2}
    validate_metadata(meta, path)
    if fmt == "export" and meta.get("has_uncertainty"):
        meta = {**meta, "has_uncertainty": False}  # the .pt2 graph holds forward only
    model = model.eval().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {META_FILE: json.dumps(meta, indent=1, sort_keys=True)}
    h, w = meta["input_size"]
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export wants the .pt2 suffix
    with quiet_torch_deprecations(), torch.no_grad():
        if fmt == "torchscript":
            # fp16: script a copy (scripting shares the parameters; .half() must not touch the caller's model)
            scripted = torch.jit.script(copy.deepcopy(model) if weights_dtype == "float16" else model)
            if weights_dtype == "float16":
                scripted.half()   # parameters and floating buffers; the code is dtype-agnostic
            torch.jit.save(scripted, str(tmp), _extra_files=extra)
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            example = (torch.rand(2, 1, h, w), torch.zeros(2, dtype=torch.int64), torch.tensor(True))
            program = torch.export.export(ExportWrapper(model), example,
                                          dynamic_shapes=({0: batch}, {0: batch}, None))
            torch.export.save(program, str(tmp), extra_files=extra)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


class ExportedAdapter(nn.Module):
    """Gives a loaded torch.export program the TorchScript calling convention (refine: bool)."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def forward(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        return self.program(image, plane, torch.tensor(bool(refine)))

    def train(self, mode: bool = True) -> ExportedAdapter:
        """Exported programs are inference-only (their train() raises); keep eval mode."""
        self.training = False
        return self


@dataclass
class Bundle:
    """A loaded model bundle. Call it (or ``module``) as ``(image, plane, refine) -> (B, 6)``."""

    module: nn.Module
    meta: dict[str, Any]
    path: Path
    fmt: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) in pixels the model expects."""
        h, w = self.meta["input_size"]
        return int(h), int(w)

    @property
    def planes(self) -> tuple[str, ...]:
        """Plane names in index order."""
        return tuple(self.meta["planes"])

    @property
    def has_dreamer(self) -> bool:
        return bool(self.meta["has_dreamer"])

    @property
    def backbone(self) -> str:
        return str(self.meta["backbone"])

    @property
    def has_uncertainty(self) -> bool:
        """Whether the module exports ``forward_with_scale`` (metadata ``has_uncertainty``)."""
        return bool(self.meta.get("has_uncertainty", False)) and hasattr(self.module, "forward_with_scale")

    def forward_with_scale(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        """(B, 12): action (mm, deg) and per-axis Laplace scale b (mm, deg); bundles with uncertainty only."""
        if not self.has_uncertainty:
            raise BundleError(f"{self.path}: this bundle has no uncertainty output (has_uncertainty)")
        with torch.inference_mode():
            return self.module.forward_with_scale(image, plane, bool(refine))

    def __call__(self, image: torch.Tensor, plane: torch.Tensor, refine: bool = False) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(image, plane, bool(refine))


def load_bundle(path: str | Path, device: str | torch.device = "cpu", *, sha256: str | None = None,
                allow_torch_export: bool = False) -> Bundle:
    """Load a TorchScript ``.pt`` bundle (or an ``.onnx`` one: ONNX Runtime on the CPU, module =
    :class:`~.onnx_bundle.OnnxModel`); the format is read from the contents, not the name.

    ``sha256`` pins the file (hex digest; checked before anything is parsed). torch.export
    archives are refused (loading one can run code from it, see the module docstring) unless
    ``allow_torch_export`` is set, which only code that has just written the file itself may do.
    Raises :class:`BundleError` naming the file when it is missing, corrupt, refused or
    incompatible.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: model bundle not found")
    if not path.is_file():
        raise BundleError(f"{path}: not a file")
    check_sha256(path, sha256)
    from cardiac_copilot_ros.model import onnx_bundle

    if onnx_bundle.is_onnx_file(path):  # ONNX Runtime on the CPU; no torch loader involved
        onnx_model = onnx_bundle.load_onnx(path)
        return Bundle(module=onnx_model, meta=onnx_model.meta, path=path, fmt="onnx")
    fmt, meta = _inspect_archive(path)
    if fmt == "export" and not allow_torch_export:
        raise BundleError(f"{path}: refusing a torch.export archive: torch.export.load unpickles parts "
                          f"of the file and can run code from it. Use a TorchScript .pt bundle "
                          f"(`cardiac-copilot export RUN --out FILE.pt`)")
    validate_metadata(meta, path)
    dev = torch.device(device)
    try:
        with quiet_torch_deprecations():
            if fmt == "torchscript":
                module: nn.Module = torch.jit.load(str(path), map_location=dev)
            else:
                program = torch.export.load(str(path))
                module = ExportedAdapter(program.module()).to(dev)
    except Exception as exc:  # torch raises RuntimeError, ValueError, KeyError, ... on bad archives
        raise BundleError(f"{path}: corrupt or incompatible {fmt} model bundle ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if meta.get("weights_dtype") == "float16":
        module.float()   # stored in half precision, run in float32
    module.eval()
    return Bundle(module=module, meta=meta, path=path, fmt=fmt, device=dev)


# ---------------------------------------------------------------------------------------
# Untrained bundles (tests, benches, before a trained default exists)
# ---------------------------------------------------------------------------------------


def make_untrained_bundle(path: str | Path, backbone: str = "resnet18", input_size: tuple[int, int] = (64, 64),
                          dreamer: bool = True, fmt: str = "torchscript", seed: int = 0) -> Path:
    """Build a randomly initialised model of the real architecture and write it as a bundle."""
    from cardiac_copilot_ros.model.policy import GuidanceModel

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = GuidanceModel(backbone=backbone, dreamer=dreamer).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    meta = build_metadata(model, input_size, extra={"untrained": True, "seed": int(seed)})
    return save_bundle(model, path, meta, fmt)
