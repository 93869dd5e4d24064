"""``cardiac-copilot train``: train the baseline policy or Cardiac Dreamer on a training cache.

Single process: ``cardiac-copilot train --data CACHE --model dreamer --preset cpu``.
Several GPUs (or CPU processes): ``torchrun --nproc_per_node N -m cardiac_copilot_ros.training.cli
--data CACHE --model dreamer --preset paper``.
"""

from __future__ import annotations

import argparse
import sys

from cardiac_copilot_ros.training.config import MODELS, PRESETS, make_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="", metavar="DIR",
                        help="training cache (cardiac-copilot dataset build); optional with --sim-subjects")
    parser.add_argument("--model", required=True, choices=MODELS, help="baseline policy or Cardiac Dreamer")
    parser.add_argument("--preset", default="paper", choices=list(PRESETS),
                        help="paper: ResNet-34, 224 px, 300 epochs, lr 1e-4 (GPUs); cpu: ResNet-18, 64 px, "
                             "about an hour on 2 cores; approach: ResNet-10, 80 px, frames rendered on the fly "
                             "over the closed loop's start range, uncertainty head; smoke: seconds (tests). "
                             "Default paper")
    g = parser.add_argument_group("overrides (default: the preset's value)")
    g.add_argument("--backbone", choices=("resnet10", "resnet18", "resnet34"))
    g.add_argument("--weights", metavar="FILE", help="local torchvision ImageNet state dict for the trunk")
    g.add_argument("--input-size", type=int, metavar="PX",
                   help="model input size; images are resized on the device when the cache differs")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimiser steps (0: epochs only)")
    g.add_argument("--batch-size", type=int, metavar="B", help="per process")
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float, help="cosine annealing floor")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16); off on CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="train in the channels-last (NHWC) memory format (default on: 1.11x faster on a 2-core "
                        "CPU with one render worker, no gain for two trainings side by side, docs/TRAINING.md; "
                        "checkpoints and bundles in the same format)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per training process")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads per process (0: cores per process minus workers)")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-gap", type=int, metavar="FRAMES", help="Dreamer pairs: max frames between t1 and t2")
    g.add_argument("--policy-weight", type=float, help="weight of the plain policy loss on t1 (Dreamer)")
    g.add_argument("--dreamer-weight", type=float, help="weight of the Eq. 7 Dreamer losses")
    g.add_argument("--augment", action="store_true", default=None, help="photometric jitter on train images")
    g.add_argument("--uncertainty", action=argparse.BooleanOptionalAction, default=None,
                   help="predict a per-axis Laplace scale (Laplace NLL loss; bundle forward_with_scale)")
    g.add_argument("--nll-weight", type=float, help="weight of the Laplace NLL (trains the scale only)")
    g.add_argument("--sim-subjects", type=int, metavar="N",
                   help="render training frames on the fly on N simulator subjects (seeds 20000..; 0: off)")
    g.add_argument("--sim-val-subjects", type=int, metavar="N", help="validation subjects (seeds 8000..)")
    g.add_argument("--sim-val-frames-per-plane", type=int, metavar="N")
    g.add_argument("--sim-items-per-epoch", type=int, metavar="N")
    g.add_argument("--sim-render-sizes", metavar="PX,PX", help="sizes the simulator renders at (e.g. 224)")
    g.add_argument("--sim-mix", metavar="SRC=W,...",
                   help="pose sources: uniform (start range), near (near the target), expert (demonstrations), "
                        "cache (frames of --data), dagger (visited states of --dagger-states)")
    g.add_argument("--sim-max-offset-mm", type=float, metavar="MM",
                   help="start range of the rendered poses: +-MM in x, y (z: a fifth); the closed loop's is 40")
    g.add_argument("--sim-max-offset-deg", type=float, metavar="DEG",
                   help="start range of the rendered poses: +-DEG per angle; the closed loop's is 40")
    g.add_argument("--dagger-states", metavar="NPZ,NPZ",
                   help="visited-states files (cardiac-copilot dagger) for the mix's dagger source")
    g.add_argument("--init-from", metavar="PATH",
                   help="checkpoint, run folder or TorchScript model bundle (e.g. models/default.pt) whose model "
                        "weights start this run (fine-tuning, e.g. on recorded data; the optimiser, schedule and step "
                        "start afresh, unlike --resume)")
    g.add_argument("--val-every", type=int, metavar="STEPS", help="0: once per epoch")
    g.add_argument("--val-max-frames", type=int, metavar="N")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    g.add_argument("--log-every", type=int, metavar="STEPS")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out-dir", default=None, metavar="DIR", help="parent of run folders (default runs/)")
    parser.add_argument("--run-name", default=None, help="run folder name (default <date>_<time>_<model>_<preset>)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="checkpoint or run folder: restore model, optimizer, scheduler, scaler, step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    over = {k: getattr(args, k, None) for k in (
        "backbone", "weights", "input_size", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "amp",
        "channels_last", "workers", "threads", "seed", "max_gap", "policy_weight", "dreamer_weight", "augment",
        "val_every", "val_max_frames", "checkpoint_every", "log_every", "device", "out_dir", "run_name", "uncertainty",
        "nll_weight", "sim_subjects", "sim_val_subjects", "sim_val_frames_per_plane", "sim_items_per_epoch",
        "sim_render_sizes", "sim_mix", "sim_max_offset_mm", "sim_max_offset_deg", "dagger_states", "init_from")}
    cfg = make_config(args.preset, data=str(args.data), model=args.model, **over)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps or None
    if args.no_progress:
        cfg.progress = False
    cfg.validate()
    if not cfg.data and not cfg.sim_subjects:
        raise ValueError("give --data (a training cache) and/or --sim-subjects N (frames rendered on the fly)")
    return cfg


def run(args: argparse.Namespace) -> int:
    from cardiac_copilot_ros.data.dataset import CacheError

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    from cardiac_copilot_ros.training.loop import train

    try:
        train(cfg, resume=args.resume)
    except (CacheError, FileNotFoundError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cardiac_copilot_ros.training.cli`` (the torchrun entry)."""
    parser = argparse.ArgumentParser(prog="cardiac-copilot train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
