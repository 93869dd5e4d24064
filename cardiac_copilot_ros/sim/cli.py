"""``cardiac-copilot simulate``: write simulated expert-demonstration bags and/or a preview.

Examples::

    cardiac-copilot simulate --subjects 8 --scans-per-plane 2 --out data/sim --seed 0
    cardiac-copilot simulate --preview docs/sim_preview.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..planes import PLANE_NAMES
from .phantom import SIM_VIEWS, sim_view


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", type=int, default=4, metavar="N", help="number of subjects (default 4)")
    parser.add_argument("--scans-per-plane", type=int, default=1, metavar="K",
                        help="scans per subject and plane (default 1)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output directory for the bags and index.json")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="subject i gets seed S + i; held-out subjects = other seeds (default 0)")
    parser.add_argument("--frames-per-scan", type=int, default=1500, metavar="F",
                        help="images per scan at 30 Hz (default 1500, like the paper's scans)")
    parser.add_argument("--image-size", type=int, default=224, metavar="PX", help="square image side (224)")
    parser.add_argument("--planes", "--plane", nargs="+", default=None, metavar="PLANE",
                        help=f"views to scan (default the paper's planes: {' '.join(PLANE_NAMES)}; "
                             f"simulated views: {' '.join(SIM_VIEWS)})")
    parser.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap", help="bag storage (mcap)")
    parser.add_argument("--no-heartbeat", action="store_true", help="static heart (no cardiac cycle)")
    parser.add_argument("--preview", type=Path, default=None, metavar="FILE.png",
                        help="draw the target planes (those of --planes, default the paper's three) of a "
                             "few subjects side by side into FILE.png")
    parser.add_argument("--preview-subjects", type=int, default=4, metavar="N",
                        help="subjects in the preview (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def write_preview(path: Path, seed: int = 0, n_subjects: int = 4, size: int = 224,
                  planes: list[str] | None = None) -> Path:
    """A PNG grid: one row per subject, one column per plane (image | label overlay)."""
    import cv2

    from .phantom import make_subject
    from .render import Renderer

    pad, title_h = 6, 22
    colors = _label_colors()
    rows = []
    for i in range(n_subjects):
        s = make_subject(seed + i)
        r = Renderer(s, size=size)
        tiles = []
        for name in planes or PLANE_NAMES:
            T = s.target_pose(name)
            img = cv2.cvtColor(r.render(T), cv2.COLOR_GRAY2BGR)
            lab = colors[r.labels(T)]
            both = np.hstack([img, np.full((size, 2, 3), 40, np.uint8), lab])
            head = np.zeros((title_h, both.shape[1], 3), np.uint8)
            cv2.putText(head, f"{s.subject_id} {name}: image | labels", (4, 16),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45, (230, 230, 230), 1, cv2.LINE_AA)
            tiles.append(np.vstack([head, both]))
            tiles.append(np.zeros((tiles[-1].shape[0], pad, 3), np.uint8))
        rows.append(np.hstack(tiles[:-1]))
        rows.append(np.zeros((pad, rows[-1].shape[1], 3), np.uint8))
    grid = np.vstack(rows[:-1])
    grid = np.vstack([grid, _legend(grid.shape[1], colors)])
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid):
        raise OSError(f"cannot write {path}")
    return path


def _label_colors() -> np.ndarray:
    from .phantom import Label

    c = np.zeros((len(Label), 3), np.uint8)  # BGR
    table = {Label.OUTSIDE_SECTOR: (0, 0, 0), Label.BACKGROUND: (70, 70, 70), Label.LV: (60, 60, 220),
             Label.RV: (220, 120, 40), Label.LA: (60, 180, 240), Label.RA: (200, 80, 200),
             Label.MYOCARDIUM: (90, 140, 110), Label.AORTA: (40, 40, 150), Label.MITRAL_VALVE: (0, 255, 255),
             Label.AORTIC_VALVE: (255, 255, 0), Label.PERICARDIUM: (230, 230, 230), Label.BLOOD: (120, 0, 90),
             Label.WALL: (150, 170, 170), Label.CHEST_WALL: (110, 100, 80), Label.RIB: (255, 255, 255)}
    for k, v in table.items():
        c[int(k)] = v
    return c


def _legend(width: int, colors: np.ndarray) -> np.ndarray:
    import cv2

    from .phantom import Label

    lines: list[np.ndarray] = []
    leg = np.zeros((24, width, 3), np.uint8)
    x = 6
    for lab in Label:
        if lab == Label.OUTSIDE_SECTOR:
            continue
        text = lab.name.lower()
        w = 24 + 8 * len(text)
        if x + w > width:
            lines.append(leg)
            leg, x = np.zeros((24, width, 3), np.uint8), 6
        cv2.rectangle(leg, (x, 6), (x + 12, 18), tuple(int(v) for v in colors[int(lab)]), -1)
        cv2.putText(leg, text, (x + 16, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (220, 220, 220), 1, cv2.LINE_AA)
        x += w
    lines.append(leg)
    return np.vstack(lines)


def run(args: argparse.Namespace) -> int:
    if args.out is None and args.preview is None:
        print("simulate: give --out DIR (bags) and/or --preview FILE.png", file=sys.stderr)
        return 2
    try:
        planes = [sim_view(p) for p in args.planes] if args.planes else None
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    if args.subjects < 1 or args.scans_per_plane < 1 or args.frames_per_scan < 10 or args.seed < 0:
        print("simulate: need --subjects >= 1, --scans-per-plane >= 1, --frames-per-scan >= 10, --seed >= 0",
              file=sys.stderr)
        return 2
    if not 32 <= args.image_size <= 2048:
        print("simulate: --image-size must be 32..2048", file=sys.stderr)
        return 2
    if args.preview is not None:
        path = write_preview(args.preview, seed=args.seed, n_subjects=max(1, args.preview_subjects),
                             size=args.image_size, planes=planes)
        print(f"preview written to {path}")
    if args.out is not None:
        from .scan import write_scans

        try:
            index = write_scans(args.out, args.subjects, args.scans_per_plane, seed=args.seed,
                                frames_per_scan=args.frames_per_scan, image_size=args.image_size,
                                planes=planes, storage=args.storage, progress=not args.no_progress,
                                heartbeat=not args.no_heartbeat)
        except (FileExistsError, ValueError) as exc:
            print(f"simulate: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {len(index['scans'])} bags for {len(index['subjects'])} subjects to {args.out} "
              f"(index: {args.out / 'index.json'})")
    return 0
