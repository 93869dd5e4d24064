"""``cardiac-copilot bench guidance``: guidance latency over DDS, node and publisher in separate processes.

The guidance node runs in a process of its own (``python -m cardiac_copilot_ros.nodes.guidance_node``);
a publisher process (this module's ``__main__``) sends simulator frames at a fixed rate, stamped
with the wall clock at publication, and receives ``guidance``. Measured per row:
frame-stamp-to-guidance-received latency p50/p95/p99 (ms), guidance rate (Hz), the share of
frames without guidance (dropped, by the node's newest-frame policy or by the best-effort
transport) and the node process's CPU use (psutil; 100 % = one core).

Rows: the default bundle at ``--rate`` once per inference engine (``--engines``, default every
engine available here: ``torch`` = TorchScript, ``onnxruntime`` = ONNX Runtime on an ``.onnx``
copy: the ``.onnx`` beside the bundle when it holds the same model, else converted once into a
temporary folder), then at ``--high-rate`` and the paper's architecture (ResNet-34, 224 x 224,
untrained: timing only) at ``--rate`` with the faster engine of those rows (the paper row:
torch). Every row has ``engine`` and ``node_inference_ms_p50`` (the model time in the node);
the printed speed-up is TorchScript's model time over each other engine's. The JSON's top-level
keys describe the fastest engine's default row. Without ``models/default.pt`` the default row
uses an untrained bundle of the ``cpu`` training preset's architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..processes import stop_process

MEASURE_START = "MEASURE_START"
MEASURE_END = "MEASURE_END"
NAMESPACE = "/guidance_bench"


def _size(text: str) -> tuple[int, int]:
    """``WxH`` -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 224x224, got {text!r}") from None
    if not (16 <= w <= 4096 and 16 <= h <= 4096):
        raise argparse.ArgumentTypeError(f"size must be 16..4096 px per side, got {text}")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle for the default row (default: models/default.pt; if absent, an untrained "
                             "bundle of the cpu preset's architecture)")
    parser.add_argument("--rate", type=float, default=30.0, help="input frame rate in Hz (default 30)")
    parser.add_argument("--high-rate", type=float, default=120.0,
                        help="second input rate for the default bundle, to show bounded latency (0: skip)")
    parser.add_argument("--size", type=_size, default=(224, 224), help="published frame size WxH (224x224)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of frames before measuring")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-architecture row")
    parser.add_argument("--no-dreamer", action="store_true", help="policy only (default: Dreamer refinement)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="node's device")
    parser.add_argument("--num-threads", type=int, default=0, help="node's torch threads (0: node default)")
    parser.add_argument("--engines", default=None,
                        help="comma-separated engines for the default bundle's rows (torch, onnxruntime); "
                             "default: every engine available here")


# ---------------------------------------------------------------------------------------
# Orchestrator (no rclpy here)
# ---------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
    env["PYTHONUNBUFFERED"] = "1"
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _bundles(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path]]:
    from ..model.bundle import make_untrained_bundle
    from ..runtime import default_model_path

    out: list[tuple[str, Path]] = []
    path = args.bundle or default_model_path()
    if path.is_file():
        out.append((f"default ({path.name})", path))
    else:
        if args.bundle is not None:
            raise SystemExit(f"bench guidance: bundle {args.bundle} not found")
        try:
            from ..training.config import PRESETS

            backbone, size = PRESETS["cpu"]["backbone"], int(PRESETS["cpu"]["input_size"])
        except Exception:
            backbone, size = "resnet18", 96
        print(f"{path} is absent: the default row uses an untrained {backbone} at {size} px "
              "(the cpu preset's architecture; timing only)")
        out.append((f"default: untrained {backbone} {size}px", make_untrained_bundle(
            tmp / "default_standin.pt", backbone=backbone, input_size=(size, size))))
    if not args.no_paper:
        out.append(("paper: untrained resnet34 224px",
                    make_untrained_bundle(tmp / "paper_resnet34_224.pt", backbone="resnet34", input_size=(224, 224))))
    return out


