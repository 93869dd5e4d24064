"""Simulator frames rendered on the fly over the closed loop's whole start range.

Expert demonstrations follow one smooth path and spend most frames near the target, so a model
trained only on them has never seen most of what the closed loop visits (issue 12). This module
draws probe poses around each plane's target, renders them with the simulator and labels them
with the same code as the bag path (:func:`cardiac_copilot_ros.pose.relative_action`, the
paper's ``U^-1(T_t^-1 T_T)``; :mod:`.build` calls the same function on the poses read from bags).

Poses: ``T = T_target @ U(o)`` with the offset ``o`` (mm, deg) from a mixture (:data:`MIX`):

* ``uniform``: uniform over the closed-loop bench's start range
  (:func:`cardiac_copilot_ros.sim.expert.random_start_offset`: +-40 mm x, y, +-8 mm z,
  +-40 deg per angle; the same function the bench draws its starts with);
* ``near``: the same box shrunk by a log-uniform factor in [0.02, 0.35] (dense near the target,
  where the last centimetre is decided);
* ``expert``: a random moment of a scripted expert demonstration
  (:func:`cardiac_copilot_ros.sim.expert.demonstration`): overshoots, sweeps, pauses, hold;
* ``cache``: a frame of an existing training cache's train split (only when a cache is given);
* ``dagger``: a state the models visited in the closed loop (:class:`VisitedStates`, written by
  ``cardiac-copilot dagger`` from :mod:`cardiac_copilot_ros.rollout` episodes on training subjects),
  rendered and labelled here like every other pose (only when states are given).

Subjects are simulator seeds. :data:`SPLIT_SEEDS` fixes disjoint seed ranges per split (train
from 20000, val from 8000, test from 9000: the closed-loop bench's held-out subjects); every
constructor refuses a train set that shares a subject with a held-out set
(:func:`check_disjoint`). The datasets render in DataLoader workers (each worker keeps a small
cache of renderers). Item ``k`` is a pure function of ``(seed, epoch, k)`` and the subject pool of
its chunk, so runs are reproducible; use it with a sequential sampler: consecutive items share a
pool of :attr:`SimFrameDataset.pool` subjects that changes every :attr:`SimFrameDataset.chunk`
items (a batch mixes several subjects while the renderer cache stays warm).

Items (like :class:`.dataset.FrameDataset` / :class:`.dataset.PairDataset`):
``{"image": uint8 (1, S, S), "action": float32 (6,), "plane": int64, "subject": int64 (seed)}``
and, for pairs, ``"image1", "action1", "action2", "rel_action"`` (t2 is a second pose of the same
subject and plane; only its label is used by the Dreamer loss, so it is not rendered).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..images import resize_gray
from ..planes import PLANE_NAMES
from ..pose import action_to_matrix, relative_action
from .build import DatasetError

__all__ = ["APPROACH_MIX", "MIX", "SPLIT_SEEDS", "ApproachSet", "SimFrameDataset", "SimPairDataset",
           "SubjectOverlapError", "VisitedStates", "approach_label_mean",
           "check_disjoint", "label", "make_approach_set", "sample_offset", "split_seeds", "subject_ids"]

#: First subject seed of each split. Train seeds never reach 8000 + anything held out: see
#: :func:`split_seeds` (at most 100000 train subjects).
SPLIT_SEEDS = {"train": 20000, "val": 8000, "test": 9000}
#: Default mixture of pose sources (fractions; ``cache`` only when a cache is given).
MIX = {"uniform": 0.4, "near": 0.35, "expert": 0.25, "cache": 0.0, "dagger": 0.0}
#: Near-target shrink factor range (log-uniform) of the ``near`` source.
NEAR_SCALE = (0.02, 0.35)


class SubjectOverlapError(DatasetError):
    """A training set shares subjects with a held-out set."""


def split_seeds(split: str, n: int) -> list[int]:
    """The ``n`` subject seeds of a split (``train``, ``val``, ``test``)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose {', '.join(SPLIT_SEEDS)}")
    if n < 1:
        raise ValueError(f"need at least one {split} subject, got {n}")
    if split != "train" and n > 1000:
        raise ValueError(f"at most 1000 {split} subjects (seed range {SPLIT_SEEDS[split]}+)")
    return list(range(SPLIT_SEEDS[split], SPLIT_SEEDS[split] + int(n)))


