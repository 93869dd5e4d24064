"""``cardiac-copilot demo``: the bedside pipeline on the built-in simulator, in one command.

What runs (all over real DDS, each node in its own process, exactly as on a real setup):

1. a held-out simulated subject and an expert's demonstration scan toward the chosen plane,
   written as a rosbag2 bag like a real recording;
2. ``scanner_sim_node`` replaying that scan live (``/us/image``, ``/probe_pose``), standing in
   for the ultrasound machine and the tracked probe;
3. ``guidance_node`` with the default model bundle, publishing ``/guidance``;
4. this process, listening like RViz would: it prints a live table (plane, 6-DoF guidance in
   mm/deg, the true remaining error, latency) and writes a GIF, a PNG of one frame with the
   guidance drawn on it, a plot of predicted vs true guidance over time and a summary JSON.

It ends by itself after ``--seconds`` of guidance and says where its outputs are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from .planes import PLANE_NAMES
from .pose import ACTION_AXES, ACTION_UNITS, interpolate_poses, pose_to_matrix, relative_action
from .processes import stop_process
from .sim.phantom import SIM_VIEWS, sim_view

#: Held-out subject seeds (training uses the low seeds; see docs/BENCHMARK.md).
DEFAULT_SUBJECT_SEED = 9001


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None,
                        help="model bundle (TorchScript .pt or ONNX .onnx); default: models/default.pt")
    parser.add_argument("--plane", default=PLANE_NAMES[0],
                        help=f"target plane ({', '.join(SIM_VIEWS)}; a view of the bundle)")
    parser.add_argument("--subject-seed", type=int, default=DEFAULT_SUBJECT_SEED,
                        help="simulated subject (a seed the default model never saw)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to guide [s]")
    parser.add_argument("--no-dreamer", action="store_true", help="policy only, no world-model refinement")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/demo-<time>)")
    parser.add_argument("--gif-fps", type=float, default=8.0, help="frames per second of the GIF")
    parser.add_argument("--startup-timeout", type=float, default=60.0,
                        help="seconds to wait for the nodes to start answering")


@dataclass
class Sample:
    """One guidance message matched with the image and the true remaining motion."""

    t_s: float
    predicted: np.ndarray
    truth: np.ndarray | None
    latency_ms: float


@dataclass
class Collector:
    """Thread-safe store of what the listener receives."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    pose_ns: list[int] = field(default_factory=list)
    pose_pos: list[np.ndarray] = field(default_factory=list)
    pose_quat: list[np.ndarray] = field(default_factory=list)
    guidance: list[tuple[int, float, np.ndarray]] = field(default_factory=list)