def _engines(args: argparse.Namespace) -> list[str]:
    from ..model.onnx_bundle import onnxruntime_available

    if args.engines:
        names = [e.strip() for e in str(args.engines).split(",") if e.strip()]
        bad = [e for e in names if e not in ("torch", "onnxruntime")]
        if bad or not names:
            raise SystemExit(f"bench guidance: --engines takes torch and/or onnxruntime, got {args.engines!r}")
        return names
    return ["torch", "onnxruntime"] if onnxruntime_available() else ["torch"]


def _onnx_copy(bundle: Path, tmp: Path) -> Path:
    """The .onnx to run for ``bundle``: itself, the same model beside it, or a conversion into ``tmp``."""
    from ..model import onnx_bundle
    from ..model.bundle import BundleError, load_bundle

    if onnx_bundle.is_onnx_file(bundle):
        return bundle
    sibling = bundle.with_suffix(".onnx")
    if sibling.is_file():
        try:
            if onnx_bundle.load_onnx(sibling).meta == load_bundle(bundle).meta:
                return sibling
        except BundleError:
            pass
    out = tmp / f"{bundle.stem}.onnx"
    print(f"converting {bundle.name} to ONNX for the onnxruntime row ...", flush=True)
    res = onnx_bundle.export_onnx_bundle(bundle, out)
    worst = max(res["max_abs_diff"].values())
    if not worst <= onnx_bundle.TOLERANCE:
        raise SystemExit(f"bench guidance: the ONNX conversion of {bundle} differs by {worst:.3g} mm/deg")
    return out


