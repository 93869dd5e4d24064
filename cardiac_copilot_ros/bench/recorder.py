"""``cardiac-copilot bench recorder``: recorder_node throughput over real DDS.

Starts ``recorder_node`` in a child process, publishes ``image`` (mono8, default 800 x 600 at
60 Hz) and ``probe_pose`` (1 kHz) from this process for ``--seconds`` inside one episode, stops
the episode and prints published vs written per topic, drops (writer queue + QoS message-lost),
the recorder process's CPU use and the bag write rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..processes import stop_process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=30.0, help="publishing time [s] (default 30)")
    parser.add_argument("--image-hz", type=float, default=60.0, help="image rate [Hz] (default 60)")
    parser.add_argument("--width", type=int, default=800, help="image width [px] (default 800)")
    parser.add_argument("--height", type=int, default=600, help="image height [px] (default 600)")
    parser.add_argument("--pose-hz", type=float, default=1000.0, help="pose rate [Hz] (default 1000)")
    parser.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    parser.add_argument("--no-fsync", action="store_true", help="recorder parameter fsync:=false")
    parser.add_argument("--output", default=None, help="bag directory (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    if args.seconds <= 0 or args.image_hz <= 0 or args.pose_hz <= 0 or args.width <= 0 or args.height <= 0:
        print("bench recorder: --seconds, rates and sizes must be positive", file=sys.stderr)
        return 2
    # DDS stays on this machine with a domain of its own unless the caller chose (the nodes never do)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
    import psutil
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger

    from .. import recording as rec

    tmp = None
    out = Path(args.output) if args.output else Path(tmp := tempfile.mkdtemp(prefix="recorder_bench_"))
    cmd = [sys.executable, "-m", "cardiac_copilot_ros.nodes.recorder_node", "--ros-args",
           "-p", f"output_dir:={out}", "-p", f"storage:={args.storage}", "-p", "min_free_disk_mb:=100.0",
           "-p", f"fsync:={'false' if args.no_fsync else 'true'}", "-p", "session_label:=bench"]
    log_path = out / "recorder_bench_node.log"
    out.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(child.pid)
    rclpy.init()
    node = rclpy.create_node("recorder_bench")
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    try:
        qos = QoSProfile(depth=60, reliability=ReliabilityPolicy.RELIABLE)  # 1 s of images
        img_pub = node.create_publisher(Image, "image", qos)
        pose_pub = node.create_publisher(PoseStamped, "probe_pose", QoSProfile(
            depth=1000, reliability=ReliabilityPolicy.RELIABLE))  # 1 s of poses, like the recorder
        start_cli = node.create_client(Trigger, "/recorder_node/start_episode")
        stop_cli = node.create_client(Trigger, "/recorder_node/stop_episode")

        def call(cli, timeout_s: float = 30.0):
            if not cli.wait_for_service(timeout_sec=timeout_s):
                raise RuntimeError("recorder_node did not come up (see " + str(log_path) + ")")
            fut = cli.call_async(Trigger.Request())
            ex.spin_until_future_complete(fut, timeout_sec=timeout_s)
            if not fut.done():
                raise RuntimeError("service call timed out")
            return fut.result()

        deadline = time.monotonic() + 30
        while (img_pub.get_subscription_count() == 0 or pose_pub.get_subscription_count() == 0) \
                and time.monotonic() < deadline:
            ex.spin_once(timeout_sec=0.1)
        res = call(start_cli)
        if not res.success:
            print(f"bench recorder: episode did not start: {res.message}", file=sys.stderr)
            return 1
        img = Image(height=args.height, width=args.width, encoding="mono8", step=args.width)
        img.header.frame_id = "us_image"
        img.data = bytes(random.Random(0).randbytes(args.width * args.height))
        img_bytes = bytearray(serialize_message(img))
        counts = {"/image": 0, "/probe_pose": 0}
        stop = threading.Event()

        def publish() -> None:
            t0 = time.monotonic()
            n_img = n_pose = 0
            while not stop.is_set():
                now = time.monotonic() - t0
                if now >= args.seconds:
                    break
                if n_pose <= now * args.pose_hz:
                    t = time.time_ns()
                    pose_pub.publish(rec.serialize_pose_stamped_cdr(t, "panda_link0", (0.4, 0.0, 0.3),
                                                                    (0.0, 0.0, 0.0, 1.0)))
                    n_pose += 1
                    counts["/probe_pose"] += 1
                if n_img <= now * args.image_hz:
                    rec.set_cdr_header_stamp(img_bytes, time.time_ns())
                    img_pub.publish(bytes(img_bytes))
                    n_img += 1
                    counts["/image"] += 1
                nxt = min(n_pose / args.pose_hz, n_img / args.image_hz)
                time.sleep(max(0.0, nxt - (time.monotonic() - t0)))

        cpu0 = proc.cpu_times()
        wall0 = time.monotonic()
        th = threading.Thread(target=publish, daemon=True)
        th.start()
        try:
            from tqdm import tqdm

            with tqdm(total=int(args.seconds), desc="publishing", unit="s", leave=False) as bar:
                while th.is_alive():
                    th.join(1.0)
                    bar.n = min(int(time.monotonic() - wall0), int(args.seconds))
                    bar.refresh()
        except KeyboardInterrupt:
            stop.set()
            th.join()
        wall = time.monotonic() - wall0
        res = call(stop_cli, 120.0)
        cpu1 = proc.cpu_times()
        stop_wall = time.monotonic() - wall0
        bag = Path(res.message)
        if not res.success or not bag.is_dir():
            print(f"bench recorder: stop failed: {res.message}", file=sys.stderr)
            return 1
        cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        import yaml

        info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
        written = {t["topic_metadata"]["name"]: t["message_count"] for t in info["topics_with_message_count"]}
        custom = info.get("custom_data") or {}
        stats = json.loads(custom.get("cardiac_copilot.recorder.stats", "{}"))
        lost = json.loads(custom.get("cardiac_copilot.recorder.lost_qos", "{}"))
        sync = json.loads(custom.get("cardiac_copilot.recorder.sync", "{}"))
        size_mb = sum(p.stat().st_size for p in bag.iterdir() if p.is_file()) / 2**20
        results = {
            "seconds": round(wall, 2), "image": f"{args.width}x{args.height} mono8 @ {args.image_hz:g} Hz",
            "pose_hz": args.pose_hz, "storage": args.storage, "fsync": not args.no_fsync,
            "topics": {t: {"published": counts[t], "written": written.get(t, 0),
                           "dropped_queue": stats.get("dropped", {}).get(t, 0), "lost_qos": lost.get(t, 0)}
                       for t in counts},
            "probe_pose_sync": {"written": written.get("/probe_pose_sync", 0), **sync},
            "recorder_cpu_percent": round(100.0 * cpu_s / stop_wall, 1),
            "cpu_count": psutil.cpu_count(), "bag_mb": round(size_mb, 1),
            "bag_mb_per_s": round(size_mb / wall, 1),
        }
        print(f"recorder bench: {results['image']}, poses @ {args.pose_hz:g} Hz, {wall:.1f} s, "
              f"{args.storage}, fsync {'off' if args.no_fsync else 'on'}")
        print(f"{'topic':<18}{'published':>10}{'written':>10}{'queue drop':>12}{'QoS lost':>10}")
        for t, r in results["topics"].items():
            print(f"{t:<18}{r['published']:>10}{r['written']:>10}{r['dropped_queue']:>12}{r['lost_qos']:>10}")
        s = results["probe_pose_sync"]
        print(f"{'/probe_pose_sync':<18}{'':>10}{s['written']:>10}   sync: {sync}")
        print(f"recorder CPU: {results['recorder_cpu_percent']:.0f} % of one core "
              f"({results['cpu_count']} cores); bag {size_mb:.0f} MiB, {results['bag_mb_per_s']:.1f} MiB/s")
        lost_any = any(r["published"] != r["written"] for r in results["topics"].values())
        print("nothing dropped" if not lost_any else "DROPPED MESSAGES (see counts above)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop_process(child, 30.0)
        log.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
