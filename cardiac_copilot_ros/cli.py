"""The ``cardiac-copilot`` command: one entry point, a subcommand per job.

Each subcommand lives in the module named after its concern and exposes
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their
subcommand runs, so ``cardiac-copilot --help`` stays fast and needs neither torch nor rclpy.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("cardiac_copilot_ros.sim.cli", "write simulated expert-demonstration bags"),
    "dataset": ("cardiac_copilot_ros.data.cli", "build a training cache from bags"),
    "import": ("cardiac_copilot_ros.data.importer", "turn folders of frames + poses into bags"),
    "train": ("cardiac_copilot_ros.training.cli", "train the baseline policy or Cardiac Dreamer"),
    "dagger": ("cardiac_copilot_ros.training.dagger", "DAgger: roll out, label visited states, retrain, validate"),
    "evaluate": ("cardiac_copilot_ros.evaluation", "evaluate runs or bundles (paper Table 1, Fig. 3)"),
    "export": ("cardiac_copilot_ros.model.export", "export a run as a TorchScript / torch.export bundle"),
    "demo": ("cardiac_copilot_ros.demo", "run the bedside pipeline on the built-in simulator"),
    "bench": ("cardiac_copilot_ros.bench", "benchmarks: sim, guidance, recorder, train, paper, closed-loop, rollout"),
}


def key_value_arg(text: str) -> tuple[str, int | float | bool | str]:
    """argparse type of ``KEY=VALUE`` overrides: the value as int, float, bool (true/false) or string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="cardiac-copilot",
        description="Cardiac Copilot: probe guidance for echocardiography (simulator, data, "
                    "training, evaluation, export, demo, benchmarks).")
    top.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                     help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    ns = top.parse_args(argv[:1])
    module_name, help_text = COMMANDS[ns.command]
    module = _load(module_name)
    if module is None:
        print(f"cardiac-copilot {ns.command}: not available yet in this version "
              f"({module_name} is not implemented).", file=sys.stderr)
        return 3
    parser = argparse.ArgumentParser(prog=f"cardiac-copilot {ns.command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
