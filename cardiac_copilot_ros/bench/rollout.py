"""``cardiac-copilot bench rollout``: a quick closed-loop estimate without ROS (:mod:`cardiac_copilot_ros.rollout`).

The guidance node's logic (coarse to fine, fused target) and a kinematic servo, frame by frame, one
process per CPU core (``--workers``; the same episodes whatever the number): about 1.5 episodes per second
on 2 cores, where ``bench closed-loop`` (real nodes over DDS, in real time) takes about 15 s per episode. It
ranks models and runtime settings on validation subjects before the real bench measures the chosen one; it
has no latency or acceleration limits (the servo's final-approach check only with ``--rollout-set
verify_step_mm=8``), so its success rates are not the real loop's.

Example: ``cardiac-copilot bench rollout --subject-seeds 8000-8011 --fine-bundle
runs/dagger_fine_survey/iter_2/bundle.pt``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..cli import key_value_arg
from .closed_loop import fine_bundle_for, parse_seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default=None, metavar="FILE", help="coarse bundle (default models/default.pt)")
    parser.add_argument("--fine-bundle", default=None, metavar="FILE",
                        help="fine bundle (default models/fine.pt when --bundle is not given; 'none' = off)")
    parser.add_argument("--subject-seeds", type=parse_seeds, default=parse_seeds("8000-8011"), metavar="SEEDS",
                        help="subjects as a list or range (default 8000-8011: validation subjects)")
    parser.add_argument("--episodes-per-plane", type=int, default=2, help="starts per subject and plane (default 2)")
    parser.add_argument("--modes", default="fused,per_frame", help="comma-separated: fused, per_frame")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random starts (default 0)")
    parser.add_argument("--rollout-set", nargs="+", default=[], metavar="KEY=VALUE", type=key_value_arg,
                        help="rollout.RolloutConfig overrides (e.g. steps=80 gain=0.4 stop_frames=10)")
    from .. import rollout

    rollout.add_process_arguments(parser)   # --engine, --threads, --workers
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    g = parser.add_argument_group("gate sweep", "choose the servo's survey gate (survey_tolerance_m / _rad, "
                                  "survey_attempts) on validation subjects: every survey is run and logged "
                                  "(none passes), then each gate is replayed on the logs")
    g.add_argument("--gate-sweep", action="store_true",
                   help="replay survey gates (needs survey_poses in --rollout-set); prints reached / false reached")
    g.add_argument("--sweep-mm", type=_positive_list, default=_positive_list("1.0,1.2,1.4,1.6,1.8,2.0"), metavar="LIST",
                   help="scatter tolerances to replay [mm] (default 1.0,1.2,1.4,1.6,1.8,2.0)")
    g.add_argument("--sweep-deg", type=_positive_list, default=_positive_list("1.5,2.0,2.5,3.0"), metavar="LIST",
                   help="scatter tolerances to replay [deg] (default 1.5,2.0,2.5,3.0)")
    g.add_argument("--sweep-attempts", type=_whole_numbers, default=_whole_numbers("1,2,3"), metavar="LIST",
                   help="survey attempts to replay (default 1,2,3; the rollouts run the largest)")


def _positive_list(text: str, kind: type = float) -> list:
    """A comma-separated list of positive numbers of ``kind`` (argparse type; ``kind`` int: whole numbers)."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _whole_numbers(text: str) -> list[int]:
    return _positive_list(text, int)


def format_table(summaries: dict[str, dict]) -> str:
    lines = ["| mode | plane | episodes | success [95 % Wilson] | median final error (mm / deg) | converged | "
             "false reached | median frames |", "|" + "---|" * 8]
    for mode, s in summaries.items():
        for plane, p in [*s["per_plane"].items(), ("all", s)]:
            ci = p["success_ci95"] or [0.0, 0.0]
            lines.append(f"| {mode} | {plane} | {p['episodes']} | {100 * p['success_rate']:.0f} % "
                         f"[{100 * ci[0]:.0f}-{100 * ci[1]:.0f} %] | {p['median_final_error_mm']:.1f} / "
                         f"{p['median_final_error_deg']:.1f} | {100 * p['converged_rate']:.0f} % | "
                         f"{p['false_reached']} | {p['median_frames']:.0f} |")
    return "\n".join(lines)


