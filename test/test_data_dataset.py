"""FrameDataset / PairDataset over a cache: item contract, pair consistency, pickling,
DataLoader workers, augmentation hook."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cardiac_copilot_ros.data.build import BuildOptions, build_cache
from cardiac_copilot_ros.data.dataset import (
    CacheError,
    FrameDataset,
    ImageJitter,
    PairDataset,
    action_stats,
    load_manifest,
    split_indices,
)
from cardiac_copilot_ros.data.synthetic import SyntheticScan, write_synthetic_bag
from cardiac_copilot_ros.pose import compose_actions, relative_action

SIZE = 12


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for i in range(4):
        write_synthetic_bag(root / "bags" / f"b{i}", SyntheticScan(
            subject_id=f"p{i}", seed=i, duration_s=2.0,
            annotations=((0.8, "PLAX"), (1.6, "PSAX-MV"))))
    build_cache([root / "bags"], root / "cache", BuildOptions(size=SIZE, hold_ms=200), progress=False)
    return root / "cache"


def _wrap(d):
    d = np.abs(d)
    d[..., 3:] = np.minimum(d[..., 3:], 360 - d[..., 3:])
    return d


def test_frame_items(cache):
    m = load_manifest(cache)
    sets = {s: FrameDataset(cache, s) for s in ("train", "val", "test")}
    assert sum(len(d) for d in sets.values()) == m["totals"]["frames"] == len(FrameDataset(cache, "all"))
    item = sets["train"][0]
    assert set(item) == {"image", "action", "plane", "subject"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, SIZE, SIZE)
    assert item["action"].dtype == torch.float32 and item["action"].shape == (6,)
    assert item["plane"].dtype == torch.int64 and item["subject"].dtype == torch.int64
    actions = np.load(cache / "actions.npy")
    i = int(sets["val"].indices[5])
    assert np.array_equal(sets["val"][5]["action"].numpy(), actions[i])
    val_subjects = {m["subjects"][s] for s in m["splits"]["val"]}
    assert {int(sets["val"][k]["subject"]) for k in range(len(sets["val"]))} == val_subjects
    with pytest.raises(ValueError, match="unknown split"):
        split_indices(cache, "training")


def test_pair_consistency(cache):
    ds = PairDataset(cache, "all", max_gap=7, min_gap=2, seed=1)
    poses = np.load(cache / "poses.npy").astype(np.float64)
    demo = np.load(cache / "demo.npy")
    keys = set(PairDataset(cache, "all", max_gap=7)[0])
    assert keys == {"image1", "image2", "action1", "action2", "rel_action", "plane"}
    gaps = []
    for k in range(0, len(ds), 3):
        item = ds[k]
        i, j = int(ds.indices[k]), ds.partner(k, 0)  # the first read of k used draw 0
        assert demo[i] == demo[j] and 2 <= abs(i - j) <= 7
        gaps.append(j - i)
        rel = item["rel_action"].numpy().astype(np.float64)
        assert _wrap(rel - relative_action(poses[i], poses[j])).max() < 1e-3
        a1, a2 = item["action1"].numpy().astype(np.float64), item["action2"].numpy().astype(np.float64)
        assert _wrap(compose_actions(rel, a2) - a1).max() < 1e-3  # Eq. 6 holds on the data
        assert item["image1"].shape == item["image2"].shape == (1, SIZE, SIZE)
    assert min(gaps) < 0 < max(gaps)  # both directions
    assert set(np.abs(gaps)) == set(range(2, 8))  # uniform over the allowed gaps (all seen)


def test_pair_sampling_is_seeded_and_fresh_at_every_read(cache):
    a = PairDataset(cache, "train", max_gap=10, seed=5)
    b = PairDataset(cache, "train", max_gap=10, seed=5)
    rel = [a[k]["rel_action"] for k in range(len(a))]
    assert all(torch.equal(x, b[k]["rel_action"]) for k, x in enumerate(rel))  # same seed, same pairs
    again = [a[k]["rel_action"] for k in range(len(a))]  # the second epoch: new partners
    assert sum(not torch.equal(x, y) for x, y in zip(rel, again, strict=True)) > len(a) // 2
    assert [a.partner(k, 1) for k in range(len(a))] == [b.partner(k, 1) for k in range(len(b))]
    b.set_epoch(3)
    assert [a.partner(k) for k in range(len(a))] != [b.partner(k) for k in range(len(b))]
    with pytest.raises(ValueError):
        PairDataset(cache, "train", max_gap=1, min_gap=2)
    # every t1 frame in a demonstration with at least two frames is used
    demo = np.load(cache / "demo.npy")
    counts = np.bincount(demo)
    idx = split_indices(cache, "train")
    assert len(a) == sum(1 for i in idx if counts[demo[i]] >= 2)


def test_pickle_and_dataloader_workers(cache):
    ds = FrameDataset(cache, "train")
    ds[0]  # opens the maps in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps is None
    assert torch.equal(clone[3]["image"], ds[3]["image"])
    pairs = PairDataset(cache, "train", max_gap=4)
    loader = DataLoader(pairs, batch_size=16, num_workers=2, shuffle=True)
    batch = next(iter(loader))
    assert batch["image1"].shape == (16, 1, SIZE, SIZE) and batch["rel_action"].shape == (16, 6)
    frames = next(iter(DataLoader(ds, batch_size=8, num_workers=2)))
    assert frames["image"].dtype == torch.uint8 and frames["plane"].shape == (8,)


def test_augmentation_hook_is_off_by_default(cache):
    plain = FrameDataset(cache, "train")
    images = np.load(cache / "images.npy")
    assert np.array_equal(plain[0]["image"][0].numpy(), images[plain.indices[0]])
    torch.manual_seed(0)
    jit = FrameDataset(cache, "train", transform=ImageJitter(brightness=0.2, contrast=0.3, gain=0.3))
    out = torch.stack([jit[k]["image"] for k in range(20)])
    ref = torch.stack([plain[k]["image"] for k in range(20)])
    assert out.dtype == torch.uint8 and out.shape == ref.shape and not torch.equal(out, ref)


def test_action_stats_and_cache_errors(cache, tmp_path):
    mean, std = action_stats(cache)
    m = load_manifest(cache)
    assert mean.shape == std.shape == (6,) and np.allclose(mean, m["action_stats"]["mean"])
    with pytest.raises(CacheError, match="not a training cache"):
        load_manifest(tmp_path)
    with pytest.raises(CacheError, match="not a training cache"):
        FrameDataset(tmp_path, "train")
