"""cardiac-copilot bench paper --preset smoke end to end, and evaluate's held-out check on its runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from cardiac_copilot_ros import cli
from cardiac_copilot_ros.bench import paper as paper_bench
from cardiac_copilot_ros.planes import PLANE_NAMES


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # 2 shared cores: one thread is much faster than two under load
    root = tmp_path_factory.mktemp("paper")
    rc = cli.main(["bench", "paper", "--preset", "smoke", "--out", str(root / "out"), "--threads", "1",
                   "--docs-dir", str(root / "docs")])
    assert rc == 0
    return root


def test_smoke_protocol_end_to_end(bench, capsys):
    out = bench / "out"
    rec = json.loads((out / "protocol.json").read_text())
    assert rec["preset"] == "smoke" and rec["protocol"]["subjects"] == 4 and rec["cache_size"] == 32
    assert rec["command"] == "cardiac-copilot bench paper --preset smoke --threads 1"
    splits = rec["data"]["splits"]
    assert splits["test"] and not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
    assert not (out / "bags").exists()  # deleted after the build unless --keep-bags
    for model in ("baseline", "dreamer"):
        assert (out / "runs" / model / "best.pt").is_file()
        assert rec["training"][model]["steps"] == 4  # the same budget for both
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results) == ["baseline", "dreamer/policy", "dreamer/dreamer"]
    assert all(list(v) == list(PLANE_NAMES) for v in results.values())
    details = json.loads((out / "eval" / "details.json").read_text())
    assert details["split"] == "test" and details["split_subjects"] == splits["test"]
    assert {c["status"] for c in details["held_out"]} == {"ok"}
    assert set(rec["verdict"]) == {"dreamer/policy", "dreamer/dreamer"}
    assert rec["verdict"]["dreamer/dreamer"]["cells"] == 18
    for name in ("table.md", "table.csv", "fig3.png"):
        assert (out / "eval" / name).stat().st_size > 0
    assert sorted(p.name for p in (bench / "docs").iterdir()) == \
        ["paper_smoke_fig3.png", "paper_smoke_results.json", "paper_smoke_table.md"]


def test_refuses_a_non_empty_out(bench, capsys):
    assert cli.main(["bench", "paper", "--preset", "smoke", "--out", str(bench / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_protocol_overrides_and_validation():
    ns = argparse.Namespace(preset="cpu", subjects=20, scans_per_plane=None, frames_per_scan=50, sim_size=None,
                            seed=3, steps=100)
    p = paper_bench.protocol_from_args(ns)
    assert (p.subjects, p.frames_per_scan, p.seed, p.steps, p.sim_size, p.train_preset) == (20, 50, 3, 100, 96, "cpu")
    with pytest.raises(ValueError, match="subjects"):
        paper_bench.protocol_from_args(argparse.Namespace(preset="smoke", subjects=2))
    with pytest.raises(ValueError, match="steps"):
        paper_bench.protocol_from_args(argparse.Namespace(preset="smoke", steps=0))


def test_evaluate_refuses_training_subjects(bench, capsys):
    out = bench / "out"
    runs = [str(out / "runs" / "baseline"), str(out / "runs" / "dreamer")]
    assert cli.main(["evaluate", *runs, "--data", str(out / "cache"), "--split", "train", "--no-progress",
                     "--out", str(bench / "e_train")]) == 2
    assert "not held out" in capsys.readouterr().err
    assert cli.main(["evaluate", *runs, "--data", str(out / "cache"), "--split", "train", "--no-progress",
                     "--allow-overlap", "--out", str(bench / "e_train")]) == 0
    assert "warning: not held out" in capsys.readouterr().err
    # val chose the checkpoint: a warning, not a refusal
    assert cli.main(["evaluate", runs[0], "--data", str(out / "cache"), "--split", "val", "--no-progress",
                     "--out", str(bench / "e_val")]) == 0
    assert "val split chose its checkpoint" in capsys.readouterr().err


def test_evaluate_checks_subjects_of_another_cache(bench, capsys):
    """A cache re-split with another seed: its test subjects were training subjects of the run."""
    out = bench / "out"
    from cardiac_copilot_ros.sim.scan import write_scans

    write_scans(bench / "bags2", 4, 1, seed=0, frames_per_scan=20, image_size=48, progress=False)
    train_subjects = set(json.loads((out / "cache" / "manifest.json").read_text())["splits"]["train"])
    for seed in range(1, 20):
        cache2 = bench / f"cache2_{seed}"
        assert cli.main(["dataset", "build", str(bench / "bags2"), "--out", str(cache2), "--size", "32", "--quiet",
                         "--seed", str(seed)]) == 0
        test2 = set(json.loads((cache2 / "manifest.json").read_text())["splits"]["test"])
        if test2 & train_subjects:
            break
    else:
        pytest.fail("no split seed put a training subject into the test split")
    run = str(out / "runs" / "baseline")
    assert cli.main(["evaluate", run, "--data", str(cache2), "--no-progress", "--out", str(bench / "e2")]) == 2
    err = capsys.readouterr().err
    assert "not held out" in err and sorted(test2 & train_subjects)[0] in err


def test_evaluate_an_exported_bundle_knows_its_training_data(bench, capsys):
    out = bench / "out"
    bundle = bench / "dreamer.pt"
    assert cli.main(["export", str(out / "runs" / "dreamer"), "--out", str(bundle), "--no-check"]) == 0
    assert cli.main(["evaluate", str(bundle), "--data", str(out / "cache"), "--split", "train", "--no-progress",
                     "--out", str(bench / "e3")]) == 2
    assert "not held out" in capsys.readouterr().err
    assert cli.main(["evaluate", str(bundle), str(out / "runs" / "dreamer"), "--names", "bundle", "run",
                     "--data", str(out / "cache"), "--no-progress", "--out", str(bench / "e4")]) == 0
    res = json.loads((bench / "e4" / "results.json").read_text())
    for mode in ("policy", "dreamer"):  # the bundle and the run it came from agree
        for p in PLANE_NAMES:
            assert res[f"bundle/{mode}"][p]["mae"] == pytest.approx(res[f"run/{mode}"][p]["mae"], abs=2e-3)
