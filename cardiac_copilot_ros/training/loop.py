"""The training loop: baseline policy or Cardiac Dreamer, AMP, DDP, checkpoints, validation.

Losses (SmoothL1 in normalised action units ``(a - mean) / std``, train-split statistics):

* baseline: ``L(G(E(S_t1), q), â_t1)``.
* dreamer (Eq. 4-7) on pairs (t1, t2) of one demonstration:
  ``a'_t2 = G(I(E(S_t1), â_t1->t2), q)``, ``a'_t1 = U^-1(U(â_t1->t2) U(a'_t2))`` and
  ``policy_weight * L(a_t1, â_t1) + dreamer_weight * (L(a'_t1, â_t1) + L(a'_t2, â_t2))``.
  The pose algebra runs in float32 outside autocast (:mod:`..model.torch_pose`).

DDP: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), NCCL on GPUs and gloo
on CPU; a DistributedSampler shards the data; only rank 0 writes files. Validation is sharded
and all-reduced.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from cardiac_copilot_ros import code_version, pose
from cardiac_copilot_ros.model import torch_pose
from cardiac_copilot_ros.model.checkpoint import (  # noqa: F401  (re-exported for compatibility)
    find_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from cardiac_copilot_ros.model.policy import GuidanceModel
from cardiac_copilot_ros.planes import PLANE_NAMES
from cardiac_copilot_ros.training.config import TrainConfig

AXES = pose.ACTION_AXES


# ---------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (0, 0, 1 without it)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched with WORLD_SIZE > 1; returns (rank, world_size)."""
    rank, _, world = dist_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return rank, world


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the replicas.

    DDP keeps parameters identical but each replica's last forward updates its own BN
    statistics; averaging them before validation and checkpoints keeps replicas identical.
    """
    if world <= 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)


def pick_device(name: str) -> torch.device:
    _, local_rank, _ = dist_env()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (to resume mid-epoch exactly)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        it = super().__iter__()
        start, self.start = self.start, 0
        return islice(it, start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def _evenly(ds: Dataset, max_n: int | None) -> Dataset:
    n = len(ds)
    if max_n is None or n <= max_n:
        return ds
    return Subset(ds, np.linspace(0, n - 1, max_n).round().astype(np.int64).tolist())


def make_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """(train dataset, val dataset, manifest) from ``cfg.data`` and/or frames rendered on the fly.

    With ``cfg.sim_subjects`` the train set is :class:`~..data.approach.SimFrameDataset` (or its
    pair variant for the Dreamer) on train seeds, mixed with ``cfg.data``'s train split when given,
    and the val set is a fixed approach set on the val seeds; the returned manifest then carries
    ``input_size``, ``manifest_sha256`` (the cache's, or None) and ``sim`` (the seeds used).
    """
    from cardiac_copilot_ros.data.dataset import FrameDataset, ImageJitter, PairDataset, load_manifest

    transform = ImageJitter() if cfg.augment else None
    if cfg.sim_subjects:
        return _sim_datasets(cfg, transform)
    manifest = load_manifest(cfg.data)
    if cfg.model == "dreamer":
        train = PairDataset(cfg.data, "train", max_gap=cfg.max_gap, seed=cfg.seed, transform=transform)
    else:
        train = FrameDataset(cfg.data, "train", transform=transform)
    val = FrameDataset(cfg.data, "val")
    if len(train) == 0:
        raise ValueError(f"{cfg.data}: the train split is empty")
    if len(val) == 0:
        print(f"note: {cfg.data} has no val frames; validating on the train split")
        val = FrameDataset(cfg.data, "train")
    return train, _evenly(val, cfg.val_max_frames), manifest


class ArrayFrames(Dataset):
    """A fixed frame set in memory (e.g. :class:`~..data.approach.ApproachSet`) as FrameDataset items."""

    def __init__(self, images: np.ndarray, actions: np.ndarray, plane: np.ndarray, subject: np.ndarray) -> None:
        self.images, self.actions, self.plane, self.subject = images, actions, plane, subject

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(np.array(self.images[k], np.uint8)).unsqueeze(0),
                "action": torch.from_numpy(np.asarray(self.actions[k], np.float32)),
                "plane": torch.tensor(int(self.plane[k]), dtype=torch.int64),
                "subject": torch.tensor(int(self.subject[k]), dtype=torch.int64)}


def sim_subjects(cfg: TrainConfig) -> dict[str, list[str]]:
    """Subject ids the on-the-fly data of ``cfg`` trains (``train``) and validates (``val``) on."""
    from cardiac_copilot_ros.data.approach import split_seeds, subject_ids

    if not cfg.sim_subjects:
        return {}
    return {"train": subject_ids(split_seeds("train", cfg.sim_subjects)),
            "val": subject_ids(split_seeds("val", cfg.sim_val_subjects))}


def _sim_datasets(cfg: TrainConfig, transform: Any) -> tuple[Dataset, Dataset, dict[str, Any]]:
    from cardiac_copilot_ros.data.approach import (
        SimFrameDataset,
        SimPairDataset,
        SubjectOverlapError,
        VisitedStates,
        make_approach_set,
        split_seeds,
    )
    from cardiac_copilot_ros.data.dataset import FrameDataset, load_manifest
    from cardiac_copilot_ros.training.config import parse_mix, parse_sizes

    size = int(cfg.input_size or 64)
    train_seeds = split_seeds("train", cfg.sim_subjects)
    val_seeds = split_seeds("val", cfg.sim_val_subjects)
    held = {"val": val_seeds, "test": split_seeds("test", 1000)}
    cache, manifest = None, {"manifest_sha256": None}
    if cfg.data:
        manifest = dict(load_manifest(cfg.data))
        cache = FrameDataset(cfg.data, "train")
        cache_seeds = {int(n[3:]) for n in manifest["splits"]["train"] if n.startswith("sim") and n[3:].isdigit()}
        for name, seeds in held.items():
            both = sorted(cache_seeds & set(seeds))
            if both:
                raise SubjectOverlapError(f"{cfg.data}: train subjects overlap the {name} subjects (seeds "
                                          f"{both[:5]})")
    states = VisitedStates.load(cfg.dagger_states) if cfg.dagger_states else None
    cls = SimPairDataset if cfg.model == "dreamer" else SimFrameDataset
    train = cls(train_seeds, length=cfg.sim_items_per_epoch, image_size=size,
                render_sizes=parse_sizes(cfg.sim_render_sizes), mix=parse_mix(cfg.sim_mix), seed=cfg.seed,
                held_out=held, cache=cache, jitter=transform is not None, max_offset_mm=cfg.sim_max_offset_mm,
                max_offset_deg=cfg.sim_max_offset_deg, states=states)
    vs = make_approach_set(val_seeds, cfg.sim_val_frames_per_plane, image_size=size, seed=cfg.seed + 1,
                           max_offset_mm=cfg.sim_max_offset_mm, max_offset_deg=cfg.sim_max_offset_deg)
    val = ArrayFrames(vs.images, vs.actions, vs.plane, vs.subject)
    mean, std = train.label_stats()
    manifest.update(input_size=[size, size], sim={"train_seeds": [train_seeds[0], train_seeds[-1]],
                                                   "val_seeds": [val_seeds[0], val_seeds[-1]],
                                                   "max_offset_mm": cfg.sim_max_offset_mm,
                                                   "max_offset_deg": cfg.sim_max_offset_deg,
                                                   "dagger_states": 0 if states is None else len(states),
                                                   "action_mean": mean.tolist(), "action_std": std.tolist()})
    return train, val, manifest


def make_loader(ds: Dataset, cfg: TrainConfig, sampler: DistributedSampler, device: torch.device,
                drop_last: bool) -> DataLoader:
    workers = max(0, int(cfg.workers))
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=cfg.prefetch if workers > 0 else None)


def to_input(images_u8: torch.Tensor, device: torch.device, size: int | None) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> float32 [0, 1] on the device, resized to ``size`` if needed."""
    x = images_u8.to(device, non_blocking=True).float().div_(255.0)
    if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear",
                          align_corners=None if x.shape[-1] > size else False)
    return x


