"""``cardiac-copilot bench servo``: the real ServoController with true guidance and an ideal probe (no ROS)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cardiac_copilot_ros.bench import servo as bs


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bs.add_arguments(parser)
    return parser.parse_args(argv)


def test_profiles_reach_the_plane_and_the_survey_costs_time(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "servo.json"
    assert bs.run(_parse(["--starts", "2", "--json", str(out)])) == 0
    table = capsys.readouterr().out
    assert "| bench parameters only | 2 | 2 |" in table and "| servo_final_approach.yaml | 2 | 2 |" in table
    rows = {name: p["summary"] for name, p in json.loads(out.read_text())["profiles"].items()}
    plain, survey = rows["bench parameters only"], rows["servo_final_approach.yaml"]
    # true guidance: both end on the plane; the survey visits 4 poses first, so it takes longer
    assert survey["median_final_error_mm"] < 2.0 and survey["median_final_error_deg"] < 2.0
    assert plain["median_final_error_mm"] < 1.0
    assert survey["median_time_s"] > plain["median_time_s"] + 2.0


def test_overrides_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offset = bs.start_offsets(1, 3)[0]
    assert abs(offset[2]) <= 8.0 and all(abs(v) <= 40.0 for v in offset)
    # a slower law takes longer on the same start
    from cardiac_copilot_ros.servo import ServoConfig

    base = ServoConfig(**bs.BENCH_SERVO_PARAMS)
    fast = bs.run_episode(base, offset)["time_to_reached_s"]
    slow = bs.run_episode(base.updated(gain_linear=0.5, gain_angular=0.5), offset)["time_to_reached_s"]
    assert fast is not None and slow is not None and slow > fast + 0.5
    assert bs.run(_parse(["--starts", "1", "--profiles", "none", "--servo-params", "gain_linaer=1"])) == 2
    assert "gain_linaer" in capsys.readouterr().err
    assert bs.run(_parse(["--profiles", str(tmp_path / "missing.yaml")])) == 2
    assert "cannot read" in capsys.readouterr().err
    assert bs.run(_parse(["--starts", "0"])) == 2
