"""Model bundle: save/load in both formats, metadata, clear errors, no deprecation warnings."""

from __future__ import annotations

import json
import warnings
import zipfile

import pytest
import torch

from cardiac_copilot_ros.model.bundle import (
    FORMAT,
    BundleError,
    load_bundle,
    make_untrained_bundle,
)
from cardiac_copilot_ros.planes import PLANE_NAMES


@pytest.fixture(scope="module")
def ts_bundle(tmp_path_factory):
    return make_untrained_bundle(tmp_path_factory.mktemp("b") / "m.pt", input_size=(32, 32))


def test_untrained_torchscript_bundle_loads_and_runs(ts_bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = load_bundle(ts_bundle)
    assert b.fmt == "torchscript"
    assert b.input_size == (32, 32)
    assert b.planes == PLANE_NAMES
    assert b.has_dreamer and b.backbone == "resnet18"
    assert b.meta["format"] == FORMAT and b.meta["euler_axes"] == "sxyz"
    x = torch.rand(3, 1, 32, 32)
    p = torch.tensor([0, 1, 2])
    out = b(x, p, False)
    ref = b(x, p, True)
    assert out.shape == (3, 6) and out.dtype == torch.float32
    assert torch.isfinite(ref).all()
    # the module itself has the contract signature
    assert torch.equal(b.module(x, p, False), out)


def test_bundle_is_torchscript_with_metadata(ts_bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {"cardiac_copilot.json": ""}
        m = torch.jit.load(str(ts_bundle), _extra_files=extra)
    meta = json.loads(extra["cardiac_copilot.json"])
    assert meta["input_size"] == [32, 32] and meta["has_dreamer"] is True
    assert m(torch.rand(1, 1, 32, 32), torch.tensor([1]), True).shape == (1, 6)


def test_missing_corrupt_and_wrong_files_name_the_file(tmp_path, ts_bundle):
    with pytest.raises(BundleError, match="nope.pt"):
        load_bundle(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(BundleError, match="junk.pt"):
        load_bundle(junk)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"a": torch.zeros(2)}, ckpt)
    with pytest.raises(BundleError, match="ckpt.pt.*checkpoint"):
        load_bundle(ckpt)
    plain = tmp_path / "plain.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(BundleError, match="plain.pt.*metadata"):
        load_bundle(plain)
    # truncated archive
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(ts_bundle.read_bytes()[: ts_bundle.stat().st_size // 2])
    with pytest.raises(BundleError, match="trunc.pt"):
        load_bundle(trunc)


def test_incompatible_metadata_is_rejected(tmp_path, ts_bundle):
    def rewrite(name: str, change: dict) -> object:
        out = tmp_path / name
        with zipfile.ZipFile(ts_bundle) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("extra/cardiac_copilot.json"):
                    meta = json.loads(data)
                    meta.update(change)
                    data = json.dumps(meta).encode()
                dst.writestr(info, data)
        return out

    with pytest.raises(BundleError, match="future.pt.*version"):
        load_bundle(rewrite("future.pt", {"format_version": 99}))
    with pytest.raises(BundleError, match="planes.pt.*planes"):
        load_bundle(rewrite("planes.pt", {"planes": ["PLAX", "plax"]}))   # not distinct
    with pytest.raises(BundleError, match="planes2.pt.*planes"):
        load_bundle(rewrite("planes2.pt", {"planes": []}))
    # any list of distinct views loads (views are data; user views need not be known here)
    assert load_bundle(rewrite("views.pt", {"planes": ["A4C", "PLAX", "MY-VIEW"]})).planes == ("A4C", "PLAX", "MY-VIEW")
    with pytest.raises(BundleError, match="euler.pt.*Euler"):
        load_bundle(rewrite("euler.pt", {"euler_axes": "rzyx"}))
