"""`cardiac-copilot bench closed-loop`: simulator, guidance and servo nodes over real DDS.

The fast test runs one very short episode per mode with an untrained bundle (its numbers mean
nothing) and checks the JSON layout, that every episode ends by convergence or the time limit,
that the oracle loop moves the probe toward the true target and that no node process is left.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import psutil
import pytest

from cardiac_copilot_ros.bench import closed_loop as clb

PER_PLANE_KEYS = {"success_rate", "median_translation_mm", "median_rotation_deg", "median_time_s",
                  "median_path_mm", "success_ci95", "false_reached", "median_final_error_mm",
                  "median_final_error_deg"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    clb.add_arguments(parser)
    return parser.parse_args(argv)


def _episode(mode: str, plane: str, trans: float, rot: float, converged: bool, t: float | None,
             false_reached: bool = False) -> clb.Episode:
    return clb.Episode(mode=mode, plane=plane, subject_seed=9000, start_offset=[0.0] * 6, start_translation_mm=30.0,
                       start_rotation_deg=40.0, end="converged" if converged else "time_limit", converged=converged,
                       time_to_converge_s=t, duration_s=t or 30.0, translation_mm=trans, rotation_deg=rot,
                       path_mm=40.0, success=trans <= 5.0 and rot <= 5.0, guidance_hz=30.0,
                       false_reached=false_reached)


def test_report_layout_and_statistics() -> None:
    eps = [_episode("fused", "PLAX", 2.0, 3.0, True, 6.0), _episode("fused", "PLAX", 9.0, 3.0, False, None),
           _episode("fused", "PSAX-MV", 1.0, 6.0, True, 8.0, false_reached=True),
           _episode("per_frame", "PLAX", 4.0, 4.0, True, 7.0), _episode("oracle", "PLAX", 0.1, 1.0, True, 4.0)]
    doc = clb.build_report(eps, {"seed": 0})
    json.dumps(doc, allow_nan=False)
    assert doc["default_mode"] == "fused"
    assert doc["false_reached"] == 1 and doc["modes"]["fused"]["false_reached"] == 1
    assert doc["per_plane"]["PSAX-MV"]["false_reached"] == 1 and doc["per_plane"]["PLAX"]["false_reached"] == 0
    lo, hi = doc["per_plane"]["PLAX"]["success_ci95"]   # 1 of 2: Wilson 9.5 % .. 90.5 %
    assert lo == pytest.approx(0.0945, abs=1e-3) and hi == pytest.approx(0.9055, abs=1e-3)
    cmp = doc["fused_vs_per_frame"]
    assert cmp["per_plane"]["PLAX"]["median_final_error_mm"] == {"fused": 5.5, "per_frame": 4.0,
                                                                 "change": pytest.approx(0.375)}
    assert "| PLAX | 5.5 / 4.0 | +38 % |" in clb.format_comparison(cmp)
    assert doc["success_rate"] == pytest.approx(1 / 3)
    assert set(doc["per_plane"]) == {"PLAX", "PSAX-MV"}
    plax = doc["per_plane"]["PLAX"]
    assert PER_PLANE_KEYS <= set(plax)
    assert plax["success_rate"] == 0.5 and plax["median_translation_mm"] == 5.5
    assert plax["median_time_s"] == 6.0  # converged episodes only
    assert doc["per_plane"]["PSAX-MV"]["success_rate"] == 0.0  # 6 deg > 5 deg
    assert set(doc["modes"]) == {"fused", "per_frame", "oracle"}
    assert doc["modes"]["oracle"]["success_rate"] == 1.0
    table = clb.format_table(doc["modes"], (5.0, 5.0))
    assert "oracle guidance" in table and "| PSAX-MV |" in table and table.count("| all |") == 3
    assert "[9-91 %]" in table
    # without the fused mode the per-frame one is the default
    assert clb.build_report(eps[3:], {})["default_mode"] == "per_frame"
    assert clb.build_report(eps[3:], {})["fused_vs_per_frame"] is None


def test_held_episodes_count_in_the_time_to_stop_not_in_the_time_to_reached() -> None:
    """An honest "not reached" (the servo holds at its surveyed target, end "held") stops the probe as
    "plane reached" does: both count in the time to stop; only reached ones in the time to converge."""
    reached = _episode("fused", "PLAX", 2.0, 3.0, True, 9.0)
    reached.time_to_stop_s = 9.0
    held = _episode("fused", "PLAX", 6.0, 3.0, False, None)
    held.end, held.time_to_stop_s = "held", 12.0
    s = clb.build_report([reached, held], {})["modes"]["fused"]
    assert s["median_time_s"] == 9.0 and s["median_time_to_stop_s"] == 10.5
    assert s["ends"] == {"converged": 1, "held": 1} and s["false_reached"] == 0
    assert "| 9.0 | 10.5 |" in clb.format_table({"fused": s}, (5.0, 5.0))


def test_wilson_interval_and_seed_lists() -> None:
    assert clb.wilson_interval(0, 0) is None
    lo, hi = clb.wilson_interval(0, 6)
    assert lo == 0.0 and hi == pytest.approx(0.390, abs=1e-3)
    lo, hi = clb.wilson_interval(18, 18)
    assert hi == 1.0 and lo == pytest.approx(0.824, abs=1e-3)
    assert clb.parse_seeds("1,2,5") == [1, 2, 5]
    assert clb.parse_seeds("100-105") == [100, 101, 102, 103, 104, 105]
    assert clb.parse_seeds("7, 3-4,3") == [3, 4, 7]
    for bad in ("", "5-3", "a", "1,,x", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            clb.parse_seeds(bad)


def test_arguments() -> None:
    args = _parse(["--planes", "plax,psax-av", "--servo-params", "gain_linear=2", "converge_latch=true",
                   "--no-oracle", "--episodes", "2"])
    assert args.modes == list(clb.MODES) and args.subject_seeds is None and args.dreamer is None
    assert _parse(["--subject-seeds", "100-102", "--modes", "oracle,per-frame"]).subject_seeds == [100, 101, 102]
    assert _parse(["--modes", "oracle,per-frame"]).modes == ["per_frame", "oracle"]
    assert dict(_parse(["--guidance-params", "fusion_time_constant_s=3"]).guidance_params) == {
        "fusion_time_constant_s": 3.0}
    with pytest.raises(SystemExit):
        _parse(["--modes", "dreamer"])
    assert args.planes == ["PLAX", "PSAX-AV"]
    assert dict(args.servo_params) == {"gain_linear": 2.0, "converge_latch": True}
    assert args.oracle is False and args.episodes == 2 and args.time_limit_s == 30.0
    assert _parse(["--planes", "a4c"]).planes == ["A4C"]    # the simulator's apical view
    with pytest.raises(SystemExit):
        _parse(["--planes", "A2C"])                         # not simulated


def test_fine_bundle_pairing(tmp_path: Path) -> None:
    coarse = tmp_path / "default.pt"
    assert clb.fine_bundle_for(None, True, coarse) is None             # no fine.pt beside it
    (tmp_path / "fine.pt").write_bytes(b"x")
    assert clb.fine_bundle_for(None, True, coarse) == tmp_path / "fine.pt"
    assert clb.fine_bundle_for(None, False, coarse) is None            # a bundle of the user's own: no pairing
    assert clb.fine_bundle_for("none", True, coarse) is None
    assert clb.fine_bundle_for("~/f.pt", False, coarse) == Path("~/f.pt").expanduser()


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert clb.run(_parse(["--bundle", str(tmp_path / "nope.pt")])) == 2
    assert "not found" in capsys.readouterr().err
    assert clb.run(_parse(["--fine-bundle", str(tmp_path / "nope.pt")])) == 2
    assert "fine bundle not found" in capsys.readouterr().err
    assert clb.run(_parse(["--servo-params", "gain_linaer=2"])) == 2
    assert "gain_linaer" in capsys.readouterr().err
    assert clb.run(_parse(["--servo-params", "survey_poses=4.5"])) == 2
    assert "must be an integer" in capsys.readouterr().err
    # integer servo parameters reach servo_node as integers (it declares them INTEGER), the rest as floats
    assert clb._as_servo_type("survey_poses", 4.0) == 4 and isinstance(clb._as_servo_type("survey_poses", 4.0), int)
    assert isinstance(clb._as_servo_type("verify_step_m", 0.0), float)
    assert clb.run(_parse(["--subject-seeds", "1,2", "--episodes", "2"])) == 2
    assert "not both" in capsys.readouterr().err


def test_servo_params_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--servo-params-file: the shipped profiles read as servo parameters (node-only ones left out);
    --servo-params still wins; a broken file is a clear error before any node starts."""
    repo = Path(__file__).resolve().parent.parent
    profile = dict(clb.servo_params_from_file(repo / "config" / "servo_final_approach.yaml"))
    assert profile["survey_poses"] == 4.0 and profile["converge_linear_m"] == 0.0015
    defaults = dict(clb.servo_params_from_file(repo / "config" / "servo.yaml"))
    assert "probe_frame" not in defaults and defaults["stop_mode"] == "immediate"
    own = tmp_path / "own.yaml"
    own.write_text("/**:\n  ros__parameters:\n    gain_linear: 1.5\n")
    assert clb.servo_params_from_file(own) == [("gain_linear", 1.5)]
    for text, why in (("copilot_servo: [1, 2]\n", "ros__parameters"), ("a: [\n", "cannot read"),
                      ("copilot_servo:\n  ros__parameters:\n    gain_linear: [1]\n", "gain_linear")):
        own.write_text(text)
        assert clb.run(_parse(["--servo-params-file", str(own)])) == 2
        assert why in capsys.readouterr().err
    own.write_text("copilot_servo:\n  ros__parameters:\n    gain_linaer: 1.0\n")
    assert clb.run(_parse(["--servo-params-file", str(own)])) == 2
    assert "gain_linaer" in capsys.readouterr().err
    assert clb.run(_parse(["--servo-params-file", str(tmp_path / "missing.yaml")])) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cardiac_copilot_ros.model.bundle import make_untrained_bundle

    return make_untrained_bundle(tmp_path_factory.mktemp("bundle") / "untrained32.pt", backbone="resnet18",
                                 input_size=(32, 32))