# ---------------------------------------------------------------------------------------
# Model, losses
# ---------------------------------------------------------------------------------------


def model_args(cfg: TrainConfig) -> dict[str, Any]:
    """Constructor arguments of :class:`GuidanceModel` (saved in checkpoints)."""
    args = {"backbone": cfg.backbone, "dreamer": cfg.model == "dreamer", "dreamer_dim": cfg.dreamer_dim,
            "dreamer_depth": cfg.dreamer_depth, "dreamer_heads": cfg.dreamer_heads}
    if cfg.uncertainty:
        args["uncertainty"] = True
    return args


def _init_from(model: GuidanceModel, cfg: TrainConfig) -> None:
    """Load ``cfg.init_from``'s weights and action statistics into ``model``: a checkpoint or run folder of the
    same architecture, or a TorchScript model bundle (e.g. ``models/default.pt``: its plane query unfolded to the
    trainable form, fp16 weights as stored). ValueError naming both when they do not fit."""
    from pathlib import Path

    from cardiac_copilot_ros.model.onnx_bundle import is_bundle_file

    source = Path(cfg.init_from)
    if is_bundle_file(source):
        from cardiac_copilot_ros.model.bundle import load_bundle
        from cardiac_copilot_ros.model.onnx_bundle import eager_from_torchscript

        bundle = load_bundle(source)
        meta = bundle.meta
        if meta.get("ensemble"):
            raise ValueError(f"--init-from {source}: an ensemble bundle; start from one of its members")
        theirs = {"backbone": meta["backbone"], "dreamer": bool(meta["has_dreamer"]),
                  "uncertainty": bool(meta.get("has_uncertainty"))}
        ours = {"backbone": cfg.backbone, "dreamer": cfg.model == "dreamer", "uncertainty": bool(cfg.uncertainty)}
        if theirs != ours or list(bundle.planes) != model.plane_names:
            raise ValueError(f"--init-from {source}: a different model ({theirs}, views {list(bundle.planes)}) than "
                             f"this run's ({ours}, {model.plane_names})")
        eager = eager_from_torchscript(bundle.module, dict(meta))
        eager.head.unfold_plane_query()
        try:
            model.load_state_dict(eager.state_dict())
        except RuntimeError as exc:   # e.g. another Dreamer size
            raise ValueError(f"--init-from {source}: its weights do not fit this run's model: "
                             f"{str(exc).splitlines()[0]}") from None
        return
    init = load_checkpoint(cfg.init_from, prefer="best")
    same_args = init.get("model_args") == {**model_args(cfg), "n_planes": int(model.n_planes)}
    if not same_args or list(init.get("planes") or PLANE_NAMES) != model.plane_names:
        raise ValueError(f"--init-from {init['path']}: a different model ({init.get('model_args')}, views "
                         f"{init.get('planes')}) than this run's ({model_args(cfg)}, {model.plane_names})")
    model.load_state_dict(init["model"])


