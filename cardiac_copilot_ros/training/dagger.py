"""``cardiac-copilot dagger``: DAgger for a guidance model (issue 12 item 1).

A model trained on poses drawn around the target never sees where its own closed loop goes: the
spurious fixed points where it predicts "no motion" a few millimetres off the plane, the overshoots
of its own steps. DAgger (Ross et al., 2011) closes that gap, one iteration at a time:

1. **roll out** the current models (coarse and fine bundle, coarse to fine, fused target: the
   guidance node's logic in :mod:`cardiac_copilot_ros.rollout`) on training subjects from random
   starts over the closed loop's start range, with a little motion noise; keep every probe pose the
   ``--stage`` model guided from (``iter_K/states.npz``: subject, plane, offset from the true target);
2. **label and merge**: the states are rendered and labelled on the fly by the training dataset
   (:class:`..data.approach.SimFrameDataset`'s ``dagger`` source, the labelling code of every other
   frame) and mixed, with weight ``--dagger-weight``, into the preset's own mixture; all iterations'
   states so far are used;
3. **retrain**: fine-tune the ``--stage`` model from the previous iteration's weights (``--init`` for
   the first) for ``--steps`` steps (``iter_K/train``), and export it (``iter_K/bundle.pt``, fp16);
4. **validate**: roll out the new pair on validation subjects (seeds 8000+, never trained on):
   ``iter_K/val.json``. Iteration 0 is the starting pair.

Every step writes its output under ``--out`` and is skipped when that output exists, so the same
command resumes after an interruption (a half-done training resumes from its last checkpoint); the same
command with more ``--iterations`` continues a finished run, and with another ``--rollout-set`` (e.g. the
servo's final-approach survey, ``survey_poses=4``) it rolls out the new iterations under that loop and
validates every iteration again under it, keeping the earlier states and trainings. The
table at the end chooses on validation (success rate, then median final error) and writes the chosen
bundle's path to ``--out``/best.txt. Held-out test subjects (9000+) are never touched: measure the
chosen bundle there once, with ``bench closed-loop``.

Example (the fine stage, from the run ``make models`` trained)::

    cardiac-copilot dagger --stage fine --init runs/default_fine --out runs/dagger_fine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cardiac_copilot_ros.cli import key_value_arg

__all__ = ["add_arguments", "run", "dagger"]

STAGES = ("fine", "coarse")
STAGE_PRESETS = {"fine": "fine", "coarse": "approach"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, default="fine",
                        help="which model DAgger retrains: fine (the last centimetre; default) or coarse")
    parser.add_argument("--coarse", default=None, metavar="BUNDLE",
                        help="coarse bundle for the rollouts (default models/default.pt; with --stage coarse: "
                             "the first iteration's)")
    parser.add_argument("--fine", default=None, metavar="BUNDLE",
                        help="fine bundle for the rollouts (default models/fine.pt; with --stage fine: the first "
                             "iteration's); 'none' = coarse only")
    parser.add_argument("--init", default=None, metavar="RUN",
                        help="training checkpoint, run folder or TorchScript bundle of the --stage model to fine-tune "
                             "(default: train the first iteration from scratch)")
    parser.add_argument("--preset", default=None, help="training preset (default: fine for --stage fine, approach "
                        "for coarse)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (resumable)")
    parser.add_argument("--iterations", type=int, default=2, help="DAgger iterations (default 2)")
    parser.add_argument("--subjects", type=int, default=200,
                        help="training subjects rolled out per iteration (seeds 20000+; default 200)")
    parser.add_argument("--episodes-per-plane", type=int, default=1, help="episodes per subject and plane (default 1)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per iteration (default 2000)")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of each fine-tuning (default 2e-4)")
    parser.add_argument("--dagger-weight", type=float, default=0.5,
                        help="share of visited states in the training mixture (default 0.5)")
    parser.add_argument("--noise-mm", type=float, default=0.5, help="rollout motion noise per frame [mm] (0.5)")
    parser.add_argument("--noise-deg", type=float, default=0.5, help="rollout motion noise per frame [deg] (0.5)")
    parser.add_argument("--val-subjects", type=int, default=12, help="validation subjects (seeds 8000+; default 12)")
    parser.add_argument("--val-episodes-per-plane", type=int, default=2, help="validation starts per subject and plane")
    parser.add_argument("--seed", type=int, default=0, help="seed of starts, noise and training (default 0)")
    parser.add_argument("--train-set", nargs="+", default=[], metavar="KEY=VALUE", type=key_value_arg,
                        help="training config overrides on top of the preset (e.g. batch_size=16 workers=0)")
    parser.add_argument("--rollout-set", nargs="+", default=[], metavar="KEY=VALUE", type=key_value_arg,
                        help="rollout.RolloutConfig overrides (e.g. steps=80 gain=0.4)")
    from cardiac_copilot_ros import rollout

    rollout.add_process_arguments(parser)   # --engine, --threads, --workers
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _validate_args(args: argparse.Namespace) -> None:
    from cardiac_copilot_ros import rollout

    rollout.check_process_arguments(args)
    if args.iterations < 1 or args.subjects < 1 or args.episodes_per_plane < 1 or args.steps < 1:
        raise ValueError("--iterations, --subjects, --episodes-per-plane and --steps must be >= 1")
    if args.val_subjects < 1 or args.val_episodes_per_plane < 1:
        raise ValueError("--val-subjects and --val-episodes-per-plane must be >= 1")
    if not 0 < args.dagger_weight < 1:
        raise ValueError("--dagger-weight must be in (0, 1)")
    if args.lr <= 0:
        raise ValueError("--lr must be > 0")


def _mix_with_dagger(mix: dict[str, float], weight: float) -> str:
    """The preset's mixture scaled to ``1 - weight``, plus ``dagger=weight``."""
    total = sum(v for k, v in mix.items() if k != "dagger") or 1.0
    parts = {k: (1.0 - weight) * v / total for k, v in mix.items() if k != "dagger" and v > 0}
    parts["dagger"] = weight
    return ",".join(f"{k}={v:.4g}" for k, v in parts.items())


