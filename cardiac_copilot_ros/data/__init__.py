"""Bags -> training cache (:mod:`.build`) -> torch datasets (:mod:`.dataset`); CLI in :mod:`.cli`.

Importing this package does not import torch; the dataset classes load it when first used.
"""

from __future__ import annotations

from typing import Any

from .build import BuildOptions, DatasetError, build_cache, find_bags, split_subjects

__all__ = ["BuildOptions", "CacheError", "DatasetError", "FrameDataset", "ImageJitter", "PairDataset",
           "action_stats", "build_cache", "find_bags", "load_manifest", "split_subjects"]

_LAZY = {"CacheError", "FrameDataset", "ImageJitter", "PairDataset", "action_stats", "load_manifest"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
