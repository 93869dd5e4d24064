"""Torch datasets over a training cache (see docs/ARCHITECTURE.md and docs/DATA.md).

The arrays are memory-mapped lazily in each process (the datasets pickle without them, so
DataLoader workers open their own maps); an item costs one image copy from the page cache.

* :class:`FrameDataset` item: ``{"image": uint8 (1, H, W), "action": float32 (6,),
  "plane": int64, "subject": int64}``.
* :class:`PairDataset` item: ``{"image1", "image2": uint8 (1, H, W), "action1", "action2":
  float32 (6,), "rel_action": float32 (6,) = U^-1(T_t1^-1 T_t2), "plane": int64}``; t2 is drawn
  on the fly at every read, uniformly among the frames of t1's demonstration at most
  ``max_gap`` (and at least ``min_gap``) frames away, in either direction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..pose import relative_action
from .build import ARRAYS, FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, DatasetError, manifest_digest

__all__ = ["CacheError", "FrameDataset", "ImageJitter", "PairDataset", "action_stats", "load_manifest",
           "split_indices"]


class CacheError(DatasetError):
    """A training cache is missing, incomplete, corrupt or of another format version."""


def load_manifest(cache_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """The cache's manifest, checked: format, version, content digest and array files.

    Raises :class:`CacheError` naming the directory otherwise.
    """
    cache = Path(cache_dir)
    path = cache / MANIFEST
    if not path.is_file():
        raise CacheError(f"{cache} is not a training cache (no {MANIFEST}); build one with "
                         "`cardiac-copilot dataset build BAGS --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {manifest.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}; rebuild the cache")
    if verify:
        if manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise CacheError(f"{path}: manifest_sha256 does not match its content (edited or damaged)")
        n = manifest["totals"]["frames"]
        for name, spec in manifest["arrays"].items():
            f = cache / spec["file"]
            try:
                arr = np.load(f, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CacheError(f"{cache}: array {spec['file']} missing or unreadable ({exc})") from None
            if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
                raise CacheError(f"{cache}: {spec['file']} is {arr.dtype}{list(arr.shape)}, manifest says "
                                 f"{spec['dtype']}{spec['shape']}")
            if name in ARRAYS and arr.shape[0] != n:
                raise CacheError(f"{cache}: {spec['file']} has {arr.shape[0]} rows, expected {n}")
    return manifest


def action_stats(cache_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis mean and std (float32 (6,), mm and deg) of the train split's actions.

    The std is floored at 1e-6 so it can divide.
    """
    st = load_manifest(cache_dir, verify=False)["action_stats"]
    return (np.asarray(st["mean"], dtype=np.float32),
            np.maximum(np.asarray(st["std"], dtype=np.float32), np.float32(1e-6)))


