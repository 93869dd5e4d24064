"""guidance_node input guards without a graph: transport losses estimated from stamp gaps."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy not installed")

from cardiac_copilot_ros.nodes.guidance_node import MAX_GAP_PERIODS, _StampGaps

PERIOD_NS = 33_333_333


def _stream(n: int, lost: set[int], jitter_ns: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_000_000_000_000
    return [t0 + k * PERIOD_NS + int(rng.integers(-jitter_ns, jitter_ns + 1)) for k in range(n) if k not in lost]


@pytest.mark.parametrize("loss", [0.0, 0.1, 0.4, 0.6])
def test_lost_frames_counted_from_stamp_gaps(loss: float) -> None:
    """40 % lost over best effort (seen with large colour frames) is counted exactly, with jitter."""
    rng = np.random.default_rng(1)
    n = 600
    lost = {k for k in range(20, n - 1) if rng.random() < loss}      # the first 20: estimate the period
    gaps = _StampGaps()
    counted = sum(gaps.add(s) for s in _stream(n, lost, jitter_ns=3_000_000))
    assert counted == len(lost)
    assert gaps.period_ns == pytest.approx(PERIOD_NS, rel=0.02)


def test_pauses_restarts_and_duplicates_count_nothing() -> None:
    gaps = _StampGaps()
    stamps = _stream(40, set(), 0)
    assert sum(gaps.add(s) for s in stamps) == 0
    assert gaps.add(stamps[-1]) == 0                                  # repeated stamp
    pause = stamps[-1] + (MAX_GAP_PERIODS + 5) * PERIOD_NS
    assert gaps.add(pause) == 0 and gaps.period_ns is None            # a pause: estimate starts afresh
    assert gaps.add(pause + 2 * PERIOD_NS) == 0                       # no estimate yet: nothing guessed
    assert gaps.add(stamps[0]) == 0                                   # backwards (bag looped): restart
    more = [stamps[0] + k * 2 * PERIOD_NS for k in range(1, 30)]      # the stream comes back at half rate
    assert sum(gaps.add(s) for s in more) == 0
    assert gaps.period_ns == pytest.approx(2 * PERIOD_NS)
