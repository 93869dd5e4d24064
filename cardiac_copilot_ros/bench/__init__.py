"""``cardiac-copilot bench NAME``: benchmarks that print tables (and optionally JSON).

The benchmarks live together in this package, apart from the product code they measure: one
module per benchmark, each exposing ``add_arguments(parser)`` and ``run(args) -> int``, imported
only when it runs; this module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib

#: benchmark -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "sim": ("cardiac_copilot_ros.bench.sim", "simulator rendering speed (frames/s, ms/frame)"),
    "guidance": ("cardiac_copilot_ros.bench.guidance", "guidance node latency over DDS"),
    "recorder": ("cardiac_copilot_ros.bench.recorder", "recorder throughput, drops, CPU"),
    "train": ("cardiac_copilot_ros.bench.train", "data loader vs training step throughput"),
    "paper": ("cardiac_copilot_ros.bench.paper", "the paper's experiment on the simulator"),
    "closed-loop": ("cardiac_copilot_ros.bench.closed_loop", "closed-loop success on the simulator"),
    "servo": ("cardiac_copilot_ros.bench.servo", "the servo's own time to 'plane reached' (true guidance, no ROS)"),
    "rollout": ("cardiac_copilot_ros.bench.rollout", "a quick closed-loop estimate without ROS (ranks models)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(BENCHES), metavar="NAME",
                        help="; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="the benchmark's own options (see cardiac-copilot bench NAME --help)")


def run(args: argparse.Namespace) -> int:
    module_name, help_text = BENCHES[args.name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"bench {args.name}: not available yet in this version.")
            return 3
        raise
    parser = argparse.ArgumentParser(prog=f"cardiac-copilot bench {args.name}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