def split_indices(cache_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> np.ndarray:
    """Frame indices (int64, ascending) of a split: ``train``, ``val``, ``test`` or ``all``."""
    manifest = manifest or load_manifest(cache_dir)
    subject = np.load(Path(cache_dir) / "subject.npy")
    if split == "all":
        return np.arange(len(subject), dtype=np.int64)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose train, val, test or all")
    ids = [manifest["subjects"][s] for s in manifest["splits"][split]]
    return np.flatnonzero(np.isin(subject, ids)).astype(np.int64)


class ImageJitter:
    """Light photometric augmentation for uint8 (1, H, W) tensors (off unless passed as transform).

    ``out = clip((img - mean) * contrast + mean) * gain + brightness * 255``, each factor drawn
    uniformly per call: contrast in 1 +- contrast, gain in 1 +- gain, brightness in +- brightness.
    Uses torch's RNG (seeded per DataLoader worker).
    """

    def __init__(self, brightness: float = 0.05, contrast: float = 0.1, gain: float = 0.1) -> None:
        self.brightness, self.contrast, self.gain = float(brightness), float(contrast), float(gain)

    def _u(self, r: float) -> float:
        return float((torch.rand(()) * 2 - 1) * r) if r > 0 else 0.0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        mean = x.mean()
        x = (x - mean) * (1 + self._u(self.contrast)) + mean
        x = x * (1 + self._u(self.gain)) + self._u(self.brightness) * 255.0
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        return f"ImageJitter(brightness={self.brightness}, contrast={self.contrast}, gain={self.gain})"


class _CacheDataset(Dataset):
    """Shared lazy memory maps; pickles without them."""

    _ARRAYS: tuple[str, ...] = ()

    def __init__(self, cache_dir: str | Path, split: str,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.split = split
        self.transform = transform
        self.manifest = load_manifest(self.cache_dir)
        self.indices = split_indices(self.cache_dir, split, self.manifest)
        self.input_size = tuple(self.manifest["input_size"])
        self._maps: dict[str, np.ndarray] | None = None

    def _arr(self, name: str) -> np.ndarray:
        if self._maps is None:
            self._maps = {k: np.load(self.cache_dir / f"{k}.npy", mmap_mode="r") for k in self._ARRAYS}
        return self._maps[name]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _image(self, i: int) -> torch.Tensor:
        img = torch.from_numpy(np.array(self._arr("images")[i], copy=True)).unsqueeze(0)
        return self.transform(img) if self.transform is not None else img


class FrameDataset(_CacheDataset):
    """Single frames of one split: image, ground-truth action, plane, subject."""

    _ARRAYS = ("images", "actions", "plane", "subject")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i = int(self.indices[k])
        return {"image": self._image(i),
                "action": torch.from_numpy(np.array(self._arr("actions")[i], dtype=np.float32)),
                "plane": torch.tensor(int(self._arr("plane")[i]), dtype=torch.int64),
                "subject": torch.tensor(int(self._arr("subject")[i]), dtype=torch.int64)}


class PairDataset(_CacheDataset):
    """Dreamer pairs (t1, t2) of one demonstration, t2 drawn on the fly for each item.

    Index k is frame t1 (frames whose demonstration offers no partner within
    ``[min_gap, max_gap]`` frames are left out). Every read of item k draws a fresh t2 (so
    each epoch sees new pairs, also in persistent DataLoader workers): the n-th read of k in a
    process uses the draw ``(seed, epoch, k, n)``, so runs are reproducible for a seed and a
    sampler order. :meth:`set_epoch` is optional (it changes the draws like
    DistributedSampler.set_epoch).
    """

    _ARRAYS = ("images", "actions", "plane", "poses")

    def __init__(self, cache_dir: str | Path, split: str, max_gap: int = 30, min_gap: int = 1, seed: int = 0,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(cache_dir, split, transform)
        if min_gap < 1 or max_gap < min_gap:
            raise ValueError(f"need 1 <= min_gap <= max_gap, got min_gap={min_gap}, max_gap={max_gap}")
        self.max_gap, self.min_gap, self.seed, self.epoch = int(max_gap), int(min_gap), int(seed), 0
        start = np.zeros(self.manifest["totals"]["frames"], dtype=np.int64)
        end = np.zeros_like(start)
        for d in self.manifest["demos"]:
            start[d["start"]:d["start"] + d["count"]] = d["start"]
            end[d["start"]:d["start"] + d["count"]] = d["start"] + d["count"]
        idx = self.indices
        self._lo_n = np.maximum(0, (idx - self.min_gap) - np.maximum(start[idx], idx - self.max_gap) + 1)
        self._hi_n = np.maximum(0, np.minimum(end[idx] - 1, idx + self.max_gap) - (idx + self.min_gap) + 1)
        ok = (self._lo_n + self._hi_n) > 0
        self.indices, self._lo_n, self._hi_n = idx[ok], self._lo_n[ok], self._hi_n[ok]
        self._reads = np.zeros(len(self.indices), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Change the pair draws (like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def partner(self, k: int, draw: int = 0) -> int:
        """Cache index of t2 in the ``draw``-th read of item ``k`` (0 = the first read)."""
        i = int(self.indices[k])
        lo_n, hi_n = int(self._lo_n[k]), int(self._hi_n[k])
        r = int(np.random.default_rng((self.seed, self.epoch, k, draw)).integers(lo_n + hi_n))
        return i - self.min_gap - r if r < lo_n else i + self.min_gap + (r - lo_n)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        k = int(k)
        i, j = int(self.indices[k]), self.partner(k, int(self._reads[k]))
        self._reads[k] += 1
        poses = self._arr("poses")
        rel = relative_action(np.asarray(poses[i], np.float64), np.asarray(poses[j], np.float64))
        acts = self._arr("actions")
        return {"image1": self._image(i), "image2": self._image(j),
                "action1": torch.from_numpy(np.array(acts[i], dtype=np.float32)),
                "action2": torch.from_numpy(np.array(acts[j], dtype=np.float32)),
                "rel_action": torch.from_numpy(rel.astype(np.float32)),
                "plane": torch.tensor(int(self._arr("plane")[i]), dtype=torch.int64)}