def _node_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("cardiac_copilot_ros.nodes" in a for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_short_episodes_over_dds(untrained_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    limit_s = 4.0
    out = tmp_path / "closed_loop.json"
    # a lenient pose watchdog: on a loaded shared machine a starved node process can miss 1.5 s of poses
    args = _parse(["--bundle", str(untrained_bundle), "--subject-seeds", str(clb.HELD_OUT_SEED), "--planes", "PSAX-AV",
                   "--time-limit-s", str(limit_s), "--image-size", "64", "--settle-s", "0.3",
                   "--servo-params", "probe_pose_timeout_s=5.0",
                   "--json", str(out), "--log-dir", str(tmp_path / "logs"), "--quiet"])
    assert clb.run(args) == 0
    assert not _node_children(), "node processes left behind"
    printed = capsys.readouterr().out
    assert "model, fused target" in printed and "model, per frame" in printed and "oracle guidance" in printed
    assert "Fused target vs per-frame guidance" in printed and "false 'plane reached'" in printed

    doc = json.loads(out.read_text())
    assert isinstance(doc["success_rate"], float) and 0.0 <= doc["success_rate"] <= 1.0
    assert doc["default_mode"] == "fused"
    assert PER_PLANE_KEYS <= set(doc["per_plane"]["PSAX-AV"])
    assert set(doc["modes"]) == {"fused", "per_frame", "oracle"}
    assert isinstance(doc["false_reached"], int) and doc["fused_vs_per_frame"] is not None
    for summary in doc["modes"].values():
        assert 0.0 <= summary["success_rate"] <= 1.0
        assert PER_PLANE_KEYS <= set(summary["per_plane"]["PSAX-AV"])
    assert doc["config"]["subject_seeds"] == [clb.HELD_OUT_SEED]
    assert "Model error in the loop" in printed
    assert doc["config"]["servo_params"]["max_travel_m"] == clb.BENCH_SERVO_PARAMS["max_travel_m"]
    assert doc["config"]["servo_params"]["probe_pose_timeout_s"] == 5.0

    eps = doc["episodes"]
    assert [e["mode"] for e in eps] == ["fused", "per_frame", "oracle"]
    assert len({tuple(e["start_offset"]) for e in eps}) == 1  # every mode from the same start
    for e in eps:
        assert e["end"] in ("converged", "time_limit"), (e, (tmp_path / "logs" / "servo.log").read_text()[-2000:])
        assert e["duration_s"] <= limit_s + 1.0
        for key in ("translation_mm", "rotation_deg", "path_mm", "start_translation_mm", "start_rotation_deg"):
            assert math.isfinite(e[key]) and e[key] >= 0.0, (key, e)
        assert e["success"] == (e["translation_mm"] <= 5.0 and e["rotation_deg"] <= 5.0)
        if e["converged"]:   # false_reached: judged on the pose when plane_reached arrived
            assert e["false_reached"] == (e["reached_translation_mm"] > 5.0 or e["reached_rotation_deg"] > 5.0)
        else:
            assert e["false_reached"] is False and e["reached_translation_mm"] is None
        guidance_errors = [e[f"{w}_guidance_error_{u}"] for w in ("start", "final") for u in ("mm", "deg")]
        if e["mode"] == "oracle":
            assert guidance_errors == [None] * 4 and e["guidance_hz"] is None
        else:  # the model's open-loop error in the loop, measured against the simulator's truth
            assert all(math.isfinite(v) and v >= 0.0 for v in guidance_errors), e
            assert e["guidance_hz"] > 0.0
    oracle = eps[2]
    # with the true remaining motion as guidance the loop closes: the probe moves toward the target
    assert oracle["path_mm"] > 1.0
    assert oracle["translation_mm"] < oracle["start_translation_mm"] or oracle["translation_mm"] < 1.0
    assert oracle["rotation_deg"] < oracle["start_rotation_deg"]


@pytest.mark.slow
def test_oracle_reaches_every_plane(untrained_bundle: Path, tmp_path: Path) -> None:
    """Realistic settings: with perfect guidance, servo + simulator reach the plane from every start."""
    out = tmp_path / "closed_loop.json"
    args = _parse(["--bundle", str(untrained_bundle), "--episodes", "3", "--modes", "oracle",
                   "--json", str(out), "--quiet"])
    assert clb.run(args) == 0
    doc = json.loads(out.read_text())
    oracle = doc["modes"]["oracle"]
    assert oracle["success_rate"] == 1.0, doc["episodes"]
    assert oracle["converged_rate"] == 1.0
    assert oracle["false_reached"] == 0
    assert oracle["median_time_s"] < 15.0
