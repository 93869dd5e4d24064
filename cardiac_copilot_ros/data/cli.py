"""``cardiac-copilot dataset build BAGS... --out DIR``, ``dataset info DIR`` and ``dataset recover BAG...``.

Exit codes: 0 success, 1 bad input or failed build (one clear line on stderr, no
traceback), 2 usage errors (argparse).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .. import bagio
from ..planes import ViewsFileError, use_views_files

#: Exit code for bad input / failed builds.
EXIT_ERROR = 1


def _crop(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected x,y,w,h in pixels, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dataset`` subcommands."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="bags -> training cache",
                       description="Read rosbag2 bags (MCAP or sqlite3, Humble or Jazzy) and write a "
                                   "training cache: images resized once, poses, ground-truth actions, "
                                   "subject splits, manifest.")
    b.add_argument("bags", nargs="+", metavar="BAGS",
                   help="bag directories, .mcap/.db3 files, or directories searched for bags "
                        "(e.g. a `simulate` output)")
    b.add_argument("--out", required=True, type=Path, help="cache directory to create")
    b.add_argument("--force", action="store_true", help="replace an existing cache at --out")
    b.add_argument("--image-topic", default=bagio.IMAGE_TOPIC,
                   help="sensor_msgs/Image or CompressedImage topic (default %(default)s; when absent, "
                        "the bag's only image topic)")
    b.add_argument("--pose-topic", default=bagio.POSE_TOPIC,
                   help="geometry_msgs/PoseStamped probe pose topic (default %(default)s)")
    b.add_argument("--annotation-topic", default=bagio.ANNOTATION_TOPIC,
                   help="std_msgs/String plane annotation topic (default %(default)s)")
    b.add_argument("--size", type=int, default=224, metavar="PX",
                   help="model input size: images resized to PX x PX (cv2.INTER_AREA when shrinking; default 224)")
    b.add_argument("--crop", type=_crop, default=None, metavar="X,Y,W,H",
                   help="region of interest in source pixels, applied before resizing")
    b.add_argument("--max-pose-gap-ms", type=float, default=20.0, metavar="MS",
                   help="drop frames whose two surrounding poses are further apart (default 20 ms; never "
                        "less than 1.5 x the pose stream's median period, so poses once per frame work)")
    b.add_argument("--annotation-tolerance-s", type=float, default=0.5, metavar="S",
                   help="an annotation up to S seconds before the first or after the last pose takes that "
                        "pose as its target (default 0.5 s)")
    b.add_argument("--probe-calibration", default=None, metavar="YAML",
                   help="tool <- image frame calibration (parent_frame, child_frame, translation_m, "
                        "quaternion_xyzw; docs/DATA.md); default: the bag's /tf_static, else none")
    b.add_argument("--tool-frame", default=None, metavar="FRAME",
                   help="frame whose pose the pose topic carries, for the /tf_static chain to the image "
                        "frame (default: the parent of the image frame's static transform)")
    b.add_argument("--hold-ms", type=float, default=1000.0, metavar="MS",
                   help="frames up to this long after an annotation still belong to its demonstration "
                        "(never past half way to the next annotation; default 1000 ms)")
    b.add_argument("--val-fraction", type=float, default=0.15, help="fraction of subjects for val (0.15)")
    b.add_argument("--test-fraction", type=float, default=0.15, help="fraction of subjects for test (0.15)")
    b.add_argument("--seed", type=int, default=0, help="seed of the subject split (default 0)")
    b.add_argument("--split-file", default=None, metavar="JSON",
                   help='force subjects into splits: {"train": [...], "val": [...], "test": [...]} '
                        "or another cache's manifest.json")
    b.add_argument("--workers", type=int, default=1, help="processes decoding bags in parallel (default 1)")
    b.add_argument("--skip-bad-bags", action="store_true",
                   help="skip (and record) unreadable bags or bags without the topics instead of failing")
    b.add_argument("--views", action="append", default=None, metavar="YAML",
                   help="user views file adding views / aliases to the built-in list (docs/DATA.md, "
                        "'Views'); repeatable")
    b.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    i = sub.add_parser("info", help="summary of a training cache")
    i.add_argument("cache", type=Path, metavar="DIR")
    r = sub.add_parser("recover", help="finalize bags left open by a killed or crashed recorder",
                       description="Repair recorder bags that never closed (recorder killed, crashed, power "
                                   "lost): MCAP files are rewritten with everything up to the last intact chunk "
                                   "(the original is kept as *.mcap.crashed), metadata.yaml is rebuilt. Closed "
                                   "bags are left as they are.")
    r.add_argument("bags", nargs="+", type=Path, metavar="BAG", help="bag directories")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if k else c.ljust(w)  # noqa: E731
                              for k, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def format_summary(manifest: dict[str, Any], cache_dir: str | Path | None = None) -> str:
    """Human summary of a cache: frames per split / plane / subject, skips, action stats."""
    import numpy as np

    tot = manifest["totals"]
    lines = [f"training cache {cache_dir or ''}".rstrip(),
             f"  frames {tot['frames']} of {tot['images_read']} images read, {tot['demos']} demonstrations, "
             f"{tot['scans']} scans, {tot['subjects']} subjects, input {manifest['input_size'][0]} x "
             f"{manifest['input_size'][1]} px, crop {manifest['crop']}",
             f"  manifest_sha256 {manifest['manifest_sha256']}", ""]
    planes = manifest["planes"]
    split_of = {s: k for k, v in manifest["splits"].items() for s in v}
    per: dict[str, dict[str, int]] = {}
    per_subject: dict[str, dict[str, int]] = {}
    for d in manifest["demos"]:
        subj = next(s for s, i in manifest["subjects"].items() if i == d["subject"])
        sp = split_of.get(subj, "-")
        per.setdefault(sp, dict.fromkeys(planes, 0))[planes[d["plane"]]] += d["count"]
        per_subject.setdefault(subj, dict.fromkeys(planes, 0))[planes[d["plane"]]] += d["count"]
    rows = [[sp, len(manifest["splits"].get(sp, [])), *[per.get(sp, {}).get(p, 0) for p in planes],
             sum(per.get(sp, {}).values())] for sp in ("train", "val", "test")]
    lines += [_table(rows, ["split", "subjects", *planes, "frames"]), ""]
    rows = [[s, split_of.get(s, "-"), *[c[p] for p in planes], sum(c.values())]
            for s, c in sorted(per_subject.items())]
    if len(rows) > 30:
        rows = rows[:30] + [[f"... {len(rows) - 30} more", "", *[""] * len(planes), ""]]
    lines += [_table(rows, ["subject", "split", *planes, "frames"]), ""]
    skips = tot["skips"]
    lines.append("skipped frames: " + (", ".join(f"{k} {v}" for k, v in skips.items() if v) or "none"))
    if manifest.get("skipped_bags"):
        lines.append(f"skipped bags: {len(manifest['skipped_bags'])}")
        lines += [f"  {b['path']}: {b['error']}" for b in manifest["skipped_bags"][:10]]
    ign = sum(len(b.get("annotations_ignored", [])) for b in manifest["bags"])
    if ign:
        lines.append(f"ignored annotations: {ign} (not a plane name or no pose at that time)")
    st = manifest["action_stats"]
    mean, std = np.asarray(st["mean"]), np.asarray(st["std"])
    lines += ["", f"action statistics ({st['split']} split, {st['frames']} frames)",
              _table([["mean", *[f"{v:.2f}" for v in mean]], ["std", *[f"{v:.2f}" for v in std]]],
                     ["", *[f"{a} [{u}]" for a, u in zip(st["axes"], st["units"], strict=True)]])]
    return "\n".join(lines)


def _recover(bags: list[Path]) -> int:
    from ..recording import RecordingError, recover_bag

    code = 0
    for bag in bags:
        try:
            rep = recover_bag(bag)
        except (RecordingError, OSError) as exc:
            print(f"cardiac-copilot dataset recover: error: {bag}: {exc}", file=sys.stderr)
            code = EXIT_ERROR
            continue
        n = sum(rep.counts.values())
        if rep.already_finalized:
            print(f"{bag}: closed already ({n} messages), left as it is")
        else:
            print(f"{bag}: recovered {n} messages"
                  + (f" (rewrote {', '.join(rep.rewritten)}; originals kept as *.crashed)" if rep.rewritten else ""))
    return code


def run(args: argparse.Namespace) -> int:
    """Run ``dataset build``, ``dataset info`` or ``dataset recover``."""
    from .build import BuildOptions, DatasetError, build_cache

    try:
        if args.action == "recover":
            return _recover(args.bags)
        if args.action == "info":
            from .dataset import load_manifest

            print(format_summary(load_manifest(args.cache), args.cache))
            return 0
        use_views_files(args.views)
        opts = BuildOptions(image_topic=args.image_topic, pose_topic=args.pose_topic,
                            annotation_topic=args.annotation_topic, size=args.size, crop=args.crop,
                            max_pose_gap_ms=args.max_pose_gap_ms, hold_ms=args.hold_ms,
                            val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                            split_file=args.split_file, workers=args.workers,
                            skip_bad_bags=args.skip_bad_bags,
                            annotation_tolerance_s=args.annotation_tolerance_s,
                            probe_calibration=args.probe_calibration, tool_frame=args.tool_frame)
        t0 = time.perf_counter()
        progress = not args.quiet
        manifest = build_cache(args.bags, args.out, opts, force=args.force, progress=progress,
                               log=lambda s: print(f"dataset build: {s}", file=sys.stderr))
        if not args.quiet:
            print(format_summary(manifest, args.out))
            print(f"\nwrote {args.out} in {time.perf_counter() - t0:.1f} s")
        return 0
    except (DatasetError, ViewsFileError) as exc:
        print(f"cardiac-copilot dataset {args.action}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"cardiac-copilot dataset {args.action}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