def subject_ids(seeds: Iterable[int]) -> list[str]:
    """Simulator subject ids (``sim%04d``) of seeds (as in :func:`..sim.phantom.make_subject`)."""
    return [f"sim{int(s):04d}" for s in seeds]


def check_disjoint(train: Iterable[Any], **held_out: Iterable[Any]) -> None:
    """Raise :class:`SubjectOverlapError` when ``train`` shares a subject with any held-out set."""
    tr = set(train)
    for name, subjects in held_out.items():
        both = sorted(tr & set(subjects), key=str)
        if both:
            raise SubjectOverlapError(f"training subjects overlap the {name} subjects: "
                                      f"{', '.join(map(str, both[:5]))}{' ...' if len(both) > 5 else ''}")


def sample_offset(rng: np.random.Generator, source: str, max_offset_mm: float = 40.0,
                  max_offset_deg: float = 40.0) -> np.ndarray:
    """An offset (mm, deg) from the target (pose = target @ U(offset)) for ``uniform`` or ``near``."""
    from ..sim.expert import random_start_offset

    o = random_start_offset(rng, max_offset_mm, max_offset_deg)
    if source == "near":
        lo, hi = np.log(NEAR_SCALE[0]), np.log(NEAR_SCALE[1])
        o = o * float(np.exp(rng.uniform(lo, hi)))
    elif source != "uniform":
        raise ValueError(f"unknown offset source {source!r}")
    return o