def build_model(cfg: TrainConfig, mean: np.ndarray, std: np.ndarray,
                planes: list[str] | None = None) -> GuidanceModel:
    """The model for ``cfg``; its plane query has one entry per view of ``planes`` (the
    dataset's views, default the paper's three), whose names it keeps in ``plane_names``."""
    planes = list(planes) if planes else list(PLANE_NAMES)
    model = GuidanceModel(weights_path=cfg.weights, **{**model_args(cfg), "n_planes": len(planes)})
    model.plane_names = planes
    model.set_action_stats(mean, std)
    return model


class TrainStep(torch.nn.Module):
    """What DDP wraps: one forward pass producing every prediction the loss needs.

    ``(image, plane, rel_norm)`` -> ``(G(E(S_t1), q), G(I(E(S_t1), rel), q) or None, log b or None)``,
    all in normalised action units (log b: the policy's log Laplace scale, with an uncertainty head).
    """

    def __init__(self, model: GuidanceModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, plane: torch.Tensor, rel_norm: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        fmap, feat = self.model.encode(x)
        log_b = None
        if self.model.has_uncertainty:
            pred_t1, log_b = self.model.head.forward_scale(feat, plane)
        else:
            pred_t1 = self.model.head(feat, plane)
        if rel_norm is None or self.model.dreamer is None:
            return pred_t1, None, log_b
        imagined = self.model.dreamer(fmap, rel_norm, plane)
        return pred_t1, self.model.head(imagined, plane), log_b


def laplace_nll(pred_n: torch.Tensor, log_b: torch.Tensor, target_n: torch.Tensor) -> torch.Tensor:
    """Mean Laplace negative log-likelihood ``log(2 b) + |target - pred| / b`` (normalised units).

    ``pred_n`` is detached: the NLL trains the scale only; SmoothL1 keeps training the action.
    """
    return (log_b + (target_n - pred_n.detach()).abs() * torch.exp(-log_b)).mean() + math.log(2.0)


def compute_loss(model: GuidanceModel, step_module: torch.nn.Module, batch: dict[str, torch.Tensor],
                 cfg: TrainConfig, device: torch.device, size: int | None, autocast: Any
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss for one batch and its parts (floats, for logging).

    ``step_module`` is :class:`TrainStep` (or its DDP wrapper) around ``model``.
    """
    beta = cfg.smooth_l1_beta
    dreamer = cfg.model == "dreamer"
    x = to_input(batch["image1" if dreamer else "image"], device, size)
    plane = batch["plane"].to(device, non_blocking=True)
    a1 = batch["action1" if dreamer else "action"].to(device, non_blocking=True).float()
    rel = batch["rel_action"].to(device, non_blocking=True).float() if dreamer else None
    with autocast:
        pred_t1_n, pred_t2_n, log_b = step_module(x, plane, model.normalize_action(rel) if rel is not None else None)
    l_policy = F.smooth_l1_loss(pred_t1_n.float(), model.normalize_action(a1), beta=beta)
    parts = {"loss_policy": float(l_policy.detach())}
    if log_b is not None:
        l_nll = laplace_nll(pred_t1_n.float(), log_b.float(), model.normalize_action(a1))
        parts["loss_nll"] = float(l_nll.detach())
        l_policy = l_policy + cfg.nll_weight * l_nll
    if pred_t2_n is None or rel is None:
        return l_policy, parts
    a2 = batch["action2"].to(device, non_blocking=True).float()
    pred_t2_n = pred_t2_n.float()
    pred_t1_dream = torch_pose.compose_actions(rel, model.denormalize_action(pred_t2_n))  # Eq. 6, float32
    l_t2 = F.smooth_l1_loss(pred_t2_n, model.normalize_action(a2), beta=beta)
    l_t1 = F.smooth_l1_loss(model.normalize_action(pred_t1_dream), model.normalize_action(a1), beta=beta)
    parts.update(loss_dream_t1=float(l_t1.detach()), loss_dream_t2=float(l_t2.detach()))
    return cfg.policy_weight * l_policy + cfg.dreamer_weight * (l_t1 + l_t2), parts


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model: GuidanceModel, loader: DataLoader, device: torch.device, size: int | None,
             train_mean: np.ndarray, world: int) -> dict[str, Any]:
    """MAE per axis (mm, deg) of the policy, the refined output (Dreamer) and the mean baseline."""
    model.eval()
    modes = ["policy"] + (["refined"] if model.has_dreamer else [])
    sums = torch.zeros(len(modes) + 1, 6, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    mean_t = torch.as_tensor(train_mean, dtype=torch.float32, device=device)
    for batch in loader:
        x = to_input(batch["image"], device, size)
        plane = batch["plane"].to(device)
        gt = batch["action"].to(device).float()
        for i, mode in enumerate(modes):
            pred = model(x, plane, mode == "refined").float()
            err = (pred - gt).abs()
            err[:, 3:] = torch.remainder(err[:, 3:] + 180.0, 360.0).sub_(180.0).abs_()  # angle wrap
            sums[i] += err.sum(0).double()
        sums[-1] += (mean_t - gt).abs().sum(0).double()
        count += gt.shape[0]
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(count)
    maes = (sums / count.clamp(min=1)).cpu().numpy()
    out: dict[str, Any] = {"frames": int(count.item())}
    for i, mode in enumerate(modes + ["mean_baseline"]):
        out[mode] = {ax: round(float(v), 4) for ax, v in zip(AXES, maes[i], strict=True)}
        out[mode]["mean"] = round(float(maes[i].mean()), 4)
    out["primary"] = "refined" if model.has_dreamer else "policy"
    model.train()
    return out


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def save_checkpoint(path: Path, *, model: GuidanceModel, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler | None, step: int, epoch: int,
                    epoch_step: int, cfg: TrainConfig, manifest: dict[str, Any], input_size: int,
                    best: dict[str, Any] | None, run_dir: Path) -> None:
    state = {
        "format": "cardiac_copilot_checkpoint", "format_version": 1,
        "model": model.state_dict(), "model_args": {**model_args(cfg), "n_planes": int(model.n_planes)},
        "planes": list(getattr(model, "plane_names", PLANE_NAMES[: model.n_planes])),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step, "epoch": epoch, "epoch_step": epoch_step,
        "config": asdict(cfg), "input_size": [input_size, input_size],
        "data_manifest_sha256": manifest.get("manifest_sha256"),
        "action_mean": model.action_mean.tolist(), "action_std": model.action_std.tolist(),
        "best": best, "run_dir": str(run_dir), "code_version": code_version(),
        "sim_subjects": sim_subjects(cfg),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def _amp(cfg: TrainConfig, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None, str]:
    if device.type != "cuda" or cfg.amp == "off":
        return torch.autocast("cpu", enabled=False), None, "off"
    dtype = cfg.amp
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16), None, "bf16"
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda"), "fp16"


def run_dir_for(cfg: TrainConfig) -> Path:
    name = cfg.run_name or f"{_dt.datetime.now():%Y%m%d_%H%M%S}_{cfg.model}_{cfg.preset}"
    return Path(cfg.out_dir) / name


def _fmt_mae(m: dict[str, float]) -> str:
    return " ".join(f"{ax}={m[ax]:.2f}" for ax in AXES) + f" (mean {m['mean']:.2f})"


def cpu_threads(requested: int, workers: int, world: int = 1) -> int:
    """torch intra-op threads for CPU training: ``requested`` if > 0, else the cores left per process
    after the DataLoader workers. Oversubscribing (torch's default of all cores plus workers, or several
    processes each taking all cores) was measured 2-20x slower on the 2-core machine."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, world) - workers)


def train(cfg: TrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Run training; returns {run_dir, step, best, last, samples_per_s, model (the trained module)}.

    Rank 0 also writes the run folder (config.json, checkpoints, best.pt, metrics.json, TensorBoard).
    """
    cfg.validate()
    device = pick_device(cfg.device)
    rank, world = setup_distributed(device)
    is_main = rank == 0
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, cfg.workers, world))
    torch.manual_seed(cfg.seed)
    state = load_checkpoint(resume, prefer="latest") if resume else None

    train_ds, val_ds, manifest = make_datasets(cfg)
    cache_size = int(manifest["input_size"][0])
    size = cfg.input_size or cache_size
    resize = None if size == cache_size else size
    from cardiac_copilot_ros.data.dataset import action_stats

    if cfg.sim_subjects:
        mean = np.asarray(manifest["sim"]["action_mean"], np.float32)
        std = np.asarray(manifest["sim"]["action_std"], np.float32)
    else:
        mean, std = action_stats(cfg.data)
    model = build_model(cfg, mean, std, manifest.get("planes")).to(device)
    if state is not None:
        if list(state.get("planes") or PLANE_NAMES[: model.n_planes]) != model.plane_names:
            raise ValueError(f"cannot resume {resume}: it was trained on views "
                             f"{state.get('planes') or list(PLANE_NAMES)}, the data has {model.plane_names}")
        model.load_state_dict(state["model"])
    elif cfg.init_from:   # fine-tuning: the weights (and action statistics) of another run, a fresh optimiser
        _init_from(model, cfg)
    if cfg.channels_last:   # before the optimiser, whose state then takes the same layout
        model.to(memory_format=torch.channels_last)
    model.train()
    step_module: torch.nn.Module = TrainStep(model)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)

    train_sampler = ResumableSampler(train_ds, world, rank, shuffle=not getattr(train_ds, "sequential", False),
                                     seed=cfg.seed)
    val_sampler = DistributedSampler(val_ds, num_replicas=world, rank=rank, shuffle=False)
    train_loader = make_loader(train_ds, cfg, train_sampler, device, drop_last=len(train_ds) >= cfg.batch_size * world)
    val_loader = make_loader(val_ds, cfg, val_sampler, device, drop_last=False)
    steps_per_epoch = max(1, len(train_loader))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.epochs * steps_per_epoch) if cfg.max_steps is None else total_steps

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=cfg.min_lr)
    autocast, scaler, amp_name = _amp(cfg, device)
    step, epoch, epoch_step, best = 0, 0, 0, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, epoch_step, best = state["step"], state["epoch"], state["epoch_step"], state.get("best")

    run_dir = Path(state["run_dir"]) if state is not None and state.get("run_dir") else run_dir_for(cfg)
    writer = None
    history: list[dict[str, Any]] = []
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(
            {**asdict(cfg), "resolved": {"device": str(device), "world_size": world, "amp": amp_name,
                                         "input_size": size, "cache_input_size": cache_size,
                                         "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                                         "train_items": len(train_ds), "val_frames": len(val_ds),
                                         "action_mean": mean.tolist(), "action_std": std.tolist(),
                                         "data_manifest_sha256": manifest.get("manifest_sha256"),
                                         "sim": manifest.get("sim"), "sim_subjects": sim_subjects(cfg),
                                         "code_version": code_version(), "resumed_from": str(resume or "")}},
            indent=2, sort_keys=True))
        old = run_dir / "metrics.json"
        if state is not None and old.is_file():
            history = json.loads(old.read_text()).get("history", [])
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        print(f"run folder: {run_dir}  ({cfg.model}, preset {cfg.preset}, {cfg.backbone}, {size} px, "
              f"device {device}, world {world}, amp {amp_name}, {len(train_ds)} train items, "
              f"{len(val_ds)} val frames, {total_steps} steps)", flush=True)

    def checkpoint(name: str) -> None:
        if not is_main:
            return
        path = run_dir / "checkpoints" / name
        save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step,
                        epoch=epoch, epoch_step=epoch_step, cfg=cfg, manifest=manifest, input_size=size,
                        best=best, run_dir=run_dir)
        ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
        for old_ck in ckpts[: max(0, len(ckpts) - cfg.keep_checkpoints)]:
            old_ck.unlink(missing_ok=True)

    def do_validation() -> None:
        nonlocal best
        sync_buffers(model, world)
        res = validate(model, val_loader, device, resize, mean, world)
        entry = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "val": res}
        history.append(entry)
        primary = res[res["primary"]]["mean"]
        improved = best is None or primary < best["val_mae_mean"]
        if improved:
            best = {"step": step, "epoch": epoch, "val_mae_mean": primary, "val": res}
        if is_main:
            for mode in ("policy", "refined", "mean_baseline"):
                if mode in res:
                    for ax in (*AXES, "mean"):
                        writer.add_scalar(f"val_mae_{mode}/{ax}", res[mode][ax], step)
            msg = f"[step {step}] val MAE {res['primary']}: {_fmt_mae(res[res['primary']])}"
            if "refined" in res:
                msg += f"\n             policy : {_fmt_mae(res['policy'])}"
            msg += f"\n       mean baseline: {_fmt_mae(res['mean_baseline'])}"
            print(msg + ("  * best" if improved else ""), flush=True)
            if improved:
                save_checkpoint(run_dir / "best.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, step=step, epoch=epoch, epoch_step=epoch_step, cfg=cfg,
                                manifest=manifest, input_size=size, best=best, run_dir=run_dir)
            write_metrics()

    def write_metrics() -> None:
        last = history[-1]["val"] if history else None
        metrics = {"model": cfg.model, "preset": cfg.preset, "step": step, "epoch": epoch,
                   "units": dict(zip(AXES, pose.ACTION_UNITS, strict=True)),
                   "best": best, "last": last,
                   "mean_baseline_mae": last["mean_baseline"] if last else None,
                   "history": history, "samples_per_s": round(rate, 2)}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    rate = 0.0
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train {cfg.model}", dynamic_ncols=True)
    t_start, samples = time.perf_counter(), 0
    model.train()
    try:
        while step < total_steps:
            train_sampler.set_epoch(epoch)
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            train_sampler.start = epoch_step * cfg.batch_size
            for batch in train_loader:
                loss, parts = compute_loss(model, step_module, batch, cfg, device, resize, autocast)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                step += 1
                epoch_step += 1
                samples += int(batch["plane"].shape[0]) * world
                rate = samples / max(1e-9, time.perf_counter() - t_start)
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"loss became {float(loss.detach())} at step {step}")
                if is_main:
                    if step % cfg.log_every == 0 or step == total_steps:
                        writer.add_scalar("train/loss", float(loss.detach()), step)
                        for k, v in parts.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                        writer.add_scalar("train/samples_per_s", rate, step)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", sps=f"{rate:.0f}")
                if cfg.val_every and step % cfg.val_every == 0:
                    do_validation()
                if step % cfg.checkpoint_every == 0:
                    checkpoint(f"step_{step:08d}.pt")
                if step >= total_steps:
                    break
            else:
                epoch += 1
                epoch_step = 0
                if not cfg.val_every:
                    do_validation()
                continue
            break
        if not history or history[-1]["step"] != step:
            do_validation()
        sync_buffers(model, world)
        checkpoint(f"step_{step:08d}.pt")
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    result = {"run_dir": str(run_dir), "step": step, "best": best, "last": history[-1]["val"] if history else None,
              "samples_per_s": rate, "model": model}
    if is_main:
        write_metrics()
        b = best["val"]
        print(f"done: {step} steps, {rate:.1f} samples/s. best (step {best['step']}) val MAE "
              f"{b['primary']}: {_fmt_mae(b[b['primary']])}\n"
              f"      always-predict-the-mean baseline: {_fmt_mae(b['mean_baseline'])}", flush=True)
    if world > 1:
        dist.barrier()
    return result
