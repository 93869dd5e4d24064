"""Training configuration: one dataclass, named presets, CLI overrides.

Presets (``--preset``):

* ``paper``: the paper's setup for GPUs: ResNet-34, 224 px, 300 epochs, AdamW lr 1e-4,
  cosine annealing, batch 64 per process, AMP (bf16 where supported).
* ``cpu``: learns something useful in about an hour on 2 CPU cores: ResNet-18, 64 px,
  batch 32, lr 3e-4, 2000 steps.
* ``approach``: the default model (issue 12; the coarse stage): ResNet-10, 64 px, frames rendered on the
  fly over the closed loop's whole start range on 400 subjects, uncertainty head, 6000 steps (about 40 min
  on 2 idle cores with ``--model baseline``; ``make -j2 models`` trains it beside the fine stage).
* ``fine``: the fine stage of coarse-to-fine: as ``approach`` but only within +-15 mm / +-15 deg of
  the target (``--sim-max-offset-mm/-deg``), for the runtime's final approach (``fine_model_path``).
* ``smoke``: seconds, for tests: ResNet-18, 32 px, batch 8, a few steps, no workers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

MODELS = ("baseline", "dreamer")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json in the run folder)."""

    data: str = ""
    model: str = "dreamer"
    preset: str = "paper"
    # model
    backbone: str = "resnet34"
    weights: str | None = None          # local torchvision ImageNet state dict (never downloaded)
    input_size: int | None = 224        # px; None = the cache's size; else resized on the device
    dreamer_dim: int = 256
    dreamer_depth: int = 2
    dreamer_heads: int = 4
    # optimisation
    epochs: int = 300
    max_steps: int | None = None        # stop after this many optimiser steps (overrides epochs)
    batch_size: int = 64                # per process
    lr: float = 1e-4
    min_lr: float = 1e-6                # cosine annealing floor
    weight_decay: float = 1e-2
    grad_clip: float = 1.0              # max grad norm; 0 = off
    amp: str = "auto"                   # auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16
    channels_last: bool = True          # NHWC weights and activations: faster convolutions (CPU oneDNN, CUDA AMP)
    # losses (SmoothL1 in normalised action units)
    policy_weight: float = 1.0          # L(a_t1, â_t1): the plain policy loss on t1
    dreamer_weight: float = 1.0         # L(a'_t1, â_t1) + L(a'_t2, â_t2) (Eq. 7)
    smooth_l1_beta: float = 1.0
    max_gap: int = 1_000_000            # Dreamer pairs: t2 anywhere in t1's demonstration
    augment: bool = False               # photometric jitter (data.dataset.ImageJitter)
    # uncertainty head (per-axis Laplace scale; Laplace NLL added to the SmoothL1 losses)
    uncertainty: bool = False
    nll_weight: float = 0.1
    # simulator frames rendered on the fly (data.approach; 0 subjects = off, train on --data only)
    sim_subjects: int = 0               # train subject seeds 20000.. (data.approach.SPLIT_SEEDS)
    sim_val_subjects: int = 12          # val subject seeds 8000.. (a fixed approach set)
    sim_val_frames_per_plane: int = 20  # per val subject and plane
    sim_items_per_epoch: int = 50000
    sim_render_sizes: str = "224"       # comma-separated px the simulator renders at (one drawn per item)
    sim_mix: str = "uniform=0.4,near=0.35,expert=0.25,cache=0.25"  # pose sources (cache only with --data)
    sim_max_offset_mm: float = 40.0     # start range: +-mm in x, y (z: a fifth of it); the closed loop's is 40
    sim_max_offset_deg: float = 40.0    # start range: +-deg per angle; the closed loop's is 40
    dagger_states: str = ""             # visited-states .npz files (comma-separated) for the mix's dagger source
    init_from: str = ""                 # checkpoint / run folder whose model weights start this run (fine-tuning)
    # data loading
    workers: int = 4
    threads: int = 0                    # torch CPU threads per process; 0 = auto (cores / processes - workers)
    prefetch: int = 4
    # bookkeeping
    seed: int = 0
    val_every: int = 0                  # steps between validations; 0 = once per epoch
    val_max_frames: int | None = None   # validate on at most this many (evenly spaced) frames
    checkpoint_every: int = 1000        # steps between checkpoints
    keep_checkpoints: int = 3
    log_every: int = 20                 # steps between TensorBoard train scalars
    out_dir: str = "runs"
    run_name: str | None = None         # default <date>_<time>_<model>_<preset>
    progress: bool = True
    device: str = "auto"                # auto, cpu, cuda

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.backbone not in ("resnet10", "resnet18", "resnet34"):
            raise ValueError(f"--backbone must be resnet10, resnet18 or resnet34, got {self.backbone!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"--amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        for name in ("batch_size", "epochs", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.input_size is not None and self.input_size < 32:
            raise ValueError("input_size must be >= 32 px (ResNet downsamples 32x)")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.sim_subjects < 0 or self.nll_weight < 0:
            raise ValueError("sim_subjects and nll_weight must be >= 0")
        if not (0 < self.sim_max_offset_mm <= 100 and 0 < self.sim_max_offset_deg <= 90):
            raise ValueError("sim_max_offset_mm must be in (0, 100] mm and sim_max_offset_deg in (0, 90] deg")
        if self.sim_subjects:
            mix = parse_mix(self.sim_mix)
            parse_sizes(self.sim_render_sizes)
            if mix.get("dagger", 0) > 0 and not self.dagger_states:
                raise ValueError("--sim-mix has a dagger weight but no --dagger-states files are given")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_mix(text: str) -> dict[str, float]:
    """``"uniform=0.4,near=0.35,..."`` -> {source: weight} (data.approach.MIX keys)."""
    from cardiac_copilot_ros.data.approach import MIX

    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, _, val = part.partition("=")
        if key not in MIX:
            raise ValueError(f"--sim-mix: unknown source {key!r}; choose from {', '.join(MIX)}")
        try:
            out[key] = float(val)
        except ValueError:
            raise ValueError(f"--sim-mix: {part!r} is not SOURCE=WEIGHT") from None
        if out[key] < 0:
            raise ValueError(f"--sim-mix: negative weight in {part!r}")
    if not any(v > 0 for k, v in out.items() if k not in ("cache", "dagger")):
        raise ValueError("--sim-mix needs a positive weight for uniform, near or expert")
    return out


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sim-render-sizes must be comma-separated pixel sizes, got {text!r}") from None
    if not sizes or any(not 16 <= v <= 1024 for v in sizes):
        raise ValueError(f"--sim-render-sizes must be in 16..1024 px, got {text!r}")
    return sizes


PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(backbone="resnet34", input_size=224, epochs=300, batch_size=64, lr=1e-4, min_lr=1e-6,
                  workers=8, val_every=0, checkpoint_every=2000, log_every=20),
    "cpu": dict(backbone="resnet18", input_size=64, epochs=1000, max_steps=2000, batch_size=32, lr=3e-4,
                min_lr=1e-5, workers=1, prefetch=4, val_every=200, val_max_frames=600,
                checkpoint_every=200, log_every=10, dreamer_dim=128, dreamer_depth=2, dreamer_heads=4),
    # the default (coarse stage) since issue 12: ResNet-10 at 64 px on frames rendered over the whole start range
    "approach": dict(backbone="resnet10", input_size=64, epochs=1000, max_steps=6000, batch_size=32, lr=5e-4,
                     min_lr=1e-5, workers=1, prefetch=6, val_every=250, checkpoint_every=250, log_every=20,
                     dreamer_dim=128, dreamer_depth=2, dreamer_heads=4, uncertainty=True, sim_subjects=400,
                     augment=True, sim_render_sizes="128"),
    # the fine stage of coarse-to-fine (issue 12 item 3): the same network trained only on a narrow
    # range around the target (+-15 mm x, y, +-3 mm z, +-15 deg), where the coarse model's errors end
    "fine": dict(backbone="resnet10", input_size=64, epochs=1000, max_steps=6000, batch_size=32, lr=5e-4,
                 min_lr=1e-5, workers=1, prefetch=6, val_every=250, checkpoint_every=250, log_every=20,
                 dreamer_dim=128, dreamer_depth=2, dreamer_heads=4, uncertainty=True, sim_subjects=400,
                 augment=True, sim_render_sizes="128", sim_mix="uniform=0.6,near=0.4",
                 sim_max_offset_mm=15.0, sim_max_offset_deg=15.0),
    "smoke": dict(backbone="resnet18", input_size=32, epochs=1, max_steps=4, batch_size=8, lr=1e-3,
                  min_lr=1e-4, workers=0, val_every=2, val_max_frames=64, checkpoint_every=2, log_every=1,
                  dreamer_dim=32, dreamer_depth=1, dreamer_heads=2, progress=False),
}


def make_config(preset: str = "paper", **overrides: Any) -> TrainConfig:
    """The preset's config with ``overrides`` (None values are ignored) applied, validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = TrainConfig(preset=preset, **PRESETS[preset])
    known = {f.name for f in fields(TrainConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown config key {key!r}")
        if value is not None:
            cfg = dataclasses.replace(cfg, **{key: value})
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a run folder's config.json."""
    return TrainConfig.from_dict(json.loads(Path(path).read_text()))