def _spawn(module: str, ros_args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", module, "--ros-args", *ros_args],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def _truth_at(col: Collector, stamp_ns: int, target_mm: np.ndarray) -> np.ndarray | None:
    with col.lock:
        if len(col.pose_ns) < 2:
            return None
        ns = np.array(col.pose_ns, dtype=np.int64)
        pos = np.array(col.pose_pos)
        quat = np.array(col.pose_quat)
    order = np.argsort(ns, kind="stable")
    p, q, ok = interpolate_poses(np.array([stamp_ns]), ns[order], pos[order], quat[order], max_gap_ns=50_000_000)
    if not ok[0]:
        return None
    return relative_action(pose_to_matrix(p[0], q[0]), target_mm)


def draw_guidance(gray: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None, plane: str,
                  depth_mm: float, latency_ms: float) -> np.ndarray:
    """The ultrasound frame (BGR, enlarged) with predicted (yellow) and true (green) guidance."""
    import cv2

    scale = max(1, 448 // max(gray.shape))
    img = cv2.cvtColor(cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST),
                       cv2.COLOR_GRAY2BGR)
    h, w = img.shape[:2]
    px_per_mm = h / depth_mm
    origin = np.array([w / 2.0, h * 0.45])

    def arrow(action: np.ndarray, color: tuple[int, int, int]) -> None:
        # image plane = probe x (lateral, right) and z (depth, down); elevation y is shown as text
        end = origin + np.array([action[0], action[2]]) * px_per_mm
        cv2.arrowedLine(img, tuple(int(v) for v in origin), tuple(int(v) for v in end), color, 2, cv2.LINE_AA,
                        tipLength=0.2)

    if truth is not None:
        arrow(truth, (80, 220, 80))
    arrow(predicted, (0, 215, 255))
    panel = np.full((h, 300, 3), 24, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    rows: list[tuple[str, tuple[int, int, int]]] = [
        (f"target plane {plane}", (255, 255, 255)), (f"latency {latency_ms:6.1f} ms", (200, 200, 200)), ("", (0, 0, 0)),
        ("guidance (yellow arrow)", (0, 215, 255))]
    rows += [(f"  {a:5s} {v:+7.1f} {u}", (0, 215, 255)) for a, v, u in zip(ACTION_AXES, predicted, ACTION_UNITS,
                                                                          strict=True)]
    if truth is not None:
        rows += [("", (0, 0, 0)), ("true remaining (green)", (80, 220, 80))]
        rows += [(f"  {a:5s} {v:+7.1f} {u}", (80, 220, 80)) for a, v, u in zip(ACTION_AXES, truth, ACTION_UNITS,
                                                                              strict=True)]
    for i, (text, color) in enumerate(rows):
        cv2.putText(panel, text, (10, 24 + 21 * i), font, 0.55, color, 1, cv2.LINE_AA)
    img = np.concatenate([img, panel], axis=1)
    return img


def plot_guidance(samples: list[Sample], plane: str, path: Path) -> None:
    """Predicted vs true guidance per axis over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s.t_s for s in samples])
    pred = np.array([s.predicted for s in samples])
    true = np.array([s.truth if s.truth is not None else np.full(6, np.nan) for s in samples])
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
    for i, ax in enumerate(axes.ravel()):
        ax.plot(t, true[:, i], color="tab:green", lw=2, label="true remaining motion")
        ax.plot(t, pred[:, i], color="tab:orange", lw=1.2, label="guidance (predicted)")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_title(f"{ACTION_AXES[i]} [{ACTION_UNITS[i]}]")
        ax.grid(alpha=0.3)
        if i >= 3:
            ax.set_xlabel("time [s]")
    axes[0, 0].legend(loc="best", fontsize=8)
    fig.suptitle(f"Guidance to {plane} on a held-out simulated subject")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(s: Sample, plane: str) -> str:
    g = " ".join(f"{v:+7.1f}" for v in s.predicted)
    if s.truth is not None:
        from .pose import action_to_matrix, rotation_angle_deg

        err_mm = float(np.linalg.norm(s.truth[:3]))
        err_deg = float(rotation_angle_deg(action_to_matrix(s.truth)[:3, :3]))
        rem = f"{err_mm:6.1f} mm {err_deg:5.1f} deg"
    else:
        rem = "     n/a        "
    return f"{s.t_s:6.1f} {plane:8s} {g}  {rem} {s.latency_ms:7.1f}"


def run(args: argparse.Namespace) -> int:
    import rclpy
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from tqdm import tqdm

    from .nodes.conversions import image_msg_to_gray, stamp_to_ns, twist_msg_to_action
    from .nodes.lifecycle import BackgroundSpin
    from .runtime import default_fine_model_path, default_model_path
    from .sim.phantom import make_subject
    from .sim.scan import scan_seed, write_scan

    bundle = (args.bundle or default_model_path()).expanduser()
    if not bundle.is_file():
        print(f"demo: model bundle not found: {bundle}\n"
              "  train and export one (README: Training and evaluation) or pass --bundle FILE", file=sys.stderr)
        return 2
    from .model.bundle import BundleError, _inspect_archive
    from .planes import match_view

    try:
        plane = sim_view(args.plane)
    except ValueError as exc:
        print(f"demo: --plane: {exc}", file=sys.stderr)
        return 2
    try:  # fail early when the model does not know the view (other formats: the node says so)
        model_planes = _inspect_archive(bundle)[1].get("planes") or list(PLANE_NAMES)
        match_view(plane, model_planes)
    except BundleError:
        pass
    except ValueError:
        print(f"demo: --plane {plane}: the model {bundle.name} knows only {', '.join(model_planes)}; "
              f"train one on {plane} scans (docs/SIMULATOR.md, 'A4C') and pass --bundle", file=sys.stderr)
        return 2
    out = args.out or Path("outputs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"cardiac-copilot demo: plane {plane}, subject seed {args.subject_seed} (held out), "
          f"bundle {bundle}, outputs in {out}/")

    # 1. a held-out subject and an expert's scan toward the plane, as a real bag
    subject = make_subject(args.subject_seed)
    target_mm = subject.target_pose(plane)
    bag = out / "scan"
    if bag.exists():
        import shutil

        shutil.rmtree(bag)
    frames = int(max(60, (args.seconds + 10.0) * 30))
    with tqdm(total=frames, desc="simulating scan", unit="frame", leave=False) as bar:
        write_scan(bag, subject, plane, scan_seed(subject.seed, plane, 0), frames=frames, progress=bar)

    # 2.-3. the nodes, each in its own process
    sim = _spawn("cardiac_copilot_ros.nodes.scanner_sim_node",
                 ["-p", f"replay_bag:={bag}", "-p", "replay_loop:=true", "-p", f"target_plane:={plane}",
                  "-r", "image:=/us/image", "-r", "probe_pose:=/probe_pose"], out / "scanner_sim_node.log")
    # the default model comes with its fine stage (coarse to fine); a bundle of the user's own runs alone
    fine = default_fine_model_path() if args.bundle is None else None
    guidance = _spawn("cardiac_copilot_ros.nodes.guidance_node",
                      ["-p", f"model_path:={bundle.resolve()}", "-p", f"target_plane:={plane}",
                       "-p", f"fine_model_path:={fine.resolve() if fine else 'none'}",
                       "-p", f"use_dreamer:={'false' if args.no_dreamer else 'true'}",
                       "-p", "publish_tf:=false",
                       "-r", "image:=/us/image", "-r", "probe_pose:=/probe_pose"], out / "guidance_node.log")

    # 4. the listener
    col = Collector()
    rclpy.init()
    node = rclpy.create_node("copilot_demo")

    def on_image(msg: Image) -> None:
        try:
            gray = image_msg_to_gray(msg)
        except ValueError:
            return
        with col.lock:
            col.images[stamp_to_ns(msg.header.stamp)] = gray
            if len(col.images) > 300:
                for k in sorted(col.images)[:100]:
                    del col.images[k]

    def on_pose(msg: PoseStamped) -> None:
        p, q = msg.pose.position, msg.pose.orientation
        with col.lock:
            col.pose_ns.append(stamp_to_ns(msg.header.stamp))
            col.pose_pos.append(np.array([p.x, p.y, p.z]))
            col.pose_quat.append(np.array([q.x, q.y, q.z, q.w]))
            if len(col.pose_ns) > 5000:
                del col.pose_ns[:1000], col.pose_pos[:1000], col.pose_quat[:1000]

    def on_guidance(msg: TwistStamped) -> None:
        now = time.time_ns()
        with col.lock:
            col.guidance.append((stamp_to_ns(msg.header.stamp), now, twist_msg_to_action(msg)))

    node.create_subscription(Image, "/us/image", on_image, qos_profile_sensor_data)
    node.create_subscription(PoseStamped, "/probe_pose", on_pose, 100)
    node.create_subscription(TwistStamped, "/guidance", on_guidance, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = BackgroundSpin(executor, name="demo-spin")

    samples: list[Sample] = []
    frames_out: list[np.ndarray] = []
    rc = 0
    try:
        deadline = time.monotonic() + args.startup_timeout
        while time.monotonic() < deadline:
            with col.lock:
                started = bool(col.guidance)
            if started or guidance.poll() is not None or sim.poll() is not None:
                break
            time.sleep(0.1)
        if not col.guidance:
            print(f"demo: no guidance within {args.startup_timeout:.0f} s; see {out}/guidance_node.log and "
                  f"{out}/scanner_sim_node.log", file=sys.stderr)
            return 1
        header = (f"{'t [s]':>6} {'plane':8s} " + " ".join(f"{a:>7s}" for a in
                  ("x mm", "y mm", "z mm", "r deg", "p deg", "y deg")) + "  true remaining error  latency ms")
        tqdm.write(header)
        t0 = time.monotonic()
        next_row = 0.0
        next_gif = 0.0
        seen = 0
        depth_mm = 160.0
        with tqdm(total=int(args.seconds), desc="guiding", unit="s", leave=False,
                  bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s") as bar:
            while (elapsed := time.monotonic() - t0) < args.seconds:
                if guidance.poll() is not None:
                    print(f"demo: guidance_node exited; see {out}/guidance_node.log", file=sys.stderr)
                    return 1
                time.sleep(0.05)
                with col.lock:
                    new = col.guidance[seen:]
                    seen = len(col.guidance)
                for stamp_ns, recv_ns, action in new:
                    sample = Sample(elapsed, action, _truth_at(col, stamp_ns, target_mm),
                                    (recv_ns - stamp_ns) / 1e6)
                    samples.append(sample)
                    if elapsed >= next_row:
                        tqdm.write(_row(sample, plane))
                        next_row = elapsed + 1.0
                    if elapsed >= next_gif:
                        with col.lock:
                            gray = col.images.get(stamp_ns)
                        if gray is not None:
                            frames_out.append(draw_guidance(gray, action, sample.truth, plane, depth_mm,
                                                            sample.latency_ms))
                            next_gif = elapsed + 1.0 / args.gif_fps
                bar.update(int(elapsed) - bar.n)
    except KeyboardInterrupt:
        rc = 130
    finally:
        stop_process(guidance)
        stop_process(sim)
        spin.stop()
        node.destroy_node()
        rclpy.try_shutdown()

    if not samples:
        return rc or 1
    return _write_outputs(out, samples, frames_out, plane, args) or rc


def _write_outputs(out: Path, samples: list[Sample], frames: list[np.ndarray], plane: str,
                   args: argparse.Namespace) -> int:
    import cv2
    import imageio.v2 as imageio

    with_truth = [s for s in samples if s.truth is not None]
    lat = np.array([s.latency_ms for s in samples])
    summary = {
        "plane": plane, "subject_seed": args.subject_seed, "use_dreamer": not args.no_dreamer,
        "guidance_messages": len(samples), "rate_hz": len(samples) / max(args.seconds, 1e-9),
        "latency_ms": {k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))},
    }
    if with_truth:
        err = np.abs(np.array([s.predicted - s.truth for s in with_truth]))
        summary["mae"] = dict(zip([f"{a}_{u}" for a, u in zip(ACTION_AXES, ACTION_UNITS, strict=True)],
                                  err.mean(axis=0).round(3).tolist(), strict=True))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    outputs = [out / "summary.json"]
    if frames:
        imageio.mimsave(out / "guidance.gif", [f[..., ::-1] for f in frames], duration=1.0 / args.gif_fps, loop=0)
        cv2.imwrite(str(out / "guidance_frame.png"), frames[len(frames) // 2])
        outputs += [out / "guidance.gif", out / "guidance_frame.png"]
    plot_guidance(samples, plane, out / "guidance_vs_truth.png")
    outputs.append(out / "guidance_vs_truth.png")
    print(f"\n{len(samples)} guidance messages at {summary['rate_hz']:.1f} Hz, latency p50 "
          f"{summary['latency_ms']['p50']:.1f} ms, p95 {summary['latency_ms']['p95']:.1f} ms")
    if "mae" in summary:
        print("mean absolute error vs the true remaining motion: "
              + ", ".join(f"{k} {v:.1f}" for k, v in summary["mae"].items()))
    print("outputs:\n" + "\n".join(f"  {p}" for p in outputs))
    return 0
