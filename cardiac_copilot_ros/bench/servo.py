"""``cardiac-copilot bench servo``: the servo's own time to "plane reached", without a model or ROS.

``bench closed-loop`` measures the whole loop in real time (about 12 s per episode, the machine to itself).
What part of that time is the servo's own (its gains, limits, hold times, a final-approach survey) is
faster to see here: the real :class:`..servo.ServoController` at its control rate, an ideal kinematic probe
that executes every twist exactly, and the *true* remaining motion as guidance (at ``--guidance-hz``, stamped
``--latency-s`` in the past, with optional Gaussian noise), from random starts in the closed-loop bench's
range. One row per servo profile (a ROS 2 parameter file such as ``config/servo_final_approach.yaml``, on top
of the closed-loop bench's speed and workspace limits): the median and 90th percentile time to "plane
reached", how many starts reached it, and the final error. A fast, deterministic way to tune a profile
before measuring it in the real loop; the real loop adds its latencies (about 0.3 s in session 6).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import package_file_candidates
from ..sim.expert import random_start_offset
from .closed_loop import BENCH_SERVO_PARAMS, _servo_param, servo_params_from_file, typed_servo_params

DEFAULT_PROFILES = ("none", "servo_final_approach.yaml")   # "none": no file, the bench's parameters only


def package_config_path(name: str) -> Path:
    """``name`` as given if it exists, else the package's ``config/name`` (installed share or checkout)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    return next((c for c in package_file_candidates("config", name) if c.is_file()), path)


def start_offsets(n: int, seed: int, max_mm: float = 40.0, max_deg: float = 40.0) -> np.ndarray:
    """``n`` start offsets (x, y, z mm; roll, pitch, yaw deg) drawn as the closed-loop bench draws them
    (``sim.expert.random_start_offset``: +-max_mm on x and y, a fifth of it on z, +-max_deg on each angle)."""
    rng = np.random.default_rng(seed)
    return np.stack([random_start_offset(rng, max_mm, max_deg) for _ in range(int(n))])


def run_episode(config: Any, offset: np.ndarray, guidance_hz: float = 30.0, latency_s: float = 0.05,
                noise_mm: float = 0.0, noise_deg: float = 0.0, time_limit_s: float = 30.0,
                seed: int = 0) -> dict[str, Any]:
    """One start: the servo with true guidance and an ideal probe. Returns time to "plane reached" (None if
    not within the limit), the final error (mm, deg) and the servo's last state and reason."""
    from ..pose import action_to_matrix, pose_error, rotation_to_rotvec, rotvec_to_rotation
    from ..servo import Guidance, ProbePose, ServoController

    rng = np.random.default_rng(seed)
    frame_rng = np.random.default_rng((seed, 1))   # the per-frame target estimates' noise, apart from the guidance's
    ctl = ServoController(config)
    dt = config.control_period_s
    target = np.eye(4)
    T = target @ action_to_matrix(np.asarray(offset, dtype=np.float64))
    ctl.step(0.0, probe_pose=ProbePose(T.copy(), 0.0))
    ok, why = ctl.enable(0.0)
    if not ok:
        raise ValueError(f"the servo refused to enable: {why}")
    history: list[tuple[float, np.ndarray]] = []
    t, next_frame, reached_s = 0.0, 0.0, None
    steps = int(round(time_limit_s / dt))
    for _ in range(steps):
        history.append((t, T.copy()))
        guidance = None
        if t >= next_frame - 1e-9:
            next_frame += 1.0 / guidance_hz
            # the image was taken latency_s ago; the guidance relates the target to the probe pose then
            seen = next((Th for th, Th in reversed(history) if th <= t - latency_s), history[0][1])
            rel = np.linalg.solve(seen, target)
            lin = rel[:3, 3] / 1000.0 + rng.normal(0.0, noise_mm / 1000.0, 3)
            ang = rotation_to_rotvec(rel[:3, :3]) + rng.normal(0.0, np.radians(noise_deg), 3)
            guidance = Guidance(lin, ang, t - latency_s)
            # the frame's own target estimate (survey_gate frame_target): the true target, with the same noise
            est = target @ action_to_matrix(np.concatenate([frame_rng.normal(0.0, noise_mm, 3),
                                                            frame_rng.normal(0.0, noise_deg, 3)]))
            ctl.set_frame_target(t, est)
            history = [h for h in history if h[0] >= t - latency_s - 0.1] or history[-1:]
        cmd = ctl.step(t, guidance=guidance, probe_pose=ProbePose(T.copy(), t))
        if "plane_reached" in cmd.events:
            reached_s = t
            break
        step = np.eye(4)   # the probe executes the twist (probe frame) exactly
        step[:3, :3] = rotvec_to_rotation(np.asarray(cmd.angular_rps) * dt)
        step[:3, 3] = np.asarray(cmd.linear_mps) * dt * 1000.0
        T = T @ step
        t += dt
    mm, deg = (float(v) for v in pose_error(T, target))
    return {"time_to_reached_s": reached_s, "translation_mm": mm, "rotation_deg": deg,
            "state": str(ctl.state.value), "reason": ctl.reason}


