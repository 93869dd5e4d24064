"""A real 2-process DDP training run on CPU (gloo): both replicas end with identical weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from cardiac_copilot_ros.training.config import make_config
    from cardiac_copilot_ros.training.loop import train

    cfg = make_config("smoke", data=cache, model="dreamer", max_steps=2, val_every=2, checkpoint_every=2,
                      batch_size=4, out_dir=out, run_name="ddp", device="cpu")
    try:
        result = train(cfg)
        torch.save({k: v.detach().cpu() for k, v in result["model"].state_dict().items()},
                   Path(out) / f"rank{rank}.pt")
        torch.save({"best": result["best"]["val_mae_mean"]}, Path(out) / f"best{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from cardiac_copilot_ros import cli
    from cardiac_copilot_ros.sim.scan import write_scans

    root = tmp_path_factory.mktemp("ddp")
    write_scans(root / "bags", 3, 1, seed=5, frames_per_scan=30, image_size=48, progress=False)
    assert cli.main(["dataset", "build", str(root / "bags"), "--out", str(root / "cache"), "--size", "32",
                     "--quiet", "--val-fraction", "0.34", "--test-fraction", "0"]) == 0
    return root / "cache"


def test_two_process_gloo_training_keeps_replicas_identical(cache, tmp_path):
    from cardiac_copilot_ros.model.policy import GuidanceModel

    mp.spawn(_worker, args=(2, _free_port(), str(cache), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"replicas differ in {k}"
    # the step changed the weights (not a trivially equal pair of untouched models)
    torch.manual_seed(0)
    init = GuidanceModel("resnet18", dreamer=True, dreamer_dim=32, dreamer_depth=1, dreamer_heads=2).state_dict()
    assert not torch.equal(init["head.fc.0.weight"], s0["head.fc.0.weight"])
    # validation was all-reduced: both ranks agree on the best MAE
    assert torch.load(tmp_path / "best0.pt")["best"] == torch.load(tmp_path / "best1.pt")["best"]
    # only rank 0 wrote the run folder
    run = tmp_path / "ddp"
    assert (run / "best.pt").is_file() and (run / "checkpoints" / "step_00000002.pt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["ddp"]