def _rollout_config(args: argparse.Namespace, noise: bool) -> Any:
    from cardiac_copilot_ros import rollout

    over = dict(args.rollout_set)
    over.update(noise_mm=args.noise_mm if noise else 0.0, noise_deg=args.noise_deg if noise else 0.0)
    return rollout.RolloutConfig.from_overrides(over)


def _rollouts(seeds: list[int], coarse: str, fine: str | None, args: argparse.Namespace, seed: int,
              episodes: int, noise: bool, desc: str) -> list[Any]:
    from cardiac_copilot_ros import rollout
    from cardiac_copilot_ros.model.bundle import load_bundle

    cfg = _rollout_config(args, noise)
    planes = load_bundle(coarse).planes
    bar = rollout.EpisodeProgress(len(seeds) * len(planes) * episodes, desc, not args.no_progress)
    try:
        return rollout.run_episodes_parallel(seeds, coarse, fine, cfg, seed=seed, episodes_per_plane=episodes,
                                             progress=bar, workers=args.workers, threads=args.threads,
                                             engine=args.engine)
    finally:
        bar.close()


def _validation(path: Path, coarse: str, fine: str | None, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Roll out a pair on the validation subjects once (cached in ``path``; redone when the validation
    settings differ from the cached ones, e.g. a resumed run with another ``--rollout-set``: the iterations
    are then compared under the same loop)."""
    from dataclasses import asdict

    from cardiac_copilot_ros import rollout
    from cardiac_copilot_ros.data.approach import split_seeds

    setting = {"rollout": asdict(_rollout_config(args, noise=False)), "val_subjects": args.val_subjects,
               "val_episodes_per_plane": args.val_episodes_per_plane, "seed": args.seed, "engine": args.engine}
    if path.is_file():
        doc = json.loads(path.read_text())
        cached = doc.get("setting")
        if isinstance(cached, dict) and isinstance(cached.get("rollout"), dict):
            # a rollout setting added after this cache was written is missing from it: its default is the
            # loop the cache was made with (new settings are off by default), so it is not a difference
            cached = {**cached, "rollout": {**asdict(rollout.RolloutConfig()), **cached["rollout"]}}
            cached.setdefault("engine", "torch")   # the only engine before session 12
        if cached == setting:
            return doc
        print(f"dagger: {path} was validated with other settings; validating {label} again", file=sys.stderr)
    results = _rollouts(split_seeds("val", args.val_subjects), coarse, fine, args, 10_000 + args.seed,
                        args.val_episodes_per_plane, noise=False, desc=f"validate {label}")
    doc = {"coarse": coarse, "fine": fine, "setting": setting, "summary": rollout.summarize(results),
           "episodes": [r.summary() for r in results]}
    _write_json(path, doc)
    return doc


def _onnx_beside(bundle: Path) -> None:
    """Write ``<bundle>.onnx`` once, so that every rollout process loads it instead of converting the bundle in
    memory (about 15 s each); without it they convert, or run on TorchScript (rollout.load_runtimes)."""
    from cardiac_copilot_ros.model import onnx_bundle

    onnx = bundle.with_suffix(".onnx")
    if onnx.is_file() or not (onnx_bundle.onnxruntime_available() and onnx_bundle.exporter_available()):
        return
    tmp = bundle.with_suffix(".tmp.onnx")
    try:
        worst, ok = onnx_bundle.worst_disagreement(onnx_bundle.export_onnx_bundle(bundle, tmp)["max_abs_diff"])
        if not ok:
            raise ValueError(f"its outputs differ from the bundle's by {worst:.3g} mm/deg")
        tmp.replace(onnx)
    except Exception as exc:   # an optional speed-up: whatever failed, the rollouts still run without it
        print(f"dagger: {onnx} not written ({exc}); the rollouts convert {bundle} themselves", file=sys.stderr)
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def _train(run_dir: Path, args: argparse.Namespace, init: str | None, states: list[Path]) -> None:
    """Fine-tune the stage model on the preset's mixture plus the visited states (resumable)."""
    from cardiac_copilot_ros.training.config import PRESETS, make_config, parse_mix
    from cardiac_copilot_ros.training.loop import train

    preset = args.preset or STAGE_PRESETS[args.stage]
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    mix = parse_mix(PRESETS[preset].get("sim_mix", "uniform=0.4,near=0.35,expert=0.25"))
    cfg = make_config(preset, model="baseline", max_steps=args.steps, lr=args.lr, seed=args.seed,
                      sim_mix=_mix_with_dagger(mix, args.dagger_weight),
                      dagger_states=",".join(str(p) for p in states), init_from=init or "",
                      out_dir=str(run_dir.parent), run_name=run_dir.name, progress=not args.no_progress,
                      threads=args.threads, checkpoint_every=max(1, min(250, args.steps)),
                      val_every=max(1, min(500, args.steps)), **dict(args.train_set))
    if not cfg.sim_subjects:
        raise ValueError(f"preset {preset!r} does not render simulator frames (sim_subjects 0): DAgger needs them")
    resume = run_dir if any((run_dir / "checkpoints").glob("step_*.pt")) else None
    train(cfg, resume=resume)


def dagger(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the iterations; returns {"iterations": [...], "best": {...}}."""
    from cardiac_copilot_ros import rollout, runtime
    from cardiac_copilot_ros.data.approach import VisitedStates, split_seeds
    from cardiac_copilot_ros.model.export import export_checkpoint

    _validate_args(args)
    _rollout_config(args, noise=True)   # bad --rollout-set fails before any work
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    coarse = str(args.coarse or runtime.default_model_path())
    fine_default = runtime.default_fine_model_path()
    fine = None if args.fine == "none" else str(args.fine or fine_default or "") or None
    if args.stage == "fine" and fine is None:
        raise ValueError("--stage fine needs a fine bundle to start from (--fine)")
    (out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    rows = [{"iteration": 0, "bundle": fine if args.stage == "fine" else coarse, "states": 0,
             "val": _validation(out / "iter_0_val.json", coarse, fine, args, "iteration 0")["summary"]}]
    init = args.init
    states: list[Path] = []
    n_states = 0
    train_seeds = split_seeds("train", args.subjects)
    for k in range(1, args.iterations + 1):
        it = out / f"iter_{k}"
        it.mkdir(exist_ok=True)
        states_path = it / "states.npz"
        if not states_path.is_file():
            results = _rollouts(train_seeds, coarse, fine, args, 1000 * args.seed + k, args.episodes_per_plane,
                                noise=True, desc=f"DAgger {k}: roll out")
            table = rollout.states_table(results, stage=args.stage if fine is not None else None)
            if not len(table["seed"]):
                raise ValueError(f"the rollouts never reached the {args.stage} stage (the coarse model never "
                                 "handed over): nothing to learn from; run --stage coarse first")
            tmp = it / "states.tmp.npz"
            VisitedStates(table["seed"], table["plane"], table["offset"]).save(str(tmp), stage=table["stage"])
            tmp.replace(states_path)
            print(f"DAgger {k}: {len(table['seed'])} visited states of the {args.stage} stage, "
                  f"rollout success {rollout.summarize(results)['success_rate']:.0%} on training subjects",
                  file=sys.stderr)
        states.append(states_path)
        n_states += len(VisitedStates.load(str(states_path)))
        run_dir = it / "train"
        if not (run_dir / ".done").is_file():
            _train(run_dir, args, init, states)
            (run_dir / ".done").touch()
        bundle = it / "bundle.pt"
        if not bundle.is_file():
            export_checkpoint(run_dir, bundle, fp16=True)
        if args.engine != "torch":
            _onnx_beside(bundle)
        if args.stage == "fine":
            fine = str(bundle)
        else:
            coarse = str(bundle)
        val = _validation(it / "val.json", coarse, fine, args, f"iteration {k}")
        rows.append({"iteration": k, "bundle": str(bundle), "states": n_states, "val": val["summary"]})
        init = str(run_dir)
    best = max(rows, key=lambda r: (r["val"]["success_rate"], -r["val"]["median_final_error_mm"]))
    (out / "best.txt").write_text(str(best["bundle"]) + "\n")
    doc = {"iterations": rows, "best": best, "stage": args.stage}
    _write_json(out / "summary.json", doc)
    return doc


def format_table(doc: dict[str, Any]) -> str:
    lines = ["| iteration | visited states | val success [95 % Wilson] | median final error (mm / deg) | bundle |",
             "|---|---|---|---|---|"]
    for r in doc["iterations"]:
        v = r["val"]
        ci = v.get("success_ci95") or [0, 0]
        lines.append(f"| {r['iteration']} | {r['states']} | {100 * v['success_rate']:.0f} % "
                     f"[{100 * ci[0]:.0f}-{100 * ci[1]:.0f} %] | {v['median_final_error_mm']:.1f} / "
                     f"{v['median_final_error_deg']:.1f} | {r['bundle']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cardiac_copilot_ros.data.build import DatasetError
    from cardiac_copilot_ros.model.bundle import BundleError

    t0 = time.monotonic()
    try:
        doc = dagger(args)
    except (ValueError, FileNotFoundError, DatasetError, BundleError) as exc:
        print(f"dagger: {exc}", file=sys.stderr)
        return 2
    print(format_table(doc))
    print(f"chosen on validation: iteration {doc['best']['iteration']} ({doc['best']['bundle']}); "
          f"written to {args.out / 'best.txt'} ({time.monotonic() - t0:.0f} s)")
    return 0
