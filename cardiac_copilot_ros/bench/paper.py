"""``cardiac-copilot bench paper``: the paper's experiment (Table 1, Fig. 3) on the simulator.

One command: simulate subjects -> build the training cache (subjects split into train / val /
test) -> train the baseline policy and Cardiac Dreamer with the same preset, steps, batch and
seed -> evaluate both on the held-out test subjects -> table (Markdown, CSV, JSON) and Fig. 3
in ``--out``, the table printed. The question it answers is the paper's: does the world model
lower the guidance error?

Protocols (``--preset``; every number can be overridden):

* ``smoke``: 4 subjects x 3 planes x 1 scan x 40 frames (64 px), cache 32 px, training preset
  ``smoke`` (4 steps). Seconds; checks the pipeline only, the numbers mean nothing.
* ``cpu``: 150 subjects x 3 planes x 1 scan x 100 frames (96 px), cache 64 px, training preset
  ``cpu`` (ResNet-18, 2000 steps of 32). About 1.5-2 h on 2 CPU cores.
* ``paper``: 40 subjects x 3 planes x 1 scan x 1500 frames (224 px), cache 224 px, training
  preset ``paper`` (ResNet-34, AdamW 1e-4, AMP). For a GPU.

Layout of ``--out``: ``bags/``, ``cache/``, ``runs/baseline``, ``runs/dreamer``, ``eval/``
(results.json, details.json, table.md, table.csv, fig3.png) and ``protocol.json`` (settings,
split, timings, the verdict).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Protocol:
    """The settings of one benchmark protocol."""

    subjects: int
    scans_per_plane: int
    frames_per_scan: int
    sim_size: int               # px of the simulated images
    train_preset: str           # training preset (training.config.PRESETS); also fixes the cache size
    steps: int | None = None    # optimiser steps per model (None: the preset's)
    input_size: int | None = None  # cache and model input px (None: the training preset's)
    seed: int = 0
    fig_min_count: int = 10


PROTOCOLS: dict[str, Protocol] = {
    "smoke": Protocol(subjects=4, scans_per_plane=1, frames_per_scan=40, sim_size=64, train_preset="smoke",
                      fig_min_count=3),
    "cpu": Protocol(subjects=150, scans_per_plane=1, frames_per_scan=100, sim_size=96, train_preset="cpu"),
    "paper": Protocol(subjects=40, scans_per_plane=1, frames_per_scan=1500, sim_size=224, train_preset="paper"),
}

MODELS = ("baseline", "dreamer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", choices=list(PROTOCOLS),
                        help="smoke: seconds, pipeline check; cpu: the documented protocol, about 1.5-2 h on "
                             "2 cores (default); paper: ResNet-34 at 224 px, for a GPU")
    parser.add_argument("--subjects", type=int, default=None, metavar="N", help="simulated subjects")
    parser.add_argument("--scans-per-plane", type=int, default=None, metavar="K")
    parser.add_argument("--frames-per-scan", type=int, default=None, metavar="F")
    parser.add_argument("--sim-size", type=int, default=None, metavar="PX", help="simulated image size")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="subject seeds S..S+N-1, subject split, training seed (default 0)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="optimiser steps per model (default: the training preset's)")
    parser.add_argument("--input-size", type=int, default=None, metavar="PX",
                        help="cache and model input size (default: the training preset's: smoke 32, cpu 64, paper 224)")
    parser.add_argument("--dreamer-set", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override for the Dreamer run only, for investigations, e.g. "
                             "max_gap=15, dreamer_weight=0.5 (repeatable; steps, batch and seed stay shared)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default outputs/bench_paper_<preset>_<time>); must be new or empty")
    parser.add_argument("--data", type=Path, default=None, metavar="CACHE",
                        help="use this training cache instead of simulating and building one")
    parser.add_argument("--device", default="auto", help="training and evaluation device: auto, cpu, cuda")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default torch's; use 1 on a small machine shared with other jobs)")
    parser.add_argument("--docs-dir", type=Path, default=None, metavar="DIR",
                        help="also copy table.md, fig3.png and results.json there as paper_<preset>_*")
    parser.add_argument("--keep-bags", action="store_true", help="keep the simulated bags (default: deleted "
                        "after the cache is built)")


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    proto = PROTOCOLS[args.preset]
    over = {k: getattr(args, k) for k in ("subjects", "scans_per_plane", "frames_per_scan", "sim_size", "seed",
                                          "steps", "input_size") if getattr(args, k, None) is not None}
    proto = replace(proto, **over)
    if proto.subjects < 3:
        raise ValueError("--subjects must be >= 3 (train, val and test need a subject each)")
    if proto.steps is not None and proto.steps < 1:
        raise ValueError("--steps must be >= 1")
    if proto.input_size is not None and proto.input_size < 32:
        raise ValueError("--input-size must be >= 32")
    return proto


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` training-config overrides -> dict, values typed like the TrainConfig field."""
    from dataclasses import fields

    from cardiac_copilot_ros.training.config import TrainConfig

    types = {f.name: f.type for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"--dreamer-set {item!r}: expected KEY=VALUE with KEY a training config field")
        if key in ("batch_size", "max_steps", "epochs", "seed", "data", "model", "out_dir", "run_name"):
            raise ValueError(f"--dreamer-set {key}: the budget and data are shared by both models")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (explicit options only)."""
    parts = ["cardiac-copilot bench paper", f"--preset {args.preset}"]
    for key in ("subjects", "scans_per_plane", "frames_per_scan", "sim_size", "seed", "steps", "data", "device",
                "workers", "threads", "input_size"):
        val = getattr(args, key, None)
        if val is not None and not (key == "device" and val == "auto"):
            parts.append(f"--{key.replace('_', '-')} {val}")
    parts += [f"--dreamer-set {item}" for item in getattr(args, "dreamer_set", [])]
    return " ".join(parts)


def verdict(details: dict[str, Any]) -> dict[str, Any]:
    """Summary of the relative changes vs the baseline: mean over plane x axis cells, cells lower."""
    out = {}
    for entry, rel in details["relative_change_pct"].items():
        vals = [v for plane in rel.values() for v in plane if v is not None]
        if vals:
            out[entry] = {"mean_change_pct": round(float(np.mean(vals)), 2),
                          "cells_lower": int(sum(v < 0 for v in vals)), "cells": len(vals)}
    base = details["all_planes"][details["baseline"]]["mae"]
    for entry in out:
        mae = details["all_planes"][entry]["mae"]
        out[entry]["all_planes_change_pct"] = [round((m - b) / b * 100, 2) if b > 0 else None
                                               for m, b in zip(mae, base, strict=True)]
    return out


def _stage(name: str) -> None:
    print(f"\n== bench paper: {name}", flush=True)


def run_protocol(proto: Protocol, preset: str, out: Path, data: Path | None = None, device: str = "auto",
                 workers: int | None = None, keep_bags: bool = False, command: str | None = None,
                 dreamer_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole benchmark into ``out``; returns the protocol record (also written as protocol.json)."""
    from cardiac_copilot_ros import code_version, evaluation
    from cardiac_copilot_ros.training.config import PRESETS, make_config
    from cardiac_copilot_ros.training.loop import train

    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new --out")
    cache_size = int(proto.input_size or PRESETS[proto.train_preset]["input_size"])
    timings: dict[str, float] = {}
    record: dict[str, Any] = {"format": "cardiac_copilot_bench_paper", "format_version": 1, "preset": preset,
                              "protocol": asdict(proto), "dreamer_overrides": dreamer_overrides or {},
                              "cache_size": cache_size, "code_version": code_version(),
                              "started": _dt.datetime.now().isoformat(timespec="seconds"),
                              "command": command}
    if data is None:
        from cardiac_copilot_ros.data.build import BuildOptions, build_cache
        from cardiac_copilot_ros.sim.scan import write_scans

        _stage(f"simulate {proto.subjects} subjects x 3 planes x {proto.scans_per_plane} scan(s) x "
               f"{proto.frames_per_scan} frames at {proto.sim_size} px (seeds {proto.seed}..)")
        t0 = time.perf_counter()
        write_scans(out / "bags", proto.subjects, proto.scans_per_plane, seed=proto.seed,
                    frames_per_scan=proto.frames_per_scan, image_size=proto.sim_size, progress=preset != "smoke")
        timings["simulate_s"] = round(time.perf_counter() - t0, 2)
        _stage(f"dataset build (cache {cache_size} px, subjects split 70/15/15 with seed {proto.seed})")
        t0 = time.perf_counter()
        build_cache([out / "bags"], out / "cache", BuildOptions(size=cache_size, seed=proto.seed),
                    progress=preset != "smoke")
        timings["dataset_s"] = round(time.perf_counter() - t0, 2)
        if not keep_bags:
            shutil.rmtree(out / "bags", ignore_errors=True)
        data = out / "cache"
    from cardiac_copilot_ros.data.dataset import load_manifest

    manifest = load_manifest(data)
    record["data"] = {"cache": str(data), "manifest_sha256": manifest["manifest_sha256"],
                      "frames": manifest["totals"]["frames"], "splits": manifest["splits"],
                      "split_frames": manifest.get("split_frames")}
    print(f"cache {data}: {manifest['totals']['frames']} frames; subjects train {len(manifest['splits']['train'])}, "
          f"val {len(manifest['splits']['val'])}, test {len(manifest['splits']['test'])}", flush=True)

    runs: dict[str, Path] = {}
    for model in MODELS:
        extra = (dreamer_overrides or {}) if model == "dreamer" else {}
        cfg = make_config(proto.train_preset, data=str(data), model=model, seed=proto.seed, max_steps=proto.steps,
                          out_dir=str(out / "runs"), run_name=model, device=device, workers=workers,
                          input_size=cache_size, **extra)
        _stage(f"train {model} (preset {proto.train_preset}, {cfg.max_steps or f'{cfg.epochs} epochs'} steps, "
               f"batch {cfg.batch_size}, seed {cfg.seed})")
        t0 = time.perf_counter()
        res = train(cfg)
        timings[f"train_{model}_s"] = round(time.perf_counter() - t0, 2)
        runs[model] = Path(res["run_dir"])
        record.setdefault("training", {})[model] = {"run": str(runs[model]), "steps": res["step"],
                                                   "samples_per_s": round(res["samples_per_s"], 2),
                                                   "best_step": res["best"]["step"],
                                                   "best_val_mae_mean": res["best"]["val_mae_mean"]}
    _stage("evaluate on the held-out test subjects")
    eval_device = evaluation.resolve_device(device)
    t0 = time.perf_counter()
    models = [evaluation.load_model(runs[m], m, eval_device) for m in MODELS]
    res = evaluation.evaluate(models, data, "test", device=eval_device, baseline="baseline",
                              fig_min_count=proto.fig_min_count, progress=preset != "smoke")
    paths = evaluation.write_outputs(res, out / "eval", title=f"{command or 'bench paper --preset ' + preset}\n"
                                     f"error vs remaining motion, {res.details['n_frames']} held-out test frames "
                                     "(mean ± std per bin)")
    timings["evaluate_s"] = round(time.perf_counter() - t0, 2)
    record["verdict"] = verdict(res.details)
    record["timings"] = timings
    record["outputs"] = {k: str(v) for k, v in paths.items()}
    record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    (out / "protocol.json").write_text(json.dumps(record, indent=2) + "\n")
    record["table"] = evaluation.format_text(res)
    return record