def format_sweep(sweeps: dict[str, list[dict]]) -> str:
    lines = ["| mode | attempts | tolerance (mm / deg) | reached | false reached | success | "
             "median frames to reached |", "|" + "---|" * 7]
    for mode, rows in sweeps.items():
        for r in rows:
            frames = r["median_frames_to_reached"]
            lines.append(f"| {mode} | {r['attempts']} | {r['tolerance_mm']:g} / {r['tolerance_deg']:g} | "
                         f"{r['reached']} of {r['episodes']} ({100 * r['reached_rate']:.0f} %) | "
                         f"{r['false_reached']} | {100 * r['success_rate']:.0f} % | "
                         f"{'-' if frames is None else f'{frames:.0f}'} |")
    return "\n".join(lines)


def _sweep_overrides(args: argparse.Namespace, overrides: dict) -> dict:
    """The rollout settings of a gate sweep: no survey passes (a tolerance no scatter meets), all attempts run."""
    if not args.gate_sweep:
        return overrides
    if not int(overrides.get("survey_poses", 0) or 0):
        raise ValueError("--gate-sweep needs a survey: add survey_poses=4 (or 8, 12) to --rollout-set")
    return {**overrides, "survey_tolerance_mm": 1e-9, "survey_tolerance_deg": 1e-9,
            "survey_attempts": max(args.sweep_attempts)}


def run(args: argparse.Namespace) -> int:
    from .. import rollout, runtime
    from ..model.bundle import BundleError, load_bundle

    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in rollout.MODES]
        if bad or not modes:
            raise ValueError(f"unknown modes {bad}; choose from {', '.join(rollout.MODES)}")
        if args.episodes_per_plane < 1:
            raise ValueError("--episodes-per-plane must be >= 1")
        overrides = _sweep_overrides(args, dict(args.rollout_set))
        configs = {m: rollout.RolloutConfig.from_overrides({**overrides, "mode": m}) for m in modes}
        coarse_path = Path(args.bundle or runtime.default_model_path())
        fine_path = fine_bundle_for(args.fine_bundle, args.bundle is None, coarse_path)
        rollout.check_process_arguments(args)
        planes = load_bundle(coarse_path).planes
        if fine_path is not None:
            load_bundle(fine_path)
    except (ValueError, FileNotFoundError, BundleError) as exc:
        print(f"bench rollout: {exc}", file=sys.stderr)
        return 2
    total = len(modes) * len(args.subject_seeds) * len(planes) * args.episodes_per_plane
    bar = rollout.EpisodeProgress(total, "bench rollout", not args.quiet)
    t0 = time.monotonic()
    results = {}
    try:
        for mode, cfg in configs.items():
            results[mode] = rollout.run_episodes_parallel(
                args.subject_seeds, coarse_path, fine_path, cfg, seed=args.seed,
                episodes_per_plane=args.episodes_per_plane, progress=bar, workers=args.workers, threads=args.threads,
                engine=args.engine)
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    summaries = {m: rollout.summarize(r) for m, r in results.items()}
    n = sum(len(r) for r in results.values())
    engines = rollout.engines_used(e for r in results.values() for e in r)
    print(f"bench rollout: {coarse_path}" + (f" -> {fine_path}" if fine_path else "") +
          f", subjects {args.subject_seeds[0]}..{args.subject_seeds[-1]} ({len(args.subject_seeds)}), "
          f"{n} episodes in {elapsed:.0f} s ({n / max(elapsed, 1e-9):.1f} episodes/s; "
          f"{', '.join(engines) or 'engine not reported'})")
    sweeps = {}
    if args.gate_sweep:
        sweeps = {m: rollout.gate_sweep(r, args.sweep_mm, args.sweep_deg, args.sweep_attempts)
                  for m, r in results.items()}
        print("gate sweep (each survey gate replayed on the same rollouts, in which every survey ran):")
        print(format_sweep(sweeps))
    else:
        print(format_table(summaries))
    if args.json:
        doc = {"bundle": str(coarse_path), "fine_bundle": None if fine_path is None else str(fine_path),
               "subject_seeds": args.subject_seeds, "engine": args.engine,
               "engines_used": engines,
               "config": {m: asdict(c) for m, c in configs.items()}, "modes": summaries,
               "episodes": {m: [e.summary() for e in r] for m, r in results.items()}}
        if sweeps:
            doc["gate_sweep"] = sweeps
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
    return 0
