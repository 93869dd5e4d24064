"""``cardiac-copilot bench closed-loop``: does the probe reach the plane when the loop is closed?

What runs (over real DDS, each node in its own process, as in a deployment):

* ``scanner_sim_node`` on a held-out subject (seeds ``--subject-seed`` + k, default 9000 + k, or
  the list / range ``--subject-seeds``: the default model is trained on seeds 20000+ and validated on 8000+), restarted
  for each subject (``subject_seed`` is read-only); it stands in for MoveIt Servo and the arm;
* ``guidance_node`` with the bundle, reconfigured per episode (``target_plane``, ``guidance_mode``:
  ``fused`` = the fused target estimate, the node's default, or ``per_frame`` = each frame's
  prediction alone; its fused estimate is reset through ``~/reset_target`` at each fused episode);
* ``servo_node`` (``copilot_servo``) on ``guidance``, and for the oracle mode a second servo
  (``copilot_servo_oracle``) on ``oracle_guidance``, which this process publishes from the
  simulator's true probe pose and true target (the remaining motion a perfect model would
  predict). Only one servo is enabled at a time; both command ``servo_node/delta_twist_cmds``.

An episode: teleport the probe to a random start within the demonstration range
(``sim.expert.random_start_offset``: +-40 mm in x, y, +-8 mm in z, +-40 deg per angle) by setting
``start_offset`` on the simulator, let the guidance settle, enable the servo, and wait until the
servo reports ``plane_reached`` or the time limit passes (the simulator runs in real time, so
simulated = wall time); then disable and measure the final probe pose against the simulator's
``~/true_target_pose`` (translation mm, rotation as one geodesic angle in deg). Success: both
within ``--success-mm`` / ``--success-deg`` (5 mm, 5 deg). Every mode runs from the same starts.

The bench process is the orchestrator: an rclpy node of its own (parameter services, ``~/enable``,
``~/status``, ``~/plane_reached``, ``probe_pose``). It inherits ``ROS_DOMAIN_ID`` and
``ROS_AUTOMATIC_DISCOVERY_RANGE`` from the caller (make and .ci/run set them); when they are unset
it uses LOCALHOST and a random domain, for itself and its children.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..planes import PLANE_NAMES, order_views, parse_plane
from ..processes import stop_process
from ..rollout import wilson_interval
from ..servo import HELD_NOT_REACHED
from ..sim.phantom import sim_view

NAMESPACE = "/closed_loop_bench"
#: First held-out subject seed (the default model's training data uses seeds 0-39).
HELD_OUT_SEED = 9000
#: fused: guidance_node guidance_mode fused (its default); per_frame: each frame's prediction alone
#: (the guidance before the fused target); oracle: the true remaining motion.
MODES = ("fused", "per_frame", "oracle")
MODE_TITLES = {"fused": "model, fused target", "per_frame": "model, per frame", "oracle": "oracle guidance"}
MODEL_MODES = ("fused", "per_frame")
SERVO_NODE = "copilot_servo"
ORACLE_SERVO_NODE = "copilot_servo_oracle"
SIM_NODE = "scanner_sim_node"
GUIDANCE_NODE = "guidance_node"
PROBE_FRAME = "us_probe"
BASE_FRAME = "panda_link0"   # the simulator's and the servo's default base_frame
#: An episode ends this long [s] after the servo began to hold at a surveyed target without "plane reached"
#: (servo.HELD_NOT_REACHED; end "held": the probe stays there, the servo says why).
HELD_END_S = 1.0

#: Servo parameters of the bench (on top of config/servo.yaml's defaults), and why:
#: twice the shipped speed and acceleration limits, so that a 40 mm / 40 deg start converges well
#: within the time limit; a workspace that contains every start of the demonstration range
#: (up to 57 mm and about 70 deg away), so that the workspace stop only catches a model leading away;
#: a pose watchdog of 1.5 s instead of 0.5 s, because on a shared 2-core machine a starved process
#: can miss 0.5 s of poses (a machine artefact, not a guidance failure).
BENCH_SERVO_PARAMS: dict[str, float] = {
    "max_linear_speed_mps": 0.04,
    "max_angular_speed_rps": 0.4,
    "max_linear_accel_mps2": 0.1,
    "max_angular_accel_rps2": 1.0,
    "max_travel_m": 0.1,
    "max_rotation_rad": 1.6,
    "probe_pose_timeout_s": 1.5,
}


# ---------------------------------------------------------------------------------------
# Results (no rclpy)
# ---------------------------------------------------------------------------------------

@dataclass
class Episode:
    """One closed-loop run from a start offset toward a plane."""

    mode: str
    plane: str
    subject_seed: int
    start_offset: list[float]          # action from the target (mm, deg)
    start_translation_mm: float
    start_rotation_deg: float
    end: str                            # converged | held | time_limit | workspace | fault | refused
    converged: bool                     # the servo reported plane_reached
    time_to_converge_s: float | None    # enable -> plane_reached (includes the servo's hold time)
    duration_s: float                   # enable -> end
    translation_mm: float               # final probe pose vs the true target
    rotation_deg: float
    path_mm: float                      # probe path length while enabled
    success: bool
    guidance_hz: float | None           # guidance messages per second (model modes)
    # open-loop model error (predicted vs true remaining motion) at the start and at the final pose
    start_guidance_error_mm: float | None = None
    start_guidance_error_deg: float | None = None
    final_guidance_error_mm: float | None = None
    final_guidance_error_deg: float | None = None
    # the probe pose vs the true target when plane_reached arrived (None: not reached)
    reached_translation_mm: float | None = None
    reached_rotation_deg: float | None = None
    false_reached: bool = False         # reached reported while beyond the success tolerance
    use_dreamer: bool | None = None
    #: the servo's last ~/status reason before the end, and its final-approach check / survey result
    servo_reason: str | None = None
    final_approach: str | None = None
    #: enable -> the servo stopped moving the probe on its own: "plane reached", or holding at the surveyed
    #: target without it (its final-approach survey failed: an honest "not reached")
    time_to_stop_s: float | None = None

    def row(self) -> str:
        return (f"{self.mode:8s} {self.plane:8s} seed {self.subject_seed}: {self.end:10s} "
                f"{self.translation_mm:6.1f} mm {self.rotation_deg:5.1f} deg in {self.duration_s:4.1f} s"
                f"{' OK' if self.success else ''}{' FALSE REACHED' if self.false_reached else ''}")


def parse_seeds(text: str) -> list[int]:
    """``1,2,5`` or ``100-105`` (inclusive) or a mix (``1,3,10-12``) -> sorted unique seeds."""
    seeds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                seeds.update(range(a, b + 1))
            else:
                seeds.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad subject seeds {part!r}: use a list 1,2,5 or a range "
                                             "100-105") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"bad subject seeds {text!r}: need one or more seeds >= 0")
    return sorted(seeds)


def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def summarize(episodes: Sequence[Episode]) -> dict[str, Any]:
    """Success rate overall and per plane, with medians (None where there is nothing to take)."""
    def stats(eps: Sequence[Episode]) -> dict[str, Any]:
        n = len(eps)
        k = sum(e.success for e in eps)
        ci = wilson_interval(k, n)
        return {
            "episodes": n,
            "successes": k,
            "success_rate": k / n if n else None,
            "success_ci95": None if ci is None else [ci[0], ci[1]],
            "false_reached": sum(e.false_reached for e in eps),
            "median_final_error_mm": _median([e.translation_mm for e in eps]),
            "median_final_error_deg": _median([e.rotation_deg for e in eps]),
            "converged_rate": float(np.mean([e.converged for e in eps])) if n else None,
            "median_translation_mm": _median([e.translation_mm for e in eps]),
            "median_rotation_deg": _median([e.rotation_deg for e in eps]),
            "median_time_s": _median([e.time_to_converge_s for e in eps if e.converged]),
            "median_time_to_stop_s": _median([e.time_to_stop_s for e in eps]),
            "median_path_mm": _median([e.path_mm for e in eps]),
            "median_start_guidance_error_mm": _median([e.start_guidance_error_mm for e in eps]),
            "median_start_guidance_error_deg": _median([e.start_guidance_error_deg for e in eps]),
            "median_final_guidance_error_mm": _median([e.final_guidance_error_mm for e in eps]),
            "median_final_guidance_error_deg": _median([e.final_guidance_error_deg for e in eps]),
            "median_guidance_hz": _median([e.guidance_hz for e in eps]),
            "ends": {k: sum(e.end == k for e in eps) for k in sorted({e.end for e in eps})},
        }

    out = stats(episodes)
    planes = order_views({e.plane for e in episodes})
    out["per_plane"] = {p: stats([e for e in episodes if e.plane == p]) for p in planes}
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(modes: dict[str, dict[str, Any]], limits: tuple[float, float]) -> str:
    """Markdown table, one row per mode and plane plus an 'all' row per mode."""
    head = (f"| mode | plane | episodes | success (<= {limits[0]:g} mm and <= {limits[1]:g} deg) [95 % Wilson] | "
            "median final translation (mm) | median final rotation (deg) | reached | false reached | "
            "median time to converge (s) | median time to stop (s) | median path (mm) |")
    lines = [head, "|" + "---|" * 11]
    for mode, summary in modes.items():
        rows = [*summary["per_plane"].items(), ("all", summary)]
        for plane, s in rows:
            ci = s.get("success_ci95")
            ci_text = "" if ci is None else f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f} %]"
            lines.append(
                f"| {MODE_TITLES.get(mode, mode)} | {plane} | {s['episodes']} | "
                f"{_fmt(None if s['success_rate'] is None else 100 * s['success_rate'], '.0f')} %{ci_text} | "
                f"{_fmt(s['median_translation_mm'], '.1f')} | {_fmt(s['median_rotation_deg'], '.1f')} | "
                f"{_fmt(None if s['converged_rate'] is None else 100 * s['converged_rate'], '.0f')} % | "
                f"{s.get('false_reached', 0)} | "
                f"{_fmt(s['median_time_s'], '.1f')} | {_fmt(s.get('median_time_to_stop_s'), '.1f')} | "
                f"{_fmt(s['median_path_mm'], '.0f')} |")
    return "\n".join(lines)


def format_guidance_table(modes: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the model's open-loop error (predicted vs true remaining motion) at the
    start and at the final pose, per model mode and plane."""
    lines = ["| mode | plane | guidance error at the start (mm / deg) | guidance error at the final pose "
             "(mm / deg) | guidance rate (Hz) |", "|" + "---|" * 5]
    for mode, summary in modes.items():
        if mode == "oracle":
            continue
        for plane, s in [*summary["per_plane"].items(), ("all", summary)]:
            lines.append(
                f"| {MODE_TITLES.get(mode, mode)} | {plane} | {_fmt(s['median_start_guidance_error_mm'], '.1f')} / "
                f"{_fmt(s['median_start_guidance_error_deg'], '.1f')} | "
                f"{_fmt(s['median_final_guidance_error_mm'], '.1f')} / "
                f"{_fmt(s['median_final_guidance_error_deg'], '.1f')} | {_fmt(s['median_guidance_hz'], '.0f')} |")
    return "\n".join(lines)


