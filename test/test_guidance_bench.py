"""``cardiac-copilot bench guidance`` end to end (slow: starts the node and a publisher process)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy not installed")
pytest.importorskip("torch")

from cardiac_copilot_ros.cli import main
from cardiac_copilot_ros.model.bundle import make_untrained_bundle


@pytest.mark.slow
def test_bench_guidance_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_untrained_bundle(tmp_path / "b.pt", backbone="resnet18", input_size=(64, 64))
    out = tmp_path / "bench.json"
    rc = main(["bench", "guidance", "--bundle", str(bundle), "--seconds", "2", "--warmup", "0.5",
               "--high-rate", "0", "--no-paper", "--size", "128x96", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "p99 (ms)" in text and "default (b.pt)" in text
    doc = json.loads(out.read_text())
    assert set(doc["latency_ms"]) == {"p50", "p95", "p99"}
    assert doc["latency_ms"]["p50"] <= doc["latency_ms"]["p95"] <= doc["latency_ms"]["p99"]
    assert doc["rate_hz"] > 0 and 0.0 <= doc["dropped_ratio"] < 1.0
    assert math.isfinite(doc["cpu_percent"])
    engines = [r["engine"] for r in doc["rows"]]
    assert engines[0] == "torch" and len(doc["rows"]) == len(doc["engines"])  # one row per engine
    assert all(r["node_inference_ms_p50"] > 0 for r in doc["rows"])
    assert doc["engine"] in engines
    if "onnxruntime" in engines:  # the speed-up ratio, printed and in the JSON
        assert doc["speedup_vs_torch"]["onnxruntime"] > 0 and "speed-up of onnxruntime over torch" in text
