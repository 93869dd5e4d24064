"""``cardiac-copilot bench train``: data loader vs training step throughput (samples/s).

Three numbers for one cache, model and preset:

* loader: the DataLoader alone (decode from the memory-mapped cache, collate, to the device),
* step: full training steps (forward, loss, backward, optimiser) on batches already in memory,
* loader + step: the real training loop.

Data loading is not the bottleneck when ``loader`` is well above ``step`` and ``loader + step``
is close to ``step``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cardiac_copilot_ros.training.config import MODELS, PRESETS, make_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="training cache")
    parser.add_argument("--model", choices=MODELS, default="dreamer")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the preset's)")
    parser.add_argument("--steps", type=int, default=10, help="measured batches per row (after 2 warm-up)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")


def _cycle(loader):
    """Batches of ``loader`` without end (a new epoch starts when one runs out)."""
    while True:
        yield from loader


def _time_loader(loader, device, n: int) -> tuple[float, list]:
    it = _cycle(loader)
    kept = [next(it), next(it)]
    t0, count = time.perf_counter(), 0
    for _ in range(n):
        batch = next(it)
        for v in batch.values():
            v.to(device, non_blocking=True)
        count += int(batch["plane"].shape[0])
        if len(kept) < n:
            kept.append(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - t0), kept


def run(args: argparse.Namespace) -> int:
    from cardiac_copilot_ros.data.dataset import action_stats
    from cardiac_copilot_ros.training import loop

    cfg = make_config(args.preset, data=args.data, model=args.model, batch_size=args.batch_size,
                      workers=args.workers, device=args.device)
    device = loop.pick_device(cfg.device)
    if device.type == "cpu":  # the same thread count as training, or the numbers mislead
        torch.set_num_threads(loop.cpu_threads(cfg.threads, cfg.workers))
    train_ds, _, manifest = loop.make_datasets(cfg)
    sampler = loop.ResumableSampler(train_ds, 1, 0, shuffle=True, seed=cfg.seed)
    loader = loop.make_loader(train_ds, cfg, sampler, device, drop_last=False)
    cache_size = int(manifest["input_size"][0])
    size = cfg.input_size or cache_size
    resize = None if size == cache_size else size
    mean, std = action_stats(cfg.data)
    model = loop.build_model(cfg, mean, std).to(device).train()
    step_module = loop.TrainStep(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast, scaler, amp_name = loop._amp(cfg, device)

    def step(batch) -> None:
        loss, _ = loop.compute_loss(model, step_module, batch, cfg, device, resize, autocast)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    n = max(1, args.steps)
    loader_sps, batches = _time_loader(loader, device, n)
    for b in batches[:2]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, count = time.perf_counter(), 0
    for i in range(n):
        b = batches[i % len(batches)]
        step(b)
        count += int(b["plane"].shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_sps = count / (time.perf_counter() - t0)
    t0, count, it = time.perf_counter(), 0, _cycle(loader)
    for _ in range(n):
        b = next(it)
        step(b)
        count += int(b["plane"].shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    both_sps = count / (time.perf_counter() - t0)

    print(f"bench train: {cfg.model}, preset {cfg.preset}, {cfg.backbone}, {size} px (cache {cache_size} px), "
          f"batch {cfg.batch_size}, workers {cfg.workers}, device {device}, amp {amp_name}, "
          f"torch threads {torch.get_num_threads()}, {n} batches per row")
    rows = [("data loader alone", loader_sps), ("training step (data in memory)", step_sps),
            ("data loader + training step", both_sps)]
    print(f"{'what':<34}{'samples/s':>12}{'ms/batch':>12}")
    for name, sps in rows:
        print(f"{name:<34}{sps:>12.1f}{1000 * cfg.batch_size / sps:>12.1f}")
    verdict = ("data loading is NOT the bottleneck" if loader_sps > 1.5 * step_sps
               else "data loading may limit training: raise --workers")
    print(f"loader / step = {loader_sps / step_sps:.1f}x: {verdict}")
    if args.json:
        print(json.dumps({"loader_samples_per_s": loader_sps, "step_samples_per_s": step_sps,
                          "loader_and_step_samples_per_s": both_sps, "batch_size": cfg.batch_size,
                          "input_size": size, "model": cfg.model, "preset": cfg.preset, "device": str(device)}))
    return 0