def build_report(episodes: Sequence[Episode], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: top-level ``success_rate`` / ``per_plane`` / ``false_reached`` of the default
    mode (fused, else per_frame), every mode under ``modes``, the fused-vs-per-frame comparison, the
    episodes, the config."""
    present = [m for m in MODES if any(e.mode == m for e in episodes)]
    modes = {m: summarize([e for e in episodes if e.mode == m]) for m in present}
    default = next((m for m in MODEL_MODES if m in modes), present[0] if present else None)
    doc: dict[str, Any] = {
        "success_rate": modes[default]["success_rate"] if default else None,
        "per_plane": modes[default]["per_plane"] if default else {},
        "false_reached": sum(e.false_reached for e in episodes),
        "default_mode": default,
        "fused_vs_per_frame": compare_fused(modes),
        "modes": modes,
        "episodes": [asdict(e) for e in episodes],
        "config": config,
    }
    return doc


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def compare_fused(modes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Median final error, fused vs per-frame: both medians and the relative change (negative = fused
    lower), overall and per plane; None unless both modes ran."""
    if "fused" not in modes or "per_frame" not in modes:
        return None

    def cmp(f: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("median_final_error_mm", "median_final_error_deg"):
            a, b = f.get(key), p.get(key)
            out[key] = {"fused": a, "per_frame": b,
                        "change": None if a is None or b is None or b == 0 else (a - b) / b}
        return out

    f, p = modes["fused"], modes["per_frame"]
    out = cmp(f, p)
    out["per_plane"] = {pl: cmp(f["per_plane"][pl], p["per_plane"][pl])
                        for pl in f["per_plane"] if pl in p["per_plane"]}
    return out


def format_comparison(cmp: dict[str, Any] | None) -> str:
    """One line per plane: median final error fused vs per-frame and the relative change."""
    if not cmp:
        return ""
    lines = ["| plane | median final translation, fused / per frame (mm) | change | median final rotation, "
             "fused / per frame (deg) | change |", "|" + "---|" * 5]
    for plane, c in [*cmp["per_plane"].items(), ("all", cmp)]:
        t, r = c["median_final_error_mm"], c["median_final_error_deg"]
        lines.append(f"| {plane} | {_fmt(t['fused'], '.1f')} / {_fmt(t['per_frame'], '.1f')} | "
                     f"{_fmt(None if t['change'] is None else 100 * t['change'], '+.0f')} % | "
                     f"{_fmt(r['fused'], '.1f')} / {_fmt(r['per_frame'], '.1f')} | "
                     f"{_fmt(None if r['change'] is None else 100 * r['change'], '+.0f')} % |")
    return "\n".join(lines)


def _planes(text: str) -> list[str]:
    try:
        return [sim_view(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _modes(text: str) -> list[str]:
    modes = [m.strip().replace("-", "_") for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(bad) or text!r}; choose from {', '.join(MODES)}")
    return [m for m in MODES if m in modes]


def _servo_param(text: str) -> tuple[str, float | bool | str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    try:
        return name, float(value)
    except ValueError:
        return name, value


def _as_servo_type(name: str, value: float | bool | str) -> float | bool | str | int:
    """``value`` as the type of the servo parameter ``name`` (an integer parameter must get an integer:
    servo_node declares it INTEGER and refuses a DOUBLE). ValueError if it does not fit."""
    from ..servo import ServoConfig

    default = getattr(ServoConfig(), name)
    if isinstance(default, bool) or isinstance(value, (bool, str)):
        return value
    if isinstance(default, int):
        if float(value) != int(value):
            raise ValueError(f"servo parameter {name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def typed_servo_params(pairs: list[tuple[str, float | bool | str]]) -> list[tuple[str, float | bool | str | int]]:
    """``pairs`` checked against ServoConfig's fields and given their types (:func:`_as_servo_type`).
    ValueError naming the unknown parameters or the badly typed one."""
    from dataclasses import fields

    from ..servo import ServoConfig

    known = {f.name for f in fields(ServoConfig)}
    unknown = sorted({name for name, _ in pairs} - known)
    if unknown:
        raise ValueError(f"unknown servo parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [(name, _as_servo_type(name, value)) for name, value in pairs]


#: servo_node parameters that are not ServoConfig's (frames, status period): the bench sets its own
NODE_ONLY_SERVO_PARAMS = ("probe_frame", "base_frame", "status_period_s")


def servo_params_from_file(path: Path) -> list[tuple[str, float | bool | str]]:
    """The servo parameters of a ROS 2 parameter file (``copilot_servo:`` or ``/**:`` then
    ``ros__parameters:``, as config/servo*.yaml), node-only ones left out. ValueError with the reason."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read servo parameter file {path}: {exc}") from exc
    section = None
    if isinstance(doc, dict):
        for node in ("copilot_servo", "/copilot_servo", "/**"):
            if isinstance(doc.get(node), dict) and isinstance(doc[node].get("ros__parameters"), dict):
                section = doc[node]["ros__parameters"]
                break
    if section is None:
        raise ValueError(f"{path}: no 'copilot_servo: ros__parameters:' (or '/**: ros__parameters:') mapping")
    out = []
    for name, value in section.items():
        if name in NODE_ONLY_SERVO_PARAMS:
            continue
        if not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{path}: servo parameter {name} must be a number, boolean or string, got {value!r}")
        out.append((str(name), value if isinstance(value, (bool, str)) else float(value)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, metavar="FILE",
                        help="model bundle (TorchScript .pt or ONNX .onnx); default: models/default.pt")
    parser.add_argument("--fine-bundle", default=None, metavar="FILE",
                        help="fine stage of coarse-to-fine (guidance_node fine_model_path; preset fine): default "
                             "models/fine.pt when --bundle is not given and that file exists; 'none' = off")
    parser.add_argument("--episodes", type=int, default=None, metavar="N",
                        help="episodes per plane and mode (default 3); episode k uses subject seed "
                             "--subject-seed + k (with --subject-seeds: one episode per listed seed)")
    parser.add_argument("--planes", type=_planes, default=list(PLANE_NAMES), metavar="PLANES",
                        help=f"comma-separated planes (default {','.join(PLANE_NAMES)}; the simulator also "
                             "has A4C, which needs a bundle trained on it)")
    parser.add_argument("--time-limit-s", type=float, default=30.0,
                        help="time limit per episode [s] (the simulator runs in real time; default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random start offsets (default 0)")
    parser.add_argument("--subject-seed", type=int, default=HELD_OUT_SEED,
                        help=f"first held-out subject seed (default {HELD_OUT_SEED}; the default model "
                             "trained on seeds 20000+, validated on 8000+)")
    parser.add_argument("--subject-seeds", type=parse_seeds, default=None, metavar="SEEDS",
                        help="the subjects, as a list (1,2,5) or a range (100-105, inclusive): one episode per "
                             "seed, plane and mode (instead of --subject-seed / --episodes)")
    parser.add_argument("--modes", type=_modes, default=list(MODES), metavar="MODES",
                        help=f"comma-separated modes (default {','.join(MODES)})")
    parser.add_argument("--dreamer", action=argparse.BooleanOptionalAction, default=None,
                        help="the model with the Dreamer refinement (default: when the bundle has one)")
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the servo on the true remaining motion (the loop's upper bound; "
                             "default on)")
    parser.add_argument("--servo-params", type=_servo_param, nargs="+", action="extend", default=[],
                        metavar="NAME=VALUE",
                        help="servo parameter overrides on top of the bench's "
                             f"({', '.join(f'{k}={v:g}' for k, v in BENCH_SERVO_PARAMS.items())})")
    parser.add_argument("--servo-params-file", type=Path, default=None, metavar="FILE",
                        help="servo parameters from a ROS 2 parameter file, e.g. config/servo_final_approach.yaml "
                             "(applied over the bench's, under --servo-params; frames and status period ignored)")
    parser.add_argument("--guidance-params", type=_servo_param, nargs="+", action="extend", default=[],
                        metavar="NAME=VALUE",
                        help="guidance_node parameter overrides, e.g. fusion_time_constant_s=3 (model modes)")
    parser.add_argument("--success-mm", type=float, default=5.0, help="success: final translation error [mm]")
    parser.add_argument("--success-deg", type=float, default=5.0,
                        help="success: final rotation error, one geodesic angle [deg]")
    parser.add_argument("--max-offset-mm", type=float, default=None,
                        help="start offset range in x, y [mm] (z: a fifth; default: the demonstrations' 40)")
    parser.add_argument("--max-offset-deg", type=float, default=None,
                        help="start offset range per angle [deg] (default: the demonstrations' 40)")
    parser.add_argument("--image-size", type=int, default=224, help="simulator image side [px] (default 224, "
                        "as `simulate` writes the training scans)")
    parser.add_argument("--pose-rate-hz", type=float, default=100.0,
                        help="simulated arm pose rate [Hz] (default 100: five Python processes share the "
                             "2 cores of the reference machine; the sim's own default is 250)")
    parser.add_argument("--settle-s", type=float, default=0.5,
                        help="wait after a teleport before enabling the servo [s] (fresh guidance)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="guidance node device")
    parser.add_argument("--startup-timeout-s", type=float, default=60.0,
                        help="seconds to wait for the nodes to come up")
    parser.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                        help="keep the node logs here (default: a temporary folder, shown on failure)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class BenchError(RuntimeError):
    """The bench cannot go on (a node failed to start or died)."""


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    """The caller's environment, with DDS kept on this machine and a domain when none is set."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _ros_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_ros_value(x) for x in v) + "]"
    return str(v)


class _Child:
    """A node in a child process, with its log file."""

    def __init__(self, module: str, params: dict[str, Any], log: Path, env: dict[str, str],
                 name: str | None = None, remaps: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", module, "--ros-args", "-r", f"__ns:={NAMESPACE}"]
        if name:
            cmd += ["-r", f"__node:={name}"]
        for k, v in params.items():
            cmd += ["-p", f"{k}:={_ros_value(v)}"]
        for k, v in (remaps or {}).items():
            cmd += ["-r", f"{k}:={v}"]
        self.label = name or module.rsplit(".", 1)[-1]
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.proc, timeout_s)


# ---------------------------------------------------------------------------------------
# The orchestrator node (rclpy imported lazily: the CLI loads this module without ROS)
# ---------------------------------------------------------------------------------------

class _Graph:
    """The bench's rclpy node: watches probe pose, true target and servos; calls their services."""

    def __init__(self, oracle_rate_hz: float = 30.0) -> None:
        import rclpy
        from geometry_msgs.msg import PoseStamped, TwistStamped
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from std_msgs.msg import Bool, String

        from ..nodes.lifecycle import BackgroundSpin

        self._rclpy = rclpy
        self.ctx = Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node("closed_loop_bench", namespace=NAMESPACE, context=self.ctx)
        self.lock = threading.Lock()
        self.pose: np.ndarray | None = None       # latest probe pose (4x4 mm)
        self.pose_count = 0
        self.target: np.ndarray | None = None     # latest true target (4x4 mm)
        self.path_mm = 0.0
        self.recording = False
        self.guidance_count = 0
        self.guidance: tuple[int, np.ndarray] | None = None   # latest (stamp ns, action mm/deg)
        self.oracle_target: np.ndarray | None = None   # publishing oracle guidance while set
        self.servo: dict[str, dict[str, Any]] = {n: {"reached": 0, "status": None} for n in
                                                 (SERVO_NODE, ORACLE_SERVO_NODE)}
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        status_qos = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        n = self.node
        n.create_subscription(PoseStamped, "probe_pose", self._on_pose, qos_profile_sensor_data)
        n.create_subscription(PoseStamped, f"{SIM_NODE}/true_target_pose", self._on_target, latched)
        n.create_subscription(TwistStamped, "guidance", self._on_guidance, qos_profile_sensor_data)
        for name in self.servo:
            n.create_subscription(Bool, f"{name}/plane_reached", lambda m, s=name: self._on_reached(s, m), latched)
            n.create_subscription(String, f"{name}/status", lambda m, s=name: self._on_status(s, m), status_qos)
        self._oracle_pub = n.create_publisher(TwistStamped, "oracle_guidance", 10)
        # the oracle's per-frame target estimates (a servo profile with survey_gate frame_target reads them)
        self._oracle_target_pub = n.create_publisher(PoseStamped, "oracle_frame_target_pose", 10)
        n.create_timer(1.0 / oracle_rate_hz, self._on_oracle_timer)
        self._clients: dict[tuple[str, str], Any] = {}
        # single-threaded: once the spin thread has joined, no callback is running (close() relies on it)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self._spin = BackgroundSpin(self.executor, name="closed-loop-bench-spin")

    # -- callbacks (executor threads)
    def _on_pose(self, msg: Any) -> None:
        from ..nodes.conversions import MessageError, pose_stamped_to_matrix

        try:
            _, T = pose_stamped_to_matrix(msg)
        except MessageError:
            return
        with self.lock:
            if self.recording and self.pose is not None:
                self.path_mm += float(np.linalg.norm(T[:3, 3] - self.pose[:3, 3]))
            self.pose = T
            self.pose_count += 1

    def _on_target(self, msg: Any) -> None:
        from ..nodes.conversions import MessageError, pose_stamped_to_matrix

        try:
            _, T = pose_stamped_to_matrix(msg)
        except MessageError:
            return
        with self.lock:
            self.target = T

    def _on_guidance(self, msg: Any) -> None:
        from ..nodes.conversions import MessageError, stamp_to_ns, twist_msg_to_action

        try:
            item = (stamp_to_ns(msg.header.stamp), twist_msg_to_action(msg))
        except MessageError:
            return
        with self.lock:
            self.guidance_count += 1
            self.guidance = item

    def guidance_after(self, stamp_ns: int, timeout_s: float = 2.0) -> np.ndarray | None:
        """The first guidance for an image acquired after ``stamp_ns`` (None on timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                g = self.guidance
            if g is not None and g[0] > stamp_ns:
                return g[1]
            time.sleep(0.01)
        return None

    def _on_reached(self, servo: str, msg: Any) -> None:
        if msg.data:
            with self.lock:
                self.servo[servo]["reached"] += 1

    def _on_status(self, servo: str, msg: Any) -> None:
        try:
            status = json.loads(msg.data)
        except ValueError:
            return
        if not isinstance(status, dict):
            return
        with self.lock:
            self.servo[servo]["status"] = status

    def _on_oracle_timer(self) -> None:
        from ..nodes.conversions import action_to_twist_stamped, matrix_to_pose_stamped
        from ..pose import relative_action

        with self.lock:
            T, target = self.pose, self.oracle_target
        if T is None or target is None:
            return
        action = relative_action(T, target)
        now_ns = self.node.get_clock().now().nanoseconds
        self._oracle_pub.publish(action_to_twist_stamped(action, now_ns, PROBE_FRAME))
        self._oracle_target_pub.publish(matrix_to_pose_stamped(target, now_ns, BASE_FRAME))

    # -- services (main thread)
    def _client(self, srv_type: Any, name: str) -> Any:
        key = (srv_type.__name__, name)
        if key not in self._clients:
            self._clients[key] = self.node.create_client(srv_type, name)
        return self._clients[key]

    def _call(self, srv_type: Any, name: str, request: Any, timeout_s: float) -> Any:
        client = self._client(srv_type, name)
        deadline = time.monotonic() + timeout_s
        while not client.service_is_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {NAMESPACE}/{name} not available")
            time.sleep(0.05)
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(max(0.1, deadline - time.monotonic())):
            client.remove_pending_request(future)
            raise TimeoutError(f"service {NAMESPACE}/{name} did not answer")
        return future.result()

    def set_params(self, node_name: str, values: dict[str, Any], timeout_s: float = 10.0) -> None:
        from rcl_interfaces.srv import SetParametersAtomically
        from rclpy.parameter import Parameter

        req = SetParametersAtomically.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        res = self._call(SetParametersAtomically, f"{node_name}/set_parameters_atomically", req, timeout_s)
        if not res.result.successful:
            raise BenchError(f"{node_name} refused {values}: {res.result.reason}")

    def trigger(self, service: str, timeout_s: float = 5.0) -> None:
        from std_srvs.srv import Trigger

        res = self._call(Trigger, service, Trigger.Request(), timeout_s)
        if not res.success:
            raise BenchError(f"{service} failed: {res.message}")

    def enable(self, servo: str, on: bool, timeout_s: float = 5.0) -> tuple[bool, str]:
        from std_srvs.srv import SetBool

        res = self._call(SetBool, f"{servo}/enable", SetBool.Request(data=on), timeout_s)
        return bool(res.success), str(res.message)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str,
                 children: Sequence[_Child] = (), required: bool = True, poll_s: float = 0.05) -> bool:
        """Wait until ``predicate()``; BenchError when a child exits, or on the timeout when ``required``
        (else False)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            for c in children:
                if not c.alive():
                    raise BenchError(f"{c.label} exited (code {c.proc.returncode}); log {c.log}:\n{c.tail()}")
            if time.monotonic() > deadline:
                if not required:
                    return False
                raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(poll_s)
        return True

    def close(self) -> None:
        self._spin.stop()
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.ctx)


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------

class _Bench:
    def __init__(self, args: argparse.Namespace, bundle: Path, has_dreamer: bool, log_dir: Path,
                 fine_bundle: Path | None = None) -> None:
        self.args = args
        self.bundle = bundle
        self.log_dir = log_dir
        self.env = _env()
        self.servo_params = {**BENCH_SERVO_PARAMS, **dict(args.servo_params)}
        self.use_dreamer = has_dreamer if args.dreamer is None else bool(args.dreamer) and has_dreamer
        self.modes = [m for m in args.modes if m != "oracle" or args.oracle]
        self.fine_bundle = fine_bundle  # fine stage of coarse-to-fine (guidance_node fine_model_path)
        self.children: dict[str, _Child] = {}
        self.graph: _Graph | None = None
        self._guidance_cfg: tuple[str, str] | None = None

    # -- processes
    def _start(self, key: str, module: str, params: dict[str, Any], name: str | None = None,
               remaps: dict[str, str] | None = None) -> None:
        self.children[key] = _Child(module, params, self.log_dir / f"{key}.log", self.env, name, remaps)

    def start_nodes(self) -> None:
        plane = self.args.planes[0]
        mode = next((m for m in self.modes if m in MODEL_MODES), "fused")
        self._start("guidance", "cardiac_copilot_ros.nodes.guidance_node",
                    {"model_path": str(self.bundle.resolve()), "target_plane": plane, "guidance_mode": mode,
                     "use_dreamer": self.use_dreamer, "publish_tf": False, "device": self.args.device,
                     "fine_model_path": str(self.fine_bundle.resolve()) if self.fine_bundle else "none",
                     **dict(self.args.guidance_params)})
        self._start("servo", "cardiac_copilot_ros.nodes.servo_node", self.servo_params)
        if "oracle" in self.modes:  # the oracle servo must not see the model's fused target spread
            self._start("servo_oracle", "cardiac_copilot_ros.nodes.servo_node", self.servo_params,
                        name=ORACLE_SERVO_NODE, remaps={"guidance": "oracle_guidance",
                                                        "target_pose_cov": "oracle_target_pose_cov",
                                                        "frame_target_pose": "oracle_frame_target_pose"})
        self._guidance_cfg = (plane, mode)
        self.graph = _Graph()

    def start_sim(self, subject_seed: int) -> None:
        old = self.children.pop("sim", None)
        if old is not None:
            old.stop()
        self._start("sim", "cardiac_copilot_ros.nodes.scanner_sim_node",
                    {"subject_seed": subject_seed, "target_plane": self.args.planes[0],
                     "image_size": self.args.image_size, "pose_rate_hz": float(self.args.pose_rate_hz),
                     "start_offset": [0.0] * 6})
        from ..sim.phantom import make_subject

        expected = make_subject(subject_seed).target_pose(self.args.planes[0])
        g = self.graph
        assert g is not None
        g.wait_for(lambda: g.target is not None and _close(g.target, expected), self.args.startup_timeout_s,
                   f"scanner_sim_node (subject {subject_seed})", list(self.children.values()))

    def wait_ready(self) -> None:
        g = self.graph
        assert g is not None
        kids = list(self.children.values())
        g.wait_for(lambda: g.pose_count > 0, self.args.startup_timeout_s, "probe_pose", kids)
        g.wait_for(lambda: g.guidance_count > 0, self.args.startup_timeout_s, "guidance from guidance_node", kids)
        for servo in self._servos():
            g.wait_for(lambda s=servo: g.servo[s]["status"] is not None, self.args.startup_timeout_s,
                       f"{servo} status", kids)

    def _servos(self) -> list[str]:
        return [SERVO_NODE] + ([ORACLE_SERVO_NODE] if "oracle" in self.modes else [])

    def stop_nodes(self) -> None:
        if self.graph is not None:
            for servo in self._servos():
                try:
                    self.graph.enable(servo, False, timeout_s=1.0)
                except Exception:  # best effort on the way out
                    pass
            self.graph.close()
            self.graph = None
        for c in self.children.values():
            c.stop()
        self.children.clear()

    # -- one episode
    def episode(self, mode: str, plane: str, subject_seed: int, offset: np.ndarray, target: np.ndarray
                ) -> Episode:
        from ..pose import action_to_matrix, pose_error

        args, g = self.args, self.graph
        assert g is not None
        kids = list(self.children.values())
        servo = ORACLE_SERVO_NODE if mode == "oracle" else SERVO_NODE
        if mode != "oracle" and self._guidance_cfg != (plane, mode):
            g.set_params(GUIDANCE_NODE, {"target_plane": plane, "guidance_mode": mode})
            self._guidance_cfg = (plane, mode)
        # teleport (plane first, so that the offset refers to this plane's target)
        g.set_params(SIM_NODE, {"target_plane": plane, "start_offset": [float(v) for v in offset]})
        start = target @ action_to_matrix(offset)
        g.wait_for(lambda: g.target is not None and _close(g.target, target), 10.0, f"{plane} true target", kids)
        g.wait_for(lambda: g.pose is not None and _close(g.pose, start), 10.0, "the teleported probe pose", kids)
        with g.lock:
            true_target = g.target.copy()
            g.oracle_target = true_target if mode == "oracle" else None
        start_mm, start_deg = (float(v) for v in pose_error(start, true_target))
        if mode == "fused":  # each episode starts without the previous one's target estimate
            g.trigger(f"{GUIDANCE_NODE}/reset_target")
        t_teleport_ns = time.time_ns()
        time.sleep(args.settle_s)
        err_start = (None, None)
        if mode != "oracle":
            err_start = _guidance_error(g.guidance_after(t_teleport_ns), start, true_target)

        with g.lock:
            g.path_mm, g.recording = 0.0, True
            reached0 = g.servo[servo]["reached"]
            g.servo[servo]["status"] = None  # only states published from now on count
            guidance0 = g.guidance_count
        t0 = time.monotonic()
        ok, message = g.enable(servo, True)
        for _ in range(20):  # a pose watchdog may refuse once right after the teleport
            if ok:
                break
            time.sleep(0.1)
            ok, message = g.enable(servo, True)
        end, t_conv, t_held = ("time_limit", None, None) if ok else ("refused", None, None)
        at_reached: tuple[float, float] | None = None
        while ok:
            elapsed = time.monotonic() - t0
            with g.lock:
                reached = g.servo[servo]["reached"] > reached0
                status = g.servo[servo]["status"] or {}
                pose_now = g.pose.copy()
            state = status.get("state")
            if reached:
                end, t_conv = "converged", elapsed
                at_reached = tuple(float(v) for v in pose_error(pose_now, true_target))
                break
            if state in ("workspace", "fault"):
                end = state
                break
            if str(status.get("reason", "")).startswith(HELD_NOT_REACHED):   # an honest "not reached"
                t_held = elapsed if t_held is None else t_held
                if elapsed - t_held >= HELD_END_S:
                    end = "held"
                    break
            else:
                t_held = None
            if elapsed >= args.time_limit_s:
                break
            for c in kids:
                if not c.alive():
                    raise BenchError(f"{c.label} exited (code {c.proc.returncode}); log {c.log}:\n{c.tail()}")
            time.sleep(0.02)
        duration = time.monotonic() - t0
        if end == "converged":   # ~/plane_reached may arrive before the ~/status that says why
            def status_converged() -> bool:
                with g.lock:
                    return (g.servo[servo]["status"] or {}).get("state") == "converged"
            g.wait_for(status_converged, 1.0, "the converged ~/status", kids, required=False, poll_s=0.02)
        with g.lock:
            last_status = dict(g.servo[servo]["status"] or {})
        g.enable(servo, False)
        time.sleep(0.3)  # zero twist delivered, last poses in
        with g.lock:
            g.recording = False
            g.oracle_target = None
            final = g.pose.copy()
            path = g.path_mm
            n_guidance = (g.guidance_count - guidance0) if mode != "oracle" else None
        trans, rot = (float(v) for v in pose_error(final, true_target))
        err_final = (None, None)
        if mode != "oracle":
            err_final = _guidance_error(g.guidance_after(time.time_ns()), final, true_target)
        return Episode(
            mode=mode, plane=plane, subject_seed=subject_seed, start_offset=[round(float(v), 3) for v in offset],
            start_translation_mm=start_mm, start_rotation_deg=start_deg, end=end if ok else f"refused: {message}",
            converged=end == "converged", time_to_converge_s=t_conv, duration_s=duration,
            translation_mm=trans, rotation_deg=rot, path_mm=path,
            success=bool(trans <= args.success_mm and rot <= args.success_deg),
            guidance_hz=None if n_guidance is None else n_guidance / (duration + 0.3),
            start_guidance_error_mm=err_start[0], start_guidance_error_deg=err_start[1],
            final_guidance_error_mm=err_final[0], final_guidance_error_deg=err_final[1],
            reached_translation_mm=None if at_reached is None else at_reached[0],
            reached_rotation_deg=None if at_reached is None else at_reached[1],
            false_reached=bool(at_reached is not None and (at_reached[0] > args.success_mm
                                                           or at_reached[1] > args.success_deg)),
            use_dreamer=None if mode == "oracle" else self.use_dreamer,
            servo_reason=last_status.get("reason"),
            final_approach=last_status.get("final_approach_survey") or last_status.get("final_approach_check"),
            time_to_stop_s=t_conv if t_conv is not None else (t_held if end == "held" else None))


def _guidance_error(predicted: np.ndarray | None, T_probe: np.ndarray, T_target: np.ndarray
                    ) -> tuple[float | None, float | None]:
    """Predicted vs true remaining motion at ``T_probe``: translation mm, geodesic deg."""
    from ..pose import action_to_matrix, pose_error, relative_action

    if predicted is None:
        return None, None
    truth = relative_action(T_probe, T_target)
    t, r = pose_error(action_to_matrix(predicted), action_to_matrix(truth))
    return float(t), float(r)


def _close(T_a: np.ndarray, T_b: np.ndarray, mm: float = 0.5, deg: float = 0.5) -> bool:
    from ..pose import pose_error

    t, r = pose_error(T_a, T_b)
    return bool(t <= mm and r <= deg)


def _load_bundle_info(path: Path) -> bool:
    """Whether the bundle has a Dreamer (raises BundleError for a bad file)."""
    from ..model.bundle import load_bundle

    return load_bundle(path).has_dreamer


def fine_bundle_for(arg: str | None, default_bundle: bool, bundle: Path) -> Path | None:
    """The fine-stage bundle of a run: ``arg`` (``none``: off); unset: ``fine.pt`` beside the default
    bundle when the default bundle is used and that file exists (guidance_node pairs them the same way)."""
    if arg is not None:
        return None if arg.strip().lower() in ("", "none") else Path(arg).expanduser()
    if default_bundle:
        from ..runtime import DEFAULT_FINE_MODEL_NAME

        path = bundle.with_name(DEFAULT_FINE_MODEL_NAME)
        return path if path.is_file() else None
    return None


def run(args: argparse.Namespace) -> int:
    from ..runtime import default_model_path
    from ..sim.expert import MAX_OFFSET_DEG, MAX_OFFSET_MM, random_start_offset
    from ..sim.phantom import make_subject

    if args.subject_seeds is not None and args.episodes is not None:
        print("bench closed-loop: give --subject-seeds or --episodes, not both", file=sys.stderr)
        return 2
    seeds = args.subject_seeds or [args.subject_seed + k for k in range(3 if args.episodes is None else args.episodes)]
    if not seeds or args.time_limit_s <= 0 or not args.planes:
        print("bench closed-loop: need --episodes >= 1, --time-limit-s > 0 and at least one plane", file=sys.stderr)
        return 2
    try:
        if args.servo_params_file is not None:
            args.servo_params = [*servo_params_from_file(args.servo_params_file), *args.servo_params]
        args.servo_params = typed_servo_params(args.servo_params)
    except ValueError as exc:
        print(f"bench closed-loop: {exc}", file=sys.stderr)
        return 2
    bundle = (args.bundle or default_model_path()).expanduser()
    if not bundle.is_file():
        print(f"bench closed-loop: model bundle not found: {bundle}\n"
              "  train and export one (docs/TRAINING.md) or pass --bundle FILE", file=sys.stderr)
        return 2
    try:
        has_dreamer = _load_bundle_info(bundle)
    except Exception as exc:
        print(f"bench closed-loop: {exc}", file=sys.stderr)
        return 2
    fine_bundle = fine_bundle_for(args.fine_bundle, args.bundle is None, bundle)
    if fine_bundle is not None and not fine_bundle.is_file():
        print(f"bench closed-loop: fine bundle not found: {fine_bundle}", file=sys.stderr)
        return 2
    max_mm = MAX_OFFSET_MM if args.max_offset_mm is None else args.max_offset_mm
    max_deg = MAX_OFFSET_DEG if args.max_offset_deg is None else args.max_offset_deg

    tmp = None
    if args.log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_closed_loop_")
        log_dir = Path(tmp.name)
    else:
        log_dir = args.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
    bench = _Bench(args, bundle, has_dreamer, log_dir, fine_bundle)
    plan = []  # (subject seed, plane, offset): every mode runs from the same starts
    for seed in seeds:
        for plane in args.planes:  # the start depends on (seed, subject, plane) only, not on --planes
            rng = np.random.default_rng([args.seed, seed, parse_plane(plane).index])
            plan.append((seed, plane, random_start_offset(rng, max_mm, max_deg)))
    total = len(plan) * len(bench.modes)
    print(f"bench closed-loop: {bundle} (model {'with' if bench.use_dreamer else 'without'} Dreamer"
          f"{f'; fine stage {fine_bundle}' if fine_bundle else ''}), modes "
          f"{', '.join(bench.modes)}; {len(seeds)} episode(s) x {len(args.planes)} plane(s) on held-out "
          f"subjects {_seeds_text(seeds)}, time limit "
          f"{args.time_limit_s:g} s (at most ~{total * (args.time_limit_s + args.settle_s + 1) / 60:.0f} min); "
          f"ROS_DOMAIN_ID {bench.env['ROS_DOMAIN_ID']}", flush=True)

    from tqdm import tqdm

    episodes: list[Episode] = []
    rc = 0
    bar = tqdm(total=total, desc="closed-loop episodes", unit="ep", disable=args.quiet)
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: stop the nodes like Ctrl-C
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        bench.start_nodes()
        current_seed = None
        for seed, plane, offset in plan:
            if seed != current_seed:
                bench.start_sim(seed)
                bench.wait_ready()
                current_seed = seed
            target = make_subject(seed).target_pose(plane)
            for mode in bench.modes:
                ep = bench.episode(mode, plane, seed, offset, target)
                episodes.append(ep)
                bar.write(ep.row())
                bar.update(1)
    except KeyboardInterrupt:
        rc = 130
    except (BenchError, TimeoutError) as exc:
        print(f"bench closed-loop: {exc}\n  node logs: {log_dir}", file=sys.stderr)
        rc = 1
        tmp = None  # keep the logs
    finally:
        bar.close()
        bench.stop_nodes()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if tmp is not None:
            tmp.cleanup()
    if not episodes:
        return rc or 1

    config = {
        "bundle": str(bundle), "has_dreamer": has_dreamer, "use_dreamer": bench.use_dreamer,
        "fine_bundle": str(fine_bundle) if fine_bundle else None,
        "episodes_per_plane": len(seeds),
        "planes": list(args.planes), "modes": bench.modes, "time_limit_s": args.time_limit_s, "seed": args.seed,
        "subject_seeds": sorted({e.subject_seed for e in episodes}),
        "start_offset_range": {"mm": [max_mm, max_mm, max_mm / 5.0], "deg": [max_deg] * 3},
        "success_mm": args.success_mm, "success_deg": args.success_deg, "servo_params": bench.servo_params,
        "guidance_params": dict(args.guidance_params),
        "image_size": args.image_size, "pose_rate_hz": args.pose_rate_hz, "settle_s": args.settle_s,
        "complete": rc == 0,
    }
    doc = build_report(episodes, config)
    print(f"\nClosed-loop success on the simulator ({bundle.name}; held-out subjects "
          f"{config['subject_seeds'][0]}..{config['subject_seeds'][-1]}, starts within +-{max_mm:g} mm / "
          f"+-{max_deg:g} deg, time limit {args.time_limit_s:g} s):")
    print(format_table(doc["modes"], (args.success_mm, args.success_deg)))
    if doc["fused_vs_per_frame"]:
        print("\nFused target vs per-frame guidance (median final error; change < 0: fused lower):")
        print(format_comparison(doc["fused_vs_per_frame"]))
    print(f"\nfalse 'plane reached' (reported while beyond {args.success_mm:g} mm / {args.success_deg:g} deg): "
          + ", ".join(f"{m} {s['false_reached']}" for m, s in doc["modes"].items()))
    if any(m != "oracle" for m in doc["modes"]):
        print("\nModel error in the loop (medians; predicted vs true remaining motion, translation and geodesic "
              "angle):")
        print(format_guidance_table(doc["modes"]))
    print(f"\nsuccess_rate ({doc['default_mode']}): {_fmt(doc['success_rate'], '.2f')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False, default=_json_default))
        print(f"wrote {args.json}")
    return rc


def _seeds_text(seeds: Sequence[int]) -> str:
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]}"
    return ",".join(str(s) for s in seeds)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