def _measure(label: str, bundle: Path, rate_hz: float, args: argparse.Namespace, tmp: Path,
             env: dict[str, str], engine: str = "torch") -> dict[str, Any]:
    import psutil

    tag = f"{len(list(tmp.glob('row*.json')))}"
    cfg = {"namespace": NAMESPACE, "rate_hz": rate_hz, "size_wh": list(args.size), "seconds": args.seconds,
           "warmup_s": args.warmup, "out": str(tmp / f"row{tag}.json")}
    cfg_path = tmp / f"cfg{tag}.json"
    cfg_path.write_text(json.dumps(cfg))
    node_log = tmp / f"node{tag}.log"
    node_cmd = [sys.executable, "-m", "cardiac_copilot_ros.nodes.guidance_node", "--ros-args",
                "-r", f"__ns:={NAMESPACE}", "-p", f"model_path:={bundle}", "-p", f"device:={args.device}",
                "-p", f"num_threads:={int(args.num_threads)}", "-p", f"engine:={engine}",
                "-p", f"use_dreamer:={'false' if args.no_dreamer else 'true'}"]
    with open(node_log, "wb") as log:
        node = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    pub = subprocess.Popen([sys.executable, "-m", "cardiac_copilot_ros.bench.guidance", str(cfg_path)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu = float("nan")
    pub_out: list[str] = []
    try:
        proc = psutil.Process(node.pid)
        assert pub.stdout is not None
        for line in pub.stdout:
            pub_out.append(line)
            if line.startswith(MEASURE_START):
                proc.cpu_percent(None)
            elif line.startswith(MEASURE_END):
                cpu = proc.cpu_percent(None)
            if node.poll() is not None:
                break
        pub.wait(timeout=60)
    finally:
        for p in (pub, node):
            stop_process(p, 20.0)
    out_path = Path(cfg["out"])
    if not out_path.exists():
        raise SystemExit(f"bench guidance: row {label!r} failed.\npublisher:\n{''.join(pub_out)[-3000:]}\n"
                         f"node:\n{node_log.read_text(errors='replace')[-3000:]}")
    res = json.loads(out_path.read_text())
    res.update(name=label, bundle=str(bundle), input_rate_hz=rate_hz, cpu_percent=cpu,
               size_wh=list(args.size), dreamer=not args.no_dreamer, engine=engine)
    res.setdefault("node_inference_ms_p50", None)
    return res


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | engine | input rate (Hz) | guidance (Hz) | p50 (ms) | p95 (ms) | p99 (ms) | dropped | "
            "node CPU (% of a core) | inference p50 in node (ms) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lat = r["latency_ms"]
        inf = r.get("node_inference_ms_p50")
        lines.append(f"| {r['name']} | {r.get('engine', 'torch')} | {r['input_rate_hz']:.0f} | {r['rate_hz']:.1f} | "
                     f"{lat['p50']:.1f} | "
                     f"{lat['p95']:.1f} | {lat['p99']:.1f} | {100 * r['dropped_ratio']:.0f} % | "
                     f"{r['cpu_percent']:.0f} | {'-' if inf is None else f'{inf:.1f}'} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    env = _env()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_guidance_") as tmp_s:
        tmp = Path(tmp_s)
        bundles = _bundles(args, tmp)
        engines = _engines(args)
        label0, path0 = bundles[0]
        for engine in engines:
            path = _onnx_copy(path0, tmp) if engine == "onnxruntime" else path0
            print(f"measuring {label0} on {engine} at {args.rate:g} Hz for {args.seconds:g} s ...", flush=True)
            rows.append(_measure(label0, path, args.rate, args, tmp, env, engine))
        engine_rows = list(rows)
        best = min(engine_rows, key=lambda r: (r["node_inference_ms_p50"] is None,
                                               r["node_inference_ms_p50"] or 0.0))
        plan = []
        if args.high_rate > 0:
            plan.append((label0, Path(best["bundle"]), args.high_rate, best["engine"]))
        plan += [(label, path, args.rate, "torch") for label, path in bundles[1:]]
        for label, path, rate, engine in plan:
            print(f"measuring {label} on {engine} at {rate:g} Hz for {args.seconds:g} s ...", flush=True)
            rows.append(_measure(label, path, rate, args, tmp, env, engine))
    w, h = args.size
    print(f"\nGuidance latency: frame stamp -> guidance received, {w}x{h} simulator frames over DDS, "
          f"Dreamer {'off' if args.no_dreamer else 'on'}, {os.cpu_count()} CPU cores")
    print(_table(rows))
    speedups = _speedups(engine_rows)
    for name, ratio in speedups.items():
        torch_ms = next(r["node_inference_ms_p50"] for r in engine_rows if r["engine"] == "torch")
        other_ms = next(r["node_inference_ms_p50"] for r in engine_rows if r["engine"] == name)
        print(f"speed-up of {name} over torch (model time in the node, p50): {torch_ms:.1f} / {other_ms:.1f} ms "
              f"= {ratio:.2f}x")
    first = best
    p99 = first["latency_ms"]["p99"]
    verdict = "met" if p99 <= 60.0 else f"missed by {p99 - 60.0:.1f} ms"
    print(f"\ntarget p99 <= 60 ms for the default bundle at {args.rate:g} Hz ({first['engine']}): {verdict} "
          f"(p99 {p99:.1f} ms)")
    if args.json:
        doc = {"latency_ms": first["latency_ms"], "rate_hz": first["rate_hz"],
               "dropped_ratio": first["dropped_ratio"], "cpu_percent": first["cpu_percent"], "rows": rows,
               "engine": first["engine"], "node_inference_ms_p50": first["node_inference_ms_p50"],
               "engines": [{k: r[k] for k in ("engine", "node_inference_ms_p50", "latency_ms", "rate_hz",
                                              "dropped_ratio", "cpu_percent")} for r in engine_rows],
               "speedup_vs_torch": speedups}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0


def _speedups(engine_rows: list[dict[str, Any]]) -> dict[str, float]:
    """TorchScript's model time in the node over each other engine's (p50), where both were measured."""
    times = {r["engine"]: r["node_inference_ms_p50"] for r in engine_rows}
    base = times.get("torch")
    if not base:
        return {}
    return {k: round(base / v, 3) for k, v in times.items() if k != "torch" and v}


# ---------------------------------------------------------------------------------------
# Publisher process (rclpy)
# ---------------------------------------------------------------------------------------

def _render_frames(size_wh: tuple[int, int], n: int = 30) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Simulator frames along a small sweep around the PLAX target (or noise without the simulator)."""
    from .. import pose as pose_alg

    w, h = size_wh
    try:
        from ..sim.phantom import make_subject
        from ..sim.render import Renderer

        subject = make_subject(0)
        renderer = Renderer(subject, size=(h, w))
        target = subject.target_pose("PLAX")
        poses, frames = [], []
        for i in range(n):
            s = np.sin(2 * np.pi * i / n)
            c = np.cos(2 * np.pi * i / n)
            T = pose_alg.apply_action(target, np.array([10 * s, 5 * c, 3 * s, 8 * c, 6 * s, 10 * c]))
            poses.append(T)
            frames.append(renderer.render(T, i / 30.0))
        return frames, poses, "simulator"
    except ImportError:
        rng = np.random.default_rng(0)
        return ([rng.integers(0, 256, (h, w), dtype=np.uint8) for _ in range(n)],
                [np.eye(4) for _ in range(n)], "noise (simulator not available)")


def _publisher_main(cfg_path: str) -> int:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped, TwistStamped
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from ..nodes import conversions as conv
    from ..nodes.lifecycle import BackgroundSpin

    cfg = json.loads(Path(cfg_path).read_text())
    frames, poses, source = _render_frames(tuple(cfg["size_wh"]))
    print(f"frames: {len(frames)} from {source}", flush=True)
    rclpy.init()
    node = Node("guidance_bench_publisher", namespace=cfg["namespace"])
    pub = node.create_publisher(Image, "image", qos_profile_sensor_data)
    pub_pose = node.create_publisher(PoseStamped, "probe_pose", qos_profile_sensor_data)
    received: list[tuple[int, int]] = []  # (stamp ns, received ns)
    diag: dict[str, str] = {}

    def on_guidance(msg: TwistStamped) -> None:
        received.append((conv.stamp_to_ns(msg.header.stamp), time.time_ns()))

    def on_diag(msg: DiagnosticArray) -> None:
        for st in msg.status:
            if st.name.endswith("guidance_node: guidance"):
                diag.clear()
                diag.update({kv.key: kv.value for kv in st.values})

    node.create_subscription(TwistStamped, "guidance", on_guidance, 100)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = BackgroundSpin(executor, name="bench-guidance-spin")
    msgs = [conv.gray_to_image_msg(f, 0, "us_image") for f in frames]
    period = 1.0 / float(cfg["rate_hz"])

    def send(i: int) -> int:
        stamp = time.time_ns()
        k = i % len(msgs)
        pub_pose.publish(conv.matrix_to_pose_stamped(poses[k], stamp, "panda_link0"))
        msg = msgs[k]
        msg.header.stamp = conv.ns_to_stamp(stamp)
        pub.publish(msg)
        return stamp

    try:
        deadline = time.monotonic() + 180.0
        while pub.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                print("node never subscribed", flush=True)
                return 1
            time.sleep(0.1)
        # warm-up: until guidance flows, then warmup_s more
        i, t0 = 0, time.monotonic()
        warm_end = None
        while warm_end is None or time.monotonic() < warm_end:
            send(i)
            i += 1
            if warm_end is None and received:
                warm_end = time.monotonic() + float(cfg["warmup_s"])
            if time.monotonic() - t0 > 180.0:
                print("no guidance received during warm-up", flush=True)
                return 1
            time.sleep(period)
        print(MEASURE_START, flush=True)
        sent: list[int] = []
        t_start = time.monotonic()
        n = int(round(float(cfg["seconds"]) * float(cfg["rate_hz"])))
        for j in range(n):
            sent.append(send(i + j))
            sleep = t_start + (j + 1) * period - time.monotonic()
            if sleep > 0:
                time.sleep(sleep)
        print(MEASURE_END, flush=True)
        duration = time.monotonic() - t_start
        time.sleep(0.5)  # late answers still count as latency, not as drops
        sent_set = set(sent)
        lat = np.array([(rx - st) / 1e6 for st, rx in received if st in sent_set])
        answered = len({st for st, _ in received if st in sent_set})
        res = {
            "latency_ms": ({k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))}
                           if lat.size else {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}),
            "rate_hz": answered / duration,
            "dropped_ratio": 1.0 - answered / max(1, len(sent)),
            "frames_sent": len(sent), "frames_answered": answered, "achieved_input_rate_hz": len(sent) / duration,
            "frame_source": source,
        }
        if "inference_ms_p50" in diag:
            res["node_inference_ms_p50"] = float(diag["inference_ms_p50"])
        Path(cfg["out"]).write_text(json.dumps(res))
        return 0
    except (KeyboardInterrupt, ExternalShutdownException):
        return 130
    finally:
        spinner.stop()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(_publisher_main(sys.argv[1]))
