"""A model file is untrusted input: loading one must never run code from it (issue 14, item 1).

Each crafted archive carries a pickle payload that writes a marker file when unpickled, and a
valid ``cardiac_copilot.json``. Before the fix, ``load_bundle`` handed torch.export archives to
``torch.export.load``, which unpickled the payload (with a ``weights_only=False`` fallback).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from cardiac_copilot_ros import runtime
from cardiac_copilot_ros.evaluation import EvaluationError, load_model
from cardiac_copilot_ros.model.bundle import (
    BundleError,
    file_sha256,
    load_bundle,
    make_untrained_bundle,
)


class _Payload:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def export_archive(tmp_path_factory) -> Path:
    """A genuine torch.export bundle (tiny) to tamper with."""
    return make_untrained_bundle(tmp_path_factory.mktemp("pt2") / "good.pt2", input_size=(32, 32),
                                 dreamer=False, fmt="export")


def _tamper(src: Path, out: Path, marker: Path, variant: str) -> Path:
    """Copy ``src`` with a payload: in the sample inputs, or as a weight marked ``use_pickle``."""
    payload = pickle.dumps(_Payload(marker))
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        config_name = next(n for n in zin.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(zin.read(config_name))
        first = next(iter(config["config"]))
        for info in zin.infolist():
            data = zin.read(info.filename)
            if variant == "sample_inputs" and info.filename.endswith("data/sample_inputs/model.pt"):
                data = payload
            elif variant == "pickled_weight":
                if info.filename == config_name:
                    config["config"][first]["use_pickle"] = True
                    data = json.dumps(config).encode()
                elif info.filename.endswith("data/weights/" + config["config"][first]["path_name"]):
                    data = payload
            zout.writestr(info, data)
    return out


@pytest.mark.parametrize("variant", ["sample_inputs", "pickled_weight"])
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_crafted_archive_never_runs_code(export_archive: Path, tmp_path: Path, variant: str, suffix: str) -> None:
    marker = tmp_path / "marker"
    evil = _tamper(export_archive, tmp_path / f"evil{suffix}", marker, variant)
    with pytest.raises(BundleError, match="refusing a torch.export archive"):
        load_bundle(evil)
    with pytest.raises(BundleError, match="refusing"):
        runtime.GuidanceRuntime(evil, device="cpu")
    with pytest.raises(EvaluationError, match="refusing"):
        load_model(evil)
    assert not marker.exists(), "loading the model file ran code from it"


def test_sha256_pins_the_file(tmp_path: Path) -> None:
    path = make_untrained_bundle(tmp_path / "m.pt", input_size=(32, 32), dreamer=False)
    digest = file_sha256(path)
    assert load_bundle(path, sha256=digest.upper()).fmt == "torchscript"
    with pytest.raises(BundleError, match="does not match the pinned model_sha256"):
        load_bundle(path, sha256="0" * 64)
    with pytest.raises(BundleError, match="not a SHA-256 hex digest"):
        load_bundle(path, sha256="abc")
    rt = runtime.GuidanceRuntime(path, device="cpu", model_sha256=digest, warmup=0)
    assert rt.path == path
    with pytest.raises(BundleError, match="pinned"):
        runtime.GuidanceRuntime(path, device="cpu", model_sha256="f" * 64)
    with pytest.raises(EvaluationError, match="pinned"):
        load_model(path, sha256="f" * 64)
    assert load_model(path, sha256=digest).kind == "bundle"


def test_oversized_metadata_is_refused(tmp_path: Path) -> None:
    path = make_untrained_bundle(tmp_path / "m.pt", input_size=(32, 32), dreamer=False)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("extra/cardiac_copilot.json"):
                data = data[:-1] + b"," + b'"pad": "' + b"x" * (2 << 20) + b'"}'
            zout.writestr(info.filename, data)
    with pytest.raises(BundleError, match="larger than"):
        load_bundle(big)


def test_exporter_may_check_its_own_torch_export_file(export_archive: Path) -> None:
    bundle = load_bundle(export_archive, allow_torch_export=True)
    assert bundle.fmt == "export"
    assert bundle(torch.rand(1, 1, 32, 32), torch.tensor([0])).shape == (1, 6)


@pytest.mark.ros
def test_guidance_node_refuses_crafted_model(export_archive: Path, tmp_path: Path) -> None:
    """The node's ``model_path`` is the attack surface the issue names: it must not start, nor run code."""
    from ros_helpers import NodeProcess

    marker = tmp_path / "marker"
    evil = _tamper(export_archive, tmp_path / "evil.pt", marker, "sample_inputs")
    log = tmp_path / "node.log"
    proc = NodeProcess("cardiac_copilot_ros.nodes.guidance_node", params={"model_path": str(evil)},
                       log_path=log).start()
    try:
        rc = proc.proc.wait(timeout=120)
    finally:
        proc.stop()
    text = log.read_text()
    assert rc != 0, text
    assert "refusing a torch.export archive" in text
    assert "Traceback" not in text
    assert not marker.exists(), "loading the model file ran code from it"