def label(pose: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The ground-truth action (6,) mm/deg of a probe pose toward a target pose (both (4, 4), mm):
    :func:`cardiac_copilot_ros.pose.relative_action`, the function the bag path (:mod:`.build`) uses."""
    return relative_action(pose, target)


class VisitedStates:
    """Probe poses visited in closed-loop episodes, as offsets from the true target of their subject
    and plane (pose = target @ U(offset), mm / deg): the ``dagger`` source of :class:`SimFrameDataset`.

    Stored as ``.npz`` with arrays ``seed`` (N,) int, ``plane`` (N,) str, ``offset`` (N, 6) float
    (and optionally ``stage`` (N,) str): plain arrays, read with ``allow_pickle=False``.
    """

    def __init__(self, seed: np.ndarray, plane: np.ndarray, offset: np.ndarray) -> None:
        self.seed = np.asarray(seed, np.int64).reshape(-1)
        self.plane = np.asarray(plane).astype(str).reshape(-1)
        self.offset = np.asarray(offset, np.float64).reshape(-1, 6)
        if not (len(self.seed) == len(self.plane) == len(self.offset)):
            raise ValueError("visited states: seed, plane and offset must have the same length")
        if not np.all(np.isfinite(self.offset)):
            raise ValueError("visited states: non-finite offsets")
        unknown = sorted(set(self.plane) - set(PLANE_NAMES))
        if unknown:
            raise ValueError(f"visited states: unknown planes {unknown}; the models know {', '.join(PLANE_NAMES)}")

    def __len__(self) -> int:
        return len(self.seed)

    @classmethod
    def load(cls, paths: str | Sequence[str]) -> VisitedStates:
        """Read and concatenate ``.npz`` files (a comma-separated string or a list); errors name the file."""
        if isinstance(paths, str):
            paths = [p.strip() for p in paths.split(",") if p.strip()]
        parts = []
        for path in paths:
            try:
                z = np.load(path, allow_pickle=False)
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("a single array, not an .npz archive of seed, plane, offset")
                with z:
                    parts.append(cls(z["seed"], z["plane"], z["offset"]))
            except (OSError, KeyError, ValueError, EOFError) as exc:
                raise DatasetError(f"{path}: not a visited-states file ({type(exc).__name__}: {exc})") from exc
        if not parts:
            raise DatasetError("no visited-states files given")
        return cls(np.concatenate([p.seed for p in parts]), np.concatenate([p.plane for p in parts]),
                   np.concatenate([p.offset for p in parts]))

    def save(self, path: str, **extra: np.ndarray) -> None:
        np.savez_compressed(path, seed=self.seed, plane=self.plane, offset=self.offset, **extra)


class _Renderers:
    """A small per-process LRU cache of simulator renderers keyed by (seed, size)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def get(self, seed: int, size: int) -> Any:
        key = (int(seed), int(size))
        r = self._cache.get(key)
        if r is None:
            from ..sim.phantom import make_subject
            from ..sim.render import Renderer

            r = Renderer(make_subject(int(seed)), size=int(size), heartbeat=True)
            self._cache[key] = r
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return r


class SimFrameDataset(Dataset):
    """Frames rendered on the fly around the targets of ``seeds`` (see the module docstring).

    Args:
        seeds: subject seeds (e.g. :func:`split_seeds` ``("train", n)``).
        length: items per epoch.
        image_size: side of the returned uint8 image (px), after an area resize.
        render_sizes: sizes the simulator renders at (one drawn per item; 224 is what
            scanner_sim_node publishes by default).
        mix: pose-source fractions (:data:`MIX` keys).
        held_out: ``{name: seeds}`` that must not share a subject with ``seeds``.
        cache: an optional :class:`.dataset.FrameDataset` (its train split) for the ``cache`` source.
        states: optional :class:`VisitedStates` for the ``dagger`` source (their subjects must be
            training subjects: disjoint from ``held_out``).
    """

    sequential = True  #: use a sequential sampler (the dataset draws its own randomness)

    def __init__(self, seeds: Sequence[int], length: int = 100_000, image_size: int = 64,
                 render_sizes: Sequence[int] = (224,), mix: dict[str, float] | None = None,
                 planes: Sequence[int] | None = None, seed: int = 0, max_offset_mm: float = 40.0,
                 max_offset_deg: float = 40.0, held_out: dict[str, Iterable[int]] | None = None,
                 cache: Dataset | None = None, pool: int = 8, chunk: int = 2048, renderer_cache: int = 12,
                 transform: Any = None, jitter: bool = False, states: VisitedStates | None = None) -> None:
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("no subject seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("duplicate subject seeds")
        held = {k: list(v) for k, v in (held_out or {}).items()}
        check_disjoint(self.seeds, **held)
        if cache is not None:
            cache_subjects = getattr(cache, "subject_seeds", None)
            if cache_subjects is not None:
                check_disjoint(cache_subjects, **held)
        if states is not None and len(states):
            check_disjoint(set(states.seed.tolist()), **held)
        mix = dict(MIX if mix is None else mix)
        unknown = set(mix) - set(MIX)
        if unknown:
            raise ValueError(f"unknown pose sources {sorted(unknown)}; choose from {', '.join(MIX)}")
        if cache is None:
            mix["cache"] = 0.0
        if states is None or not len(states):
            mix["dagger"] = 0.0
        names = list(MIX)
        w = np.array([max(0.0, float(mix.get(k, 0.0))) for k in names])
        if w.sum() <= 0:
            raise ValueError("the pose-source mixture is empty")
        self.sources, self.weights = names, w / w.sum()
        self.length, self.image_size = int(length), int(image_size)
        self.render_sizes = [int(s) for s in render_sizes]
        self.planes = list(range(len(PLANE_NAMES))) if planes is None else [int(p) for p in planes]
        self.seed, self.epoch = int(seed), 0
        self.max_offset_mm, self.max_offset_deg = float(max_offset_mm), float(max_offset_deg)
        self.cache = cache
        self.states = states
        self._state_rows: dict[int, np.ndarray] = {}
        if states is not None and len(states):
            order = np.argsort(states.seed, kind="stable")
            uniq, first = np.unique(states.seed[order], return_index=True)
            self._state_rows = {int(u): rows for u, rows in zip(uniq, np.split(order, first[1:]), strict=True)}
        self.pool, self.chunk = max(1, min(int(pool), len(self.seeds))), max(1, int(chunk))
        self.transform, self.jitter = transform, bool(jitter)
        self._renderers = _Renderers(renderer_cache)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    # -- pose and label ------------------------------------------------------------------------
    def draw(self, k: int) -> dict[str, Any]:
        """The recipe of item ``k`` (no rendering): subject seed, plane, source, offset, pose, label."""
        c = int(k) // self.chunk
        pool_rng = np.random.default_rng((self.seed, self.epoch, 0xC0, c))
        pool = pool_rng.choice(len(self.seeds), size=self.pool, replace=False)
        rng = np.random.default_rng((self.seed, self.epoch, int(k)))
        subject_seed = self.seeds[int(pool[int(rng.integers(self.pool))])]
        plane = self.planes[int(rng.integers(len(self.planes)))]
        source = self.sources[int(rng.choice(len(self.sources), p=self.weights))]
        out = {"seed": subject_seed, "plane": plane, "source": source,
               "render_size": self.render_sizes[int(rng.integers(len(self.render_sizes)))],
               "t_s": float(rng.uniform(0.0, 4.0)), "rng": rng}
        if source == "cache":
            return out
        if source == "dagger":   # a visited state, preferably of a subject of the current pool
            rows = self._state_rows.get(subject_seed)
            if rows is None:
                in_pool = [self.seeds[int(i)] for i in pool if self.seeds[int(i)] in self._state_rows]
                subject_seed = (in_pool[int(rng.integers(len(in_pool)))] if in_pool
                                else int(self.states.seed[int(rng.integers(len(self.states)))]))
                rows = self._state_rows[subject_seed]
            row = int(rows[int(rng.integers(len(rows)))])
            out.update(seed=subject_seed, plane=PLANE_NAMES.index(str(self.states.plane[row])))
        renderer = self._renderers.get(subject_seed, out["render_size"])
        plane = out["plane"]
        target = renderer.subject.target_pose(PLANE_NAMES[plane])
        if source == "dagger":
            pose = target @ action_to_matrix(self.states.offset[row])
        elif source == "expert":
            from ..sim.expert import demonstration

            demo = demonstration(renderer.subject, PLANE_NAMES[plane], rng, duration_s=float(rng.uniform(10, 50)),
                                 pose_rate_hz=30.0, max_offset_mm=self.max_offset_mm,
                                 max_offset_deg=self.max_offset_deg)
            pose = demo.pose_at(float(rng.uniform(0.0, demo.duration_s)))
        else:
            pose = target @ action_to_matrix(sample_offset(rng, source, self.max_offset_mm, self.max_offset_deg))
        out.update(target=target, pose=pose, action=label(pose, target), renderer=renderer)
        return out

    def _image(self, d: dict[str, Any]) -> torch.Tensor:
        img = d["renderer"].render(d["pose"], d["t_s"])
        img = resize_gray(img, (self.image_size, self.image_size))
        if self.jitter:  # ImageJitter's defaults, in numpy with the item's generator (cheap in workers)
            c, g, b = d["rng"].uniform(-1.0, 1.0, 3) * (0.1, 0.1, 0.05)
            x = img.astype(np.float32)
            m = x.mean()
            img = np.clip(np.rint(((x - m) * (1 + c) + m) * (1 + g) + b * 255.0), 0, 255).astype(np.uint8)
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.uint8)).unsqueeze(0)
        return self.transform(t) if self.transform is not None else t

    def _cache_item(self, d: dict[str, Any]) -> dict[str, torch.Tensor]:
        item = self.cache[int(d["rng"].integers(len(self.cache)))]
        img = item["image"]
        if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
            img = torch.from_numpy(resize_gray(img[0].numpy(), (self.image_size, self.image_size))).unsqueeze(0)
        return {"image": img, "action": item["action"].float(), "plane": item["plane"],
                "subject": torch.tensor(-1, dtype=torch.int64)}

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        d = self.draw(int(k))
        if d["source"] == "cache":
            return self._cache_item(d)
        return {"image": self._image(d), "action": torch.from_numpy(d["action"].astype(np.float32)),
                "plane": torch.tensor(d["plane"], dtype=torch.int64),
                "subject": torch.tensor(d["seed"], dtype=torch.int64)}

    def label_stats(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis mean and std (mm, deg) of the labels of ``n`` draws (default: 20 per item, 1000 to
        10000; no rendering; cache items are read as labels only). The std is floored at 1e-6."""
        n = int(np.clip(20 * self.length, 1000, 10000)) if n is None else int(n)
        sub = SimFrameDataset.__new__(SimFrameDataset)
        sub.__dict__.update(self.__dict__)
        sub.epoch = 999_999  # a stream of its own (training epochs never reach it)
        sub._renderers = _LabelOnly()
        acts = []
        for k in range(int(n)):
            d = sub.draw(k)
            if d["source"] == "cache":
                acts.append(self.cache[int(d["rng"].integers(len(self.cache)))]["action"].numpy())
            else:
                acts.append(d["action"])
        a = np.asarray(acts, np.float64)
        return a.mean(0).astype(np.float32), np.maximum(a.std(0), 1e-6).astype(np.float32)


class _LabelOnly:
    """Stand-in renderer cache for label statistics: subjects only, no volumes."""

    class _R:
        def __init__(self, seed: int) -> None:
            from ..sim.phantom import make_subject

            self.subject = make_subject(seed)

    def __init__(self) -> None:
        self._subjects: dict[int, Any] = {}

    def get(self, seed: int, size: int) -> Any:
        if seed not in self._subjects:
            self._subjects[seed] = self._R(seed)
        return self._subjects[seed]


class SimPairDataset(SimFrameDataset):
    """Dreamer pairs on the fly: t1 rendered as in :class:`SimFrameDataset`, t2 a second pose of the
    same subject and plane (uniform or near source), ``rel_action = U^-1(T_t1^-1 T_t2)``."""

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        d = self.draw(int(k))
        if d["source"] == "cache":
            item = self._cache_item(d)
            a1 = item["action"].numpy().astype(np.float64)
            rng, target = d["rng"], np.eye(4)
            # cache frames: a pose relative to their own target is enough for the label algebra
            pose1 = target @ np.linalg.inv(action_to_matrix(a1))
            image, plane = item["image"], item["plane"]
        else:
            rng, target, pose1 = d["rng"], d["target"], d["pose"]
            a1 = d["action"]
            image, plane = self._image(d), torch.tensor(d["plane"], dtype=torch.int64)
        src = "near" if rng.random() < 0.5 else "uniform"
        pose2 = target @ action_to_matrix(sample_offset(rng, src, self.max_offset_mm, self.max_offset_deg))
        a2, rel = relative_action(pose2, target), relative_action(pose1, pose2)
        return {"image1": image, "action1": torch.from_numpy(np.asarray(a1, np.float32)),
                "action2": torch.from_numpy(a2.astype(np.float32)),
                "rel_action": torch.from_numpy(rel.astype(np.float32)), "plane": plane}


# ---------------------------------------------------------------------------------------
# Fixed held-out sets for evaluation and validation
# ---------------------------------------------------------------------------------------


class ApproachSet:
    """A fixed, deterministic set of frames drawn over the whole start range on ``seeds``.

    Arrays: ``images`` uint8 (N, S, S), ``actions`` float32 (N, 6) mm/deg, ``plane`` int64 (N,),
    ``subject`` int64 (N,) (seeds), ``source`` (N,) str. Frame ``j`` of subject ``s``, plane ``p``
    comes from the generator ``(seed, s, p, j)``: the same for every run and every model.
    """

    def __init__(self, images: np.ndarray, actions: np.ndarray, plane: np.ndarray, subject: np.ndarray,
                 source: np.ndarray, meta: dict[str, Any]) -> None:
        self.images, self.actions, self.plane, self.subject, self.source = images, actions, plane, subject, source
        self.meta = meta

    def __len__(self) -> int:
        return len(self.actions)


#: Default mixture of the held-out approach set: the closed loop's starts (uniform over the start
#: range) and, one frame in three, the near-target poses it passes on the way in.
APPROACH_MIX = {"uniform": 2 / 3, "near": 1 / 3, "expert": 0.0}


def _approach_poses(seeds: Sequence[int], frames_per_plane: int, seed: int, mix: dict[str, float],
                    max_offset_mm: float, max_offset_deg: float) -> Iterable[tuple[Any, int, int, str, np.ndarray,
                                                                                     np.ndarray, float]]:
    """(subject, seed, plane, source, pose, target, t_s) of every frame of an approach set, in order."""
    from ..sim.expert import demonstration
    from ..sim.phantom import make_subject

    names = [k for k in ("uniform", "near", "expert") if mix.get(k, 0) > 0]
    if not names:
        raise ValueError(f"empty approach-set mixture {mix}")
    w = np.array([mix[k] for k in names], np.float64)
    w /= w.sum()
    for s in seeds:
        subject = make_subject(int(s))
        for p, name in enumerate(PLANE_NAMES):
            target = subject.target_pose(name)
            for j in range(int(frames_per_plane)):
                rng = np.random.default_rng((int(seed), int(s), p, j))
                src = names[int(rng.choice(len(names), p=w))]
                if src == "expert":
                    demo = demonstration(subject, name, rng, duration_s=30.0, pose_rate_hz=30.0,
                                         max_offset_mm=max_offset_mm, max_offset_deg=max_offset_deg)
                    pose = demo.pose_at(float(rng.uniform(0, demo.duration_s)))
                else:
                    pose = target @ action_to_matrix(sample_offset(rng, src, max_offset_mm, max_offset_deg))
                yield subject, int(s), p, src, pose, target, float(rng.uniform(0.0, 4.0))


def approach_label_mean(seeds: Sequence[int], frames_per_plane: int = 30, seed: int = 0,
                        mix: dict[str, float] | None = None, max_offset_mm: float = 40.0,
                        max_offset_deg: float = 40.0) -> np.ndarray:
    """Mean action (6,) mm/deg of an approach set's labels on ``seeds`` (no rendering): the
    "always predict the train mean" reference when ``seeds`` are training subjects."""
    acts = [relative_action(pose, target) for _, _, _, _, pose, target, _ in _approach_poses(
        seeds, frames_per_plane, seed, APPROACH_MIX if mix is None else mix, max_offset_mm, max_offset_deg)]
    return np.asarray(acts, np.float64).mean(0)


def make_approach_set(seeds: Sequence[int], frames_per_plane: int = 30, image_size: int = 64,
                      render_size: int = 224, seed: int = 0, mix: dict[str, float] | None = None,
                      max_offset_mm: float = 40.0, max_offset_deg: float = 40.0,
                      progress: bool = False) -> ApproachSet:
    """Render a held-out approach set (default mixture :data:`APPROACH_MIX`) at ``render_size`` (what
    scanner_sim_node publishes), area-resized to ``image_size`` like the runtime does.

    Deterministic: the same arguments give the same frames on every run and machine."""
    mix = dict(APPROACH_MIX if mix is None else mix)
    imgs, acts, planes, subs, srcs = [], [], [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(seeds) * len(PLANE_NAMES) * frames_per_plane, unit="frame", desc="approach set")
    from ..sim.render import Renderer

    renderer = None
    for subject, s, p, src, pose, target, t_s in _approach_poses(seeds, frames_per_plane, seed, mix,
                                                                 max_offset_mm, max_offset_deg):
        if renderer is None or renderer.subject.seed != s:
            renderer = Renderer(subject, size=int(render_size), heartbeat=True)
        imgs.append(resize_gray(renderer.render(pose, t_s), (image_size, image_size)))
        acts.append(relative_action(pose, target))
        planes.append(p)
        subs.append(s)
        srcs.append(src)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    meta = {"seeds": [int(s) for s in seeds], "subjects": subject_ids(seeds), "frames_per_plane": int(frames_per_plane),
            "image_size": int(image_size), "render_size": int(render_size), "seed": int(seed), "mix": mix,
            "max_offset_mm": max_offset_mm, "max_offset_deg": max_offset_deg, "planes": list(PLANE_NAMES)}
    return ApproachSet(np.stack(imgs).astype(np.uint8), np.asarray(acts, np.float32), np.asarray(planes, np.int64),
                       np.asarray(subs, np.int64), np.asarray(srcs), meta)
