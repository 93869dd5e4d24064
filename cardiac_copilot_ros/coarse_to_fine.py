"""Coarse to fine: which model guides, the coarse one (whole start range) or the fine one (last centimetre).

A single regression over the closed loop's whole start range (+-40 mm, +-40 deg) points the right
way from far but keeps about a centimetre of error near the target (issue 12). A second model of the
same kind trained only on a narrow range around the target (preset ``fine``: +-15 mm, +-15 deg) is
precise there and meaningless far away. :class:`StageSelector` decides, frame by frame, which one
runs (one model per frame, so the latency stays that of one model):

* ``coarse`` (start, and after every reset): the coarse model's estimates feed the coarse fusion;
  once that fused target is known (spread finite) and within ``enter_mm`` / ``enter_deg`` of the
  probe, the stage switches to ``fine`` and remembers the coarse target (the *anchor*);
* ``fine``: the fine model's estimates feed a fusion of their own (started empty at the switch);
  the stage falls back to ``coarse`` when the probe or the fine fused target gets farther than
  ``exit_mm`` / ``exit_deg`` from the anchor (outside what the fine model was trained on, or the
  fine model disagrees with the coarse one: trust neither blindly and start over), and on a reset
  (plane switch, gap, ``~/reset_target``, patient moved).

Distances are a translation norm (mm) and a geodesic rotation angle (deg) between 4x4 poses in mm.
No rclpy here: the guidance node holds one selector per target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .target_fusion import FusedTarget, FusionUpdate, TargetFusion, check_positive_fields, pose_residual, updated_config

STAGES = ("coarse", "fine")


@dataclass(frozen=True)
class StageConfig:
    """Hand-over thresholds between the coarse and the fine model (defaults for the ``fine`` preset)."""

    enter_mm: float = 10.0    # coarse fused target within this [mm] of the probe ...
    enter_deg: float = 10.0   # ... and within this [deg] -> fine
    exit_mm: float = 25.0     # probe or fine target farther than this [mm] from the anchor -> coarse
    exit_deg: float = 25.0    # ... or farther than this [deg]

    def validate(self) -> StageConfig:
        """Raise ValueError naming the first bad field; return self."""
        check_positive_fields(self)
        if self.exit_mm < self.enter_mm or self.exit_deg < self.enter_deg:
            raise ValueError("exit thresholds must be at least the enter thresholds (hysteresis)")
        return self

    def updated(self, **changes: float) -> StageConfig:
        """A validated copy with ``changes`` applied (ValueError if invalid)."""
        return updated_config(self, "stage", changes)


@dataclass
class StageCounters:
    """Monotonic counters for diagnostics."""

    to_fine: int = 0
    to_coarse: int = 0
    coarse_frames: int = 0
    fine_frames: int = 0


class StageSelector:
    """The coarse/fine state machine (module docstring). Not thread-safe: callers serialise."""

    def __init__(self, config: StageConfig | None = None) -> None:
        self.config = (config or StageConfig()).validate()
        self.stage = "coarse"
        self.anchor: np.ndarray | None = None  # coarse fused target (4x4, mm) at the switch to fine
        self.last_change = "start"
        self.counters = StageCounters()

    def configure(self, config: StageConfig) -> None:
        self.config = config.validate()

    def reset(self, reason: str) -> None:
        """Back to ``coarse`` (e.g. the fused estimates were reset)."""
        if self.stage != "coarse":
            self.counters.to_coarse += 1
        self.stage, self.anchor, self.last_change = "coarse", None, f"coarse: {reason}"

    def count(self, stage: str) -> None:
        if stage == "fine":
            self.counters.fine_frames += 1
        else:
            self.counters.coarse_frames += 1

    def after_coarse(self, T_probe_mm: np.ndarray, fused: FusedTarget | None) -> str | None:
        """After a coarse estimate was fused: switch to fine when the fused target is known and
        near the probe. Returns the reason of a switch, else None."""
        if self.stage != "coarse" or fused is None or not fused.known:
            return None
        d_mm, phi_deg = pose_residual(T_probe_mm, fused.T_mm)
        cfg = self.config
        if d_mm <= cfg.enter_mm and phi_deg <= cfg.enter_deg:
            self.stage, self.anchor = "fine", np.array(fused.T_mm, dtype=np.float64)
            self.counters.to_fine += 1
            self.last_change = (f"fine: coarse target {d_mm:.1f} mm / {phi_deg:.1f} deg away "
                                f"(enter {cfg.enter_mm:g} mm / {cfg.enter_deg:g} deg)")
            return self.last_change
        return None

    def after_fine(self, T_probe_mm: np.ndarray, fused: FusedTarget | None) -> str | None:
        """After a fine estimate was fused: back to coarse when the probe or the fine target left
        the anchor's neighbourhood. Returns the reason of a switch, else None."""
        if self.stage != "fine" or self.anchor is None:
            return None
        cfg = self.config
        for what, T in (("probe", T_probe_mm), ("fine target", None if fused is None else fused.T_mm)):
            if T is None:
                continue
            d_mm, phi_deg = pose_residual(T, self.anchor)
            if d_mm > cfg.exit_mm or phi_deg > cfg.exit_deg:
                self.reset(f"{what} {d_mm:.1f} mm / {phi_deg:.1f} deg from the coarse target "
                           f"(exit {cfg.exit_mm:g} mm / {cfg.exit_deg:g} deg)")
                return self.last_change
        return None

    def hand_over(self, stage: str, update: FusionUpdate, T_probe_mm: np.ndarray, coarse: TargetFusion,
                  fine: TargetFusion) -> str | None:
        """After ``stage``'s estimate went into its fusion (``update``): count the frame, switch the stage
        when due, and restart the fusion of the stage being entered (the fine model starts from nothing;
        back in coarse, no ping-pong on old coarse estimates). A reset of the fine estimates (gap, patient
        moved) sends the stage back to coarse. Returns the reason of a switch, else None."""
        self.count(stage)
        if stage == "coarse":
            switch = self.after_coarse(T_probe_mm, update.fused)
            if switch:
                fine.reset("coarse-to-fine: fine stage", key_change=True)
            return switch
        if update.reset:
            self.reset(f"fine estimate reset ({update.reset})")
            switch = self.last_change
        else:
            switch = self.after_fine(T_probe_mm, update.fused)
        if switch:
            coarse.reset("coarse-to-fine: back to coarse", key_change=True)
        return switch


__all__ = ["STAGES", "StageConfig", "StageCounters", "StageSelector"]
