"""Simulated scans written as rosbag2 bags, exactly like a real recording.

Timing like real hardware (docs/SIMULATOR.md, docs/ARCHITECTURE.md):

* probe poses at ``pose_rate_hz`` (250 Hz) on the arm's clock; header stamp = acquisition
  time, bag log time = stamp + 0.3-2 ms transport latency;
* images at ~30 Hz on the ultrasound machine's own clock (random phase, clock-rate error up
  to +-200 ppm, +-1 ms acquisition jitter); header stamp = acquisition time, log time =
  stamp + 35-60 ms processing / capture latency with jitter, so images and poses are not
  aligned one to one and arrive late;
* the expert's "target reached" moment as a std_msgs/String (the plane's canonical name)
  logged at that time.

Subject ``i`` of ``write_scans(seed=S)`` has subject seed ``S + i``, so held-out subjects are
simply other seeds. Scan seeds derive from (subject seed, plane, scan number).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import bagio, code_version
from ..planes import PLANE_NAMES, parse_plane
from ..pose import matrix_to_pose
from .expert import Demonstration, demonstration
from .phantom import Subject, make_subject, sim_view
from .render import Renderer

INDEX_FORMAT = "cardiac_copilot_sim_index"
INDEX_VERSION = 1
IMAGE_RATE_HZ = 30.0
POSE_RATE_HZ = 250.0
IMAGE_FRAME = "us_image"
BASE_FRAME = "panda_link0"
PROBE_FRAME = "us_probe"
#: Epoch of the simulated clocks (2024-01-01T00:00:00Z) so bags are reproducible.
EPOCH_NS = 1_704_067_200 * 1_000_000_000


def scan_seed(subject_seed: int, plane: str, k: int) -> int:
    """Deterministic seed of scan ``k`` of ``plane`` on a subject."""
    ss = np.random.SeedSequence([0x5CA7, int(subject_seed), parse_plane(plane).index, int(k)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def image_times(rng: np.random.Generator, n_frames: int, rate_hz: float = IMAGE_RATE_HZ
                ) -> tuple[np.ndarray, np.ndarray]:
    """Acquisition times (s, from the scan start) and latencies (s) of ``n_frames`` images."""
    period = (1.0 + rng.uniform(-2e-4, 2e-4)) / rate_hz
    phase = rng.uniform(0.05, 0.05 + period)
    t = phase + np.arange(n_frames) * period + rng.uniform(-1e-3, 1e-3, n_frames)
    latency = rng.uniform(0.035, 0.050) + rng.exponential(0.004, n_frames)
    return t, np.minimum(latency, 0.060)


def write_scan(path: str | Path, subject: Subject, plane: str, seed: int, frames: int = 1500,
               image_size: int = 224, storage: str = "mcap", renderer: Renderer | None = None,
               heartbeat: bool = True, progress: Any = None) -> dict:
    """Write one scan bag; returns its index entry (without the bag path made relative)."""
    name = parse_plane(plane).name
    if frames < 10:
        raise ValueError(f"frames per scan must be >= 10, got {frames}")
    rng = np.random.default_rng(np.random.SeedSequence([0xBA6, int(seed)]))
    t_img, lat_img = image_times(rng, frames)
    duration = float(t_img[-1] + 0.1)
    demo: Demonstration = demonstration(subject, name, rng, duration_s=duration, pose_rate_hz=POSE_RATE_HZ)
    if renderer is None:
        renderer = Renderer(subject, size=image_size, heartbeat=heartbeat)
    t0_ns = EPOCH_NS + int(seed % 1_000_000) * 1_000_000_000

    def ns(t: np.ndarray) -> np.ndarray:
        return t0_ns + np.round(np.asarray(t) * 1e9).astype(np.int64)

    pose_stamp = ns(demo.t_s)
    pose_log = pose_stamp + np.round((0.0003 + rng.exponential(0.0004, demo.t_s.size)) * 1e9).astype(np.int64)
    img_stamp = ns(t_img)
    img_log = img_stamp + np.round(lat_img * 1e9).astype(np.int64)
    ann_log = int(ns(demo.reach_time_s))
    positions, quats = matrix_to_pose(demo.poses)
    img_poses = demo.pose_at(t_img)

    # merge the three streams in log-time order
    events = ([(int(v), 0, i) for i, v in enumerate(pose_log)] + [(int(v), 1, i) for i, v in enumerate(img_log)]
              + [(ann_log, 2, 0)])
    events.sort()
    target = demo.target_pose
    with bagio.BagWriter(path, storage=storage) as bag:
        c_img = bag.add_topic(bagio.IMAGE_TOPIC, bagio.IMAGE_TYPE)
        c_pose = bag.add_topic(bagio.POSE_TOPIC, bagio.POSE_TYPE)
        c_ann = bag.add_topic(bagio.ANNOTATION_TOPIC, bagio.STRING_TYPE)
        bag.set_metadata("cardiac_copilot.subject_id", subject.subject_id)
        bag.set_metadata("cardiac_copilot.session_label", Path(path).name)
        bag.set_metadata("cardiac_copilot.code_version", code_version())
        bag.set_metadata("cardiac_copilot.sim.seed", str(int(seed)))
        bag.set_metadata("cardiac_copilot.sim.subject_seed", str(subject.seed))
        bag.set_metadata("cardiac_copilot.sim.plane", name)
        bag.set_metadata("cardiac_copilot.sim.target_pose", ",".join(f"{v:.9g}" for v in target.ravel()))
        bag.set_metadata("cardiac_copilot.sim.image_rate_hz", f"{IMAGE_RATE_HZ:g}")
        bag.set_metadata("cardiac_copilot.sim.pose_rate_hz", f"{POSE_RATE_HZ:g}")
        bag.set_metadata("cardiac_copilot.sim.depth_mm", f"{renderer.depth_mm:g}")
        bag.set_metadata("cardiac_copilot.sim.sector_deg", f"{renderer.sector_deg:g}")
        for log_ns, kind, i in events:
            if kind == 0:
                bag.write(c_pose, log_ns, bagio.make_pose_stamped(int(pose_stamp[i]), BASE_FRAME,
                                                                  positions[i], quats[i]))
            elif kind == 1:
                img = renderer.render(img_poses[i], float(t_img[i]))
                bag.write(c_img, log_ns, bagio.make_image(int(img_stamp[i]), IMAGE_FRAME, img))
                if progress is not None:
                    progress.update(1)
            else:
                bag.write(c_ann, log_ns, bagio.make_string(name))
    return {"subject_id": subject.subject_id, "plane": name, "seed": int(seed), "frames": int(frames),
            "poses": int(demo.t_s.size), "reach_time_s": round(demo.reach_time_s, 4),
            "start_offset": [round(float(v), 4) for v in demo.start_offset]}


def write_scans(out_dir: str | Path, n_subjects: int, scans_per_plane: int, seed: int = 0,
                frames_per_scan: int = 1500, image_size: int = 224, planes: list[str] | None = None,
                storage: str = "mcap", progress: bool = True, heartbeat: bool = True) -> dict:
    """Write ``n_subjects x len(planes) x scans_per_plane`` scan bags and ``out_dir/index.json``.

    Returns the index: ``subjects`` [{subject_id, seed}], ``scans`` [{bag (relative to
    out_dir), subject_id, plane, seed, frames, ...}] plus the settings used.
    """
    if n_subjects < 1 or scans_per_plane < 1:
        raise ValueError("need at least one subject and one scan per plane")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    plane_names = [sim_view(p) for p in (planes or PLANE_NAMES)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = [make_subject(seed + i) for i in range(n_subjects)]
    jobs = [(s, p, k) for s in subjects for p in plane_names for k in range(scans_per_plane)]
    for s, p, k in jobs:
        bag = out / f"{s.subject_id}_{p}_{k:02d}"
        if bag.exists():
            raise FileExistsError(f"{bag} exists; choose an empty --out directory")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs) * frames_per_scan, unit="frame", desc="simulate")
    scans = []
    try:
        for s in subjects:
            renderer = Renderer(s, size=image_size, heartbeat=heartbeat)
            for p in plane_names:
                for k in range(scans_per_plane):
                    name = f"{s.subject_id}_{p}_{k:02d}"
                    entry = write_scan(out / name, s, p, scan_seed(s.seed, p, k), frames=frames_per_scan,
                                       image_size=image_size, storage=storage, renderer=renderer,
                                       progress=bar)
                    scans.append({"bag": name, **entry})
    finally:
        if bar is not None:
            bar.close()
    index = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "seed": int(seed),
             "frames_per_scan": int(frames_per_scan), "image_size": int(image_size),
             "storage": storage, "heartbeat": bool(heartbeat), "planes": plane_names,
             "image_rate_hz": IMAGE_RATE_HZ, "pose_rate_hz": POSE_RATE_HZ,
             "code_version": code_version(),
             "subjects": [{"subject_id": s.subject_id, "seed": s.seed} for s in subjects],
             "scans": scans}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