def run(args: argparse.Namespace) -> int:
    try:
        proto = protocol_from_args(args)
        overrides = parse_overrides(args.dreamer_set)
    except ValueError as exc:
        print(f"bench paper: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    out = args.out or Path("outputs") / f"bench_paper_{args.preset}_{_dt.datetime.now():%Y%m%d_%H%M%S}"
    from cardiac_copilot_ros.data.build import DatasetError
    from cardiac_copilot_ros.evaluation import EvaluationError

    try:
        record = run_protocol(proto, args.preset, out, data=args.data, device=args.device, workers=args.workers,
                              keep_bags=args.keep_bags, command=command_line(args), dreamer_overrides=overrides)
    except (ValueError, FileExistsError, DatasetError, EvaluationError) as exc:
        print(f"bench paper: {exc}", file=sys.stderr)
        return 2
    print("\n" + record["table"])
    print("\nDoes the world model lower the error? (relative change vs baseline, over planes x axes)")
    for entry, v in record["verdict"].items():
        per_axis = " ".join("n/a" if c is None else f"{c:+.1f}%" for c in v["all_planes_change_pct"])
        print(f"  {entry}: mean {v['mean_change_pct']:+.1f} %, lower in {v['cells_lower']} of {v['cells']} cells; "
              f"all planes per axis {per_axis}")
    t = record["timings"]
    print("\ntimings: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items()))
    if args.docs_dir is not None:
        args.docs_dir.mkdir(parents=True, exist_ok=True)
        for src, dst in (("table.md", "table.md"), ("fig3.png", "fig3.png"), ("results.json", "results.json")):
            shutil.copyfile(out / "eval" / src, args.docs_dir / f"paper_{args.preset}_{dst}")
        print(f"copied table.md, fig3.png, results.json to {args.docs_dir} as paper_{args.preset}_*")
    print(f"\nwrote {out} (eval/table.md, eval/fig3.png, eval/results.json, protocol.json)")
    return 0
