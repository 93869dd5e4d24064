"""Subject splits: disjoint, complete, deterministic, every split non-empty when possible."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardiac_copilot_ros.data.build import (
    BuildOptions,
    DatasetError,
    build_cache,
    read_split_file,
    split_subjects,
)
from cardiac_copilot_ros.data.synthetic import SyntheticScan, write_synthetic_bag


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), val=st.floats(0.0, 0.45), test=st.floats(0.0, 0.45), seed=st.integers(0, 2**31))
def test_split_properties(n, val, test, seed):
    subjects = [f"sub-{i:03d}" for i in range(n)]
    s = split_subjects(subjects, val, test, seed)
    all_ = s["train"] + s["val"] + s["test"]
    assert sorted(all_) == subjects  # every subject exactly once
    assert len(set(all_)) == n
    assert s["train"]
    if val > 0 and n >= 2:
        assert s["val"]
    if test > 0 and (n >= 3 or (n == 2 and val == 0)):
        assert s["test"]
    if val == 0:
        assert not s["val"]
    if test == 0:
        assert not s["test"]
    if n >= 10:  # roughly the asked fractions
        assert abs(len(s["val"]) - max(1 if val > 0 else 0, round(val * n))) <= 1
    assert split_subjects(list(reversed(subjects)), val, test, seed) == s  # deterministic


def test_small_subject_counts():
    assert split_subjects(["a"], 0.15, 0.15, 0) == {"train": ["a"], "val": [], "test": []}
    two = split_subjects(["a", "b"], 0.15, 0.15, 0)
    assert len(two["train"]) == 1 and len(two["val"]) == 1 and two["test"] == []
    three = split_subjects(["a", "b", "c"], 0.15, 0.15, 0)
    assert [len(three[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    seeds = {tuple(split_subjects(list("abcdefgh"), 0.25, 0.25, s)["val"]) for s in range(10)}
    assert len(seeds) > 1  # the seed matters


def test_forced_subjects(tmp_path):
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"test": ["s3"], "train": ["s0", "s1"]}))
    forced = read_split_file(f)
    s = split_subjects([f"s{i}" for i in range(6)], 0.2, 0.2, 0, forced)
    assert s["test"] == ["s3"] and {"s0", "s1"} <= set(s["train"]) and len(s["val"]) == 1
    f.write_text(json.dumps({"test": ["s3"], "val": ["s3"]}))
    with pytest.raises(DatasetError, match="both"):
        read_split_file(f)
    f.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="JSON object"):
        read_split_file(f)


def test_cache_frames_of_a_subject_never_in_two_splits(tmp_path):
    for i in range(5):
        write_synthetic_bag(tmp_path / "bags" / f"b{i}", SyntheticScan(subject_id=f"p{i % 4}", seed=i,
                                                                      duration_s=1.0, annotations=((0.9, "PLAX"),)))
    m = build_cache([tmp_path / "bags"], tmp_path / "cache", BuildOptions(size=8, seed=3), progress=False)
    subject = np.load(tmp_path / "cache" / "subject.npy")
    ids = {k: {m["subjects"][s] for s in v} for k, v in m["splits"].items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert set(np.unique(subject)) == ids["train"] | ids["val"] | ids["test"]
    assert all(m["splits"][k] for k in ("train", "val", "test"))
    assert sum(m["split_frames"].values()) == m["totals"]["frames"]
    # reuse the split of a previous cache through its manifest
    m2 = build_cache([tmp_path / "bags"], tmp_path / "cache2",
                     BuildOptions(size=8, seed=99, split_file=str(tmp_path / "cache" / "manifest.json")),
                     progress=False)
    assert m2["splits"] == m["splits"]