def summarize(name: str, episodes: list[dict[str, Any]]) -> dict[str, Any]:
    times = [e["time_to_reached_s"] for e in episodes if e["time_to_reached_s"] is not None]
    return {"profile": name, "starts": len(episodes), "reached": len(times),
            "median_time_s": float(np.median(times)) if times else None,
            "p90_time_s": float(np.percentile(times, 90)) if times else None,
            "median_final_error_mm": float(np.median([e["translation_mm"] for e in episodes])),
            "median_final_error_deg": float(np.median([e["rotation_deg"] for e in episodes]))}


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = ["| servo profile | starts | reached | median time to reached (s) | p90 (s) | median final error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        error = f"{r['median_final_error_mm']:.1f} mm / {r['median_final_error_deg']:.1f} deg"
        lines.append(f"| {r['profile']} | {r['starts']} | {r['reached']} | {f(r['median_time_s'])} | "
                     f"{f(r['p90_time_s'])} | {error} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", nargs="+", default=list(DEFAULT_PROFILES), metavar="FILE",
                        help="servo parameter files to compare, one row each, each over the closed-loop bench's "
                             "speed and workspace limits ('none': those alone; default: none and the package's "
                             "config/servo_final_approach.yaml). A complete file such as config/servo.yaml also "
                             "sets the shipped limits (0.02 m/s, a 30 deg workspace that far starts leave)")
    parser.add_argument("--servo-params", type=_servo_param, nargs="+", action="extend", default=[],
                        metavar="NAME=VALUE", help="overrides applied to every profile")
    parser.add_argument("--starts", type=int, default=12, help="random starts per profile (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starts and the noise (default 0)")
    parser.add_argument("--max-offset-mm", type=float, default=40.0, help="start range, x and y (z: a fifth) [mm]")
    parser.add_argument("--max-offset-deg", type=float, default=40.0, help="start range, each angle [deg]")
    parser.add_argument("--guidance-hz", type=float, default=30.0, help="guidance rate [Hz] (default 30)")
    parser.add_argument("--latency-s", type=float, default=0.05, help="image age of each guidance [s] (default 0.05)")
    parser.add_argument("--noise-mm", type=float, default=0.3, help="guidance noise per axis, std [mm] (default 0.3)")
    parser.add_argument("--noise-deg", type=float, default=0.2, help="guidance noise per axis, std [deg] (default 0.2)")
    parser.add_argument("--time-limit-s", type=float, default=30.0, help="per start (default 30)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from ..servo import ServoConfig

    if args.starts < 1 or args.guidance_hz <= 0 or args.latency_s < 0 or args.time_limit_s <= 0 \
            or min(args.noise_mm, args.noise_deg) < 0:
        print("bench servo: need --starts >= 1, --guidance-hz > 0, --latency-s >= 0, --time-limit-s > 0 and "
              "noise >= 0", file=sys.stderr)
        return 2
    configs: list[tuple[str, ServoConfig]] = []
    try:
        for name in args.profiles:
            path = None if name == "none" else package_config_path(name)
            from_file = [] if path is None else servo_params_from_file(path)
            try:
                params = typed_servo_params([*BENCH_SERVO_PARAMS.items(), *from_file, *args.servo_params])
            except ValueError as exc:
                raise ValueError(f"{path or 'overrides'}: {exc}") from exc
            cfg = ServoConfig(**dict(params)).validate()
            configs.append(("bench parameters only" if path is None else path.name, cfg))
    except (ValueError, TypeError) as exc:
        print(f"bench servo: {exc}", file=sys.stderr)
        return 2
    offsets = start_offsets(args.starts, args.seed, args.max_offset_mm, args.max_offset_deg)
    rows, out = [], {}
    for name, cfg in configs:
        eps = [run_episode(cfg, o, args.guidance_hz, args.latency_s, args.noise_mm, args.noise_deg,
                           args.time_limit_s, seed=args.seed * 1000 + k) for k, o in enumerate(offsets)]
        rows.append(summarize(name, eps))
        out[name] = {"summary": rows[-1], "episodes": eps}
    print(f"Servo time to 'plane reached' with true guidance and an ideal probe ({args.starts} starts within "
          f"+-{args.max_offset_mm:g} mm / +-{args.max_offset_deg:g} deg, guidance {args.guidance_hz:g} Hz, "
          f"{1000 * args.latency_s:.0f} ms old, noise {args.noise_mm:g} mm / {args.noise_deg:g} deg):")
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()}, "profiles": out}, indent=1))
        print(f"wrote {args.json}")
    return 0
