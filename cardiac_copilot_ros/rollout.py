"""A fast closed loop without ROS: simulator, model(s), coarse to fine, fused target, a kinematic servo.

``bench closed-loop`` runs the real nodes over DDS in real time (about 15 s per episode). This module
runs the same guidance logic frame by frame, as fast as the model and the renderer go (about 20 episodes a
minute in one process on 2 cores; :func:`run_episodes_parallel` shares the subjects among one process per
core, 1.5x faster there, the same episodes), for what needs many episodes:

* DAgger (:mod:`cardiac_copilot_ros.training.dagger`, issue 12 item 1): the states the current models
  visit in the closed loop, labelled afterwards from the simulator's true target;
* a quick check of a candidate model on validation subjects before the real bench.

What runs per frame, as in ``guidance_node`` (fused mode) and ``servo_node``:

1. render the simulator at the probe pose (heartbeat phase advancing with time);
2. the stage's model (:class:`..coarse_to_fine.StageSelector`: coarse until the coarse fused target is
   near, then fine) predicts the action; its target estimate ``T_probe @ U(a)`` goes into that stage's
   :class:`..target_fusion.TargetFusion`; the guidance is the fused target relative to the probe
   (``fused``), or the frame's own action (``per_frame``);
3. the probe moves by ``gain`` times the guidance, clipped to ``max_step_mm`` / ``max_step_deg``
   (the servo's speed limit at the frame rate), plus optional exploration noise (DAgger's
   state diversity);
4. the loop stops when the guidance has stayed within ``stop_mm`` / ``stop_deg`` for ``stop_frames``
   frames (the servo's convergence), or after ``steps`` frames;
5. optionally (``verify_step_mm`` > 0), the servo's final-approach check first: at the first convergence
   the probe steps sideways (probe x, the sign alternating per attempt) and holds still for
   ``verify_settle_frames`` frames; the check passes when the implied target moved less than
   ``verify_tolerance_mm`` / ``verify_tolerance_deg`` over the step, and the loop then converges again;
   after ``verify_attempts`` failed checks the episode ends unconverged (the servo's honest "not reached");
6. or (``survey_poses`` > 0) the servo's final-approach survey (:mod:`..final_approach`): at the first
   convergence the probe visits the survey poses around the resting pose, holds each for
   ``survey_settle_frames`` and reads the implied target for ``survey_read_frames``; it then moves to
   the robust mean of the per-pose targets, converged if they scatter less than ``survey_tolerance_mm``
   / ``_deg``, else a new survey there (``survey_attempts`` in all), then it stays there unconverged.
   Each pose reads both the guidance (``survey_read`` / ``survey_gate`` ``guidance``) and the frame's own
   estimate before fusion (``frame_target``): ``survey_read`` says which mean the probe goes to,
   ``survey_gate`` whose scatter decides "reached" (the servo's ``survey_gate``). With ``survey_pool`` a
   repeated survey's mean and scatter are taken over the estimates of all the surveys so far.

This is a model of the loop, not the loop: no latency, no acceleration limits, no low-pass filter. The
numbers it gives rank models; ``bench closed-loop`` measures them (validation subjects 8000-8011, 224 px,
the check on: 56 % for session 3's fine model and 75 % for the DAgger one, where the real loop gave 56 % and
64 %). No rclpy here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .coarse_to_fine import StageConfig, StageSelector
from .final_approach import SURVEY_READS, SURVEY_SIZES, survey_offsets, survey_target
from .pose import action_to_matrix, invert, pose_error, relative_action, rotation_to_rotvec, rotvec_to_rotation
from .target_fusion import FusionConfig, TargetFusion, pose_residual

MODES = ("fused", "per_frame")


class Predictor(Protocol):
    """What the loop needs of a model (:class:`..runtime.GuidanceRuntime` is one)."""

    planes: tuple[str, ...]

    def predict(self, frame: np.ndarray, plane: str | int | None = None, refine: bool | None = None) -> Any: ...


@dataclass(frozen=True)
class RolloutConfig:
    """One simulated closed-loop episode. Units are in the names."""

    steps: int = 60                 # frames at most
    frame_dt_s: float = 0.1         # simulated time between frames (heartbeat phase, fusion stamps)
    gain: float = 0.5               # fraction of the guidance executed per frame
    max_step_mm: float = 4.0        # per frame (the servo's 0.04 m/s at 10 Hz)
    max_step_deg: float = 4.0       # per frame and axis
    noise_mm: float = 0.0           # exploration: Gaussian per-axis motion noise per frame (DAgger)
    noise_deg: float = 0.0
    stop_mm: float = 1.5            # converged: guidance within these ...
    stop_deg: float = 1.7
    stop_frames: int = 5            # ... for this many frames in a row
    render_size: int = 128          # simulator image side [px] (the training frames render at 128)
    max_offset_mm: float = 40.0     # start range (sim.expert.random_start_offset; z: a fifth)
    max_offset_deg: float = 40.0
    mode: str = "fused"             # fused | per_frame
    verify_step_mm: float = 0.0     # final-approach check: sideways step [mm]; 0 = off (the servo profile: 8)
    verify_settle_frames: int = 25  # frames held still after the step (2.5 s at frame_dt_s 0.1)
    verify_tolerance_mm: float = 4.0    # the implied target may move this much over the step ...
    verify_tolerance_deg: float = 4.0   # ... (the servo's 0.004 m / 0.07 rad)
    verify_attempts: int = 2        # failed checks before giving up
    survey_poses: int = 0           # final-approach survey (final_approach.py): poses around the resting pose;
    #                                 0 = off, else one of final_approach.SURVEY_SIZES (replaces the verify check)
    survey_step_mm: float = 6.0     # survey offsets: +- this on x and y (z: a third) ...
    survey_step_deg: float = 6.0    # ... and +- this on roll, pitch and yaw
    survey_settle_frames: int = 3   # frames at each survey pose before its guidance is read ...
    survey_read_frames: int = 3     # ... and frames read there
    survey_tolerance_mm: float = 3.0    # "reached" only if the surveyed estimates scatter less than this ...
    survey_tolerance_deg: float = 3.0   # ... (root mean square about their mean)
    survey_attempts: int = 2        # surveys (each around the previous surveyed target) before giving up
    survey_read: str = "guidance"   # the surveyed target is the mean of what the poses read: the guidance
    #                                 (in fused mode the fused target, as the servo sees it) or each frame's own
    #                                 estimate ("frame_target": T_probe @ U(a), before fusion)
    survey_gate: str = "guidance"   # the scatter that decides "reached": of the "guidance" or "frame_target" reads
    survey_pool: bool = False       # a repeated survey's target and gate pool the estimates of all the surveys
    #                                 of this approach (4 + 4 ...), instead of its own only (the servo's survey_pool)
    survey_arrive_mm: float = 0.0   # the probe stops short of each survey pose, as the servo does: where it is
    survey_arrive_deg: float = 0.0  # within both of these of it (its survey_arrive_m / _rad); 0 = exactly there

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any], base: RolloutConfig | None = None) -> RolloutConfig:
        """``base`` (default the defaults) with ``overrides`` applied, validated; unknown keys are a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown rollout settings {unknown}; known: {', '.join(sorted(known))}")
        return replace(base or cls(), **overrides).validate()

    def validate(self) -> RolloutConfig:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("steps", "stop_frames", "render_size", "verify_settle_frames", "verify_attempts",
                     "survey_read_frames", "survey_attempts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("frame_dt_s", "gain", "max_step_mm", "max_step_deg", "stop_mm", "stop_deg",
                     "max_offset_mm", "max_offset_deg"):
            v = float(getattr(self, name))
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        if not (0 <= self.verify_step_mm <= 30 and self.verify_tolerance_mm > 0 and self.verify_tolerance_deg > 0):
            raise ValueError("verify_step_mm must be in [0, 30] and the verify tolerances > 0")
        if self.survey_poses and self.survey_poses not in SURVEY_SIZES:
            raise ValueError(f"survey_poses must be 0 or one of {SURVEY_SIZES}, got {self.survey_poses}")
        if not (0 < self.survey_step_mm <= 20 and 0 < self.survey_step_deg <= 20 and self.survey_settle_frames >= 0
                and self.survey_tolerance_mm > 0 and self.survey_tolerance_deg > 0):
            raise ValueError("survey_step_mm/deg must be in (0, 20], survey_settle_frames >= 0, survey tolerances > 0")
        if not (self.survey_arrive_mm >= 0 and self.survey_arrive_deg >= 0
                and (self.survey_arrive_mm > 0) == (self.survey_arrive_deg > 0)):
            raise ValueError("survey_arrive_mm and survey_arrive_deg must be both 0 (exact) or both > 0")
        if not isinstance(self.survey_pool, bool):
            raise ValueError(f"survey_pool must be true or false, got {self.survey_pool!r}")
        for name in ("survey_read", "survey_gate"):
            if getattr(self, name) not in SURVEY_READS:
                raise ValueError(f"{name} must be one of {', '.join(SURVEY_READS)}, got {getattr(self, name)!r}")
        if not (0 <= self.noise_mm < 50 and 0 <= self.noise_deg < 50):
            raise ValueError("noise_mm and noise_deg must be in [0, 50)")
        return self


@dataclass
class RolloutResult:
    """One episode: where it went and every state it visited."""

    subject_seed: int
    plane: str
    start_offset: list[float]           # action from the target to the start pose (mm, deg)
    translation_mm: float               # final pose vs the true target
    rotation_deg: float
    converged: bool                     # the guidance stayed small (the servo would stop)
    frames: int
    verify: str = ""                    # final-approach check or survey: "" (off), "passed", "failed"
    survey_spread: list[float] = field(default_factory=list)   # last survey's scatter (mm, deg), if any
    #: every finished survey, in order: ``attempt`` (1, 2, ...), ``frame`` (frames so far), ``estimates`` (judged),
    #: ``spread_mm`` / ``spread_deg`` (the gate's scatter), ``error_mm`` / ``error_deg`` (surveyed target vs truth)
    surveys: list[dict[str, float]] = field(default_factory=list)
    #: (frames, 6): offset of every pose a frame was taken at, from the target (pose = target @ U(offset))
    offsets: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 6)))
    #: (frames,): the stage whose model guided at that frame ("coarse" / "fine")
    stages: list[str] = field(repr=False, default_factory=list)
    #: the engine each stage's model ran on (``coarse`` / ``fine``: ``torch``, ``onnxruntime``; empty for
    #: predictors without an ``engine``), so a record says what ``--engine auto`` resolved to
    engines: dict[str, str] = field(default_factory=dict)

    def success(self, mm: float = 5.0, deg: float = 5.0) -> bool:
        return self.translation_mm <= mm and self.rotation_deg <= deg

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("offsets"), d.pop("stages")
        d["fine_frames"] = sum(s == "fine" for s in self.stages)
        return d


def _clip_step(a: np.ndarray, cfg: RolloutConfig) -> np.ndarray:
    lim = np.array([cfg.max_step_mm] * 3 + [cfg.max_step_deg] * 3)
    return np.clip(cfg.gain * np.asarray(a, np.float64), -lim, lim)


def _arrive(T: np.ndarray, goal: np.ndarray, cfg: RolloutConfig) -> np.ndarray:
    """Where the servo's survey move from ``T`` toward ``goal`` stops: its pose control closes translation and
    rotation at the same rate, so it stops on the straight path at the fraction of the way left where both
    are within ``survey_arrive_mm`` / ``_deg`` (exactly at ``goal`` when those are 0)."""
    if cfg.survey_arrive_mm <= 0:
        return goal
    rel = invert(T) @ goal
    d_mm, rotvec = float(np.linalg.norm(rel[:3, 3])), rotation_to_rotvec(rel[:3, :3])
    d_deg = math.degrees(float(np.linalg.norm(rotvec)))
    left = min(1.0, cfg.survey_arrive_mm / d_mm if d_mm > 0 else 1.0,
               cfg.survey_arrive_deg / d_deg if d_deg > 0 else 1.0)
    step = np.eye(4)
    step[:3, :3] = rotvec_to_rotation((1.0 - left) * rotvec)
    step[:3, 3] = (1.0 - left) * rel[:3, 3]
    return T @ step


def run_episode(renderer: Any, plane: str, coarse: Predictor, fine: Predictor | None = None,
                config: RolloutConfig | None = None, rng: np.random.Generator | None = None,
                start_offset: Sequence[float] | None = None, stage_config: StageConfig | None = None,
                fusion_config: FusionConfig | None = None) -> RolloutResult:
    """One episode on ``renderer`` (a :class:`..sim.render.Renderer`) toward ``plane``.

    ``start_offset``: action (mm, deg) from the target to the start; default drawn from ``rng`` over the
    start range. ``fine``: the fine model (coarse to fine, fused mode only); None = coarse only.
    """
    from .sim.expert import random_start_offset

    cfg = (config or RolloutConfig()).validate()
    rng = rng if rng is not None else np.random.default_rng()
    target = renderer.subject.target_pose(plane)
    o0 = (np.asarray(start_offset, np.float64) if start_offset is not None
          else random_start_offset(rng, cfg.max_offset_mm, cfg.max_offset_deg))
    T = target @ action_to_matrix(o0)
    fusions = {"coarse": TargetFusion(fusion_config), "fine": TargetFusion(fusion_config)}
    stages = StageSelector(stage_config)
    use_fine = fine is not None and cfg.mode == "fused"
    offsets: list[np.ndarray] = []
    stage_log: list[str] = []
    calm = 0
    converged = False
    verify, failures = "", 0
    hold = 0                            # frames still to hold after a check's step
    before: np.ndarray | None = None    # implied target when the check started
    survey: dict[str, Any] | None = None   # the final-approach survey in progress
    survey_spread: list[float] = []
    surveys: list[dict[str, float]] = []
    pooled = _reads()                   # estimates of the finished surveys (survey_pool)
    t = float(rng.uniform(0.0, 1.0))   # heartbeat phase at the start
    for _ in range(cfg.steps):
        stage = stages.stage if use_fine else "coarse"
        model = fine if stage == "fine" and fine is not None else coarse
        offsets.append(relative_action(target, T))
        stage_log.append(stage)
        pred = model.predict(renderer.render(T, t), plane)
        if cfg.mode == "fused":
            up = fusions[stage].add(t, T, action_to_matrix(pred.action), pred.action_scale, key=plane)
            fused = up.fused
            guidance = relative_action(T, fused.T_mm)
            if use_fine:   # as guidance_node._fuse_frame
                stages.hand_over(stage, up, T, fusions["coarse"], fusions["fine"])
        else:
            guidance = np.asarray(pred.action, np.float64)
        t += cfg.frame_dt_s
        if survey is not None:   # the final-approach survey: hold at each pose, read, move to the next
            survey["left"] -= 1
            if survey["left"] < cfg.survey_read_frames:
                survey["reads"]["guidance"].append(T @ action_to_matrix(guidance))
                survey["reads"]["frame_target"].append(T @ action_to_matrix(pred.action))
            if survey["left"] > 0:
                continue
            for kind, reads in survey["reads"].items():
                survey["estimates"][kind].append(survey_target(reads).T_mm)
            survey["k"] += 1
            if survey["k"] < len(survey["poses"]):
                T = _arrive(T, survey["poses"][survey["k"]], cfg)
                survey["left"], survey["reads"] = cfg.survey_settle_frames + cfg.survey_read_frames, _reads()
                continue
            if cfg.survey_pool:
                for kind, estimates in survey["estimates"].items():
                    pooled[kind] += estimates
            judged = pooled if cfg.survey_pool else survey["estimates"]
            st = survey_target(judged[cfg.survey_read])
            gate = survey_target(judged[cfg.survey_gate])
            T, survey_spread, survey = st.T_mm, [gate.spread_mm, gate.spread_deg], None
            err = pose_error(T, target)
            surveys.append({"attempt": failures + 1, "frame": len(offsets), "estimates": gate.n,
                            "spread_mm": gate.spread_mm, "spread_deg": gate.spread_deg,
                            "error_mm": float(err[0]), "error_deg": float(err[1])})
            if gate.spread_mm <= cfg.survey_tolerance_mm and gate.spread_deg <= cfg.survey_tolerance_deg:
                verify, converged = "passed", True
                break
            failures += 1
            if failures >= cfg.survey_attempts:
                verify = "failed"
                break
            survey = _start_survey(T, cfg)
            T = _arrive(T, survey["poses"][0], cfg)
            continue
        if hold:   # the final-approach check: still at the stepped pose while the estimate settles
            hold -= 1
            if hold == 0:
                moved_mm, moved_deg = pose_residual(before, T @ action_to_matrix(guidance))
                if moved_mm <= cfg.verify_tolerance_mm and moved_deg <= cfg.verify_tolerance_deg:
                    verify = "passed"
                else:
                    failures += 1
                    if failures >= cfg.verify_attempts:
                        verify = "failed"
                        break
            continue
        small = (np.linalg.norm(guidance[:3]) <= cfg.stop_mm and np.linalg.norm(guidance[3:]) <= cfg.stop_deg)
        calm = calm + 1 if small else 0
        if calm >= cfg.stop_frames and cfg.survey_poses:
            survey = _start_survey(T, cfg)
            T = _arrive(T, survey["poses"][0], cfg)
            continue
        if calm >= cfg.stop_frames:
            if cfg.verify_step_mm <= 0 or verify == "passed":
                converged = True
                break
            before = T @ action_to_matrix(guidance)
            sign = -1.0 if failures % 2 else 1.0
            T = T @ action_to_matrix(np.array([sign * cfg.verify_step_mm, 0, 0, 0, 0, 0], np.float64))
            hold, calm = cfg.verify_settle_frames, 0
            continue
        step = _clip_step(guidance, cfg)
        if cfg.noise_mm or cfg.noise_deg:
            step = step + rng.normal(0.0, 1.0, 6) * np.array([cfg.noise_mm] * 3 + [cfg.noise_deg] * 3)
        T = T @ action_to_matrix(step)
    err_mm, err_deg = pose_error(T, target)
    return RolloutResult(subject_seed=int(getattr(renderer.subject, "seed", -1)), plane=str(plane),
                         start_offset=[float(v) for v in o0], translation_mm=float(err_mm),
                         rotation_deg=float(err_deg), converged=converged, frames=len(offsets),
                         offsets=np.asarray(offsets, np.float64).reshape(-1, 6), stages=stage_log,
                         verify=verify, survey_spread=survey_spread, surveys=surveys)


def _start_survey(centre: np.ndarray, cfg: RolloutConfig) -> dict[str, Any]:
    """A survey around ``centre``: its poses (visit ``poses[0]`` first), the per-pose reads and estimates."""
    offsets = survey_offsets(cfg.survey_poses, cfg.survey_step_mm, cfg.survey_step_deg)
    return {"poses": [centre @ action_to_matrix(o) for o in offsets], "k": 0, "estimates": _reads(),
            "reads": _reads(), "left": cfg.survey_settle_frames + cfg.survey_read_frames}


def _reads() -> dict[str, list[np.ndarray]]:
    return {kind: [] for kind in SURVEY_READS}


def run_episodes(seeds: Sequence[int], planes: Sequence[str], coarse: Predictor, fine: Predictor | None = None,
                 config: RolloutConfig | None = None, seed: int = 0, episodes_per_plane: int = 1,
                 progress: Callable[[RolloutResult], None] | None = None) -> list[RolloutResult]:
    """Episodes on every subject seed x plane (``episodes_per_plane`` starts each), reproducible from
    ``seed`` (the starts of subject s, plane p do not depend on which other subjects run)."""
    from .sim.phantom import make_subject
    from .sim.render import Renderer

    cfg = (config or RolloutConfig()).validate()
    engines = {stage: str(p.engine) for stage, p in (("coarse", coarse), ("fine", fine))
               if p is not None and getattr(p, "engine", None)}
    out: list[RolloutResult] = []
    for s in seeds:
        renderer = Renderer(make_subject(int(s)), size=cfg.render_size, heartbeat=True)
        for p_index, plane in enumerate(planes):
            for k in range(int(episodes_per_plane)):
                rng = np.random.default_rng((int(seed), int(s), p_index, k))
                res = run_episode(renderer, plane, coarse, fine, cfg, rng)
                res.engines = dict(engines)
                out.append(res)
                if progress is not None:
                    progress(res)
    return out


def run_episodes_parallel(seeds: Sequence[int], coarse: str | Path, fine: str | Path | None = None,
                          config: RolloutConfig | None = None, seed: int = 0, episodes_per_plane: int = 1,
                          progress: Callable[[RolloutResult], None] | None = None, workers: int = 0,
                          threads: int = 0, engine: str = "torch") -> list[RolloutResult]:
    """:func:`run_episodes` over all the coarse bundle's planes, the subjects shared among ``workers``
    processes (0: one per CPU core, at most one per subject; 1: in this process).

    Each process loads the bundles itself and runs whole subjects; the results come back in the order
    :func:`run_episodes` gives them and are the same episodes (each start is seeded by subject, plane and
    index alone). ``threads``: torch threads per process (0: the cores shared among the processes).
    ``engine``: see :func:`load_runtimes`.
    ``progress`` is called in this process as each subject's episodes arrive.
    """
    import os

    cfg = (config or RolloutConfig()).validate()
    seeds = [int(s) for s in seeds]
    cores = os.cpu_count() or 1
    workers = int(workers) if workers and workers > 0 else cores
    workers = max(1, min(workers, len(seeds)))
    threads = int(threads) if threads and threads > 0 else max(1, cores // workers)
    if workers == 1:
        c, f = load_runtimes(coarse, fine, threads, engine)
        return run_episodes(seeds, c.planes, c, f, cfg, seed=seed, episodes_per_plane=episodes_per_plane,
                            progress=progress)
    import multiprocessing

    # spawn, not fork: the parent may already have torch's thread pools running, which fork does not copy
    ctx = multiprocessing.get_context("spawn")
    by_seed: dict[int, list[RolloutResult]] = {}
    init = (str(coarse), None if fine is None else str(fine), threads, cfg, int(seed), int(episodes_per_plane),
            engine)
    with ctx.Pool(workers, initializer=_worker_init, initargs=init) as pool:
        for s, results in pool.imap_unordered(_worker_subject, seeds):
            by_seed[s] = results
            if progress is not None:
                for res in results:
                    progress(res)
    return [res for s in seeds for res in by_seed[s]]


#: per-process state of :func:`run_episodes_parallel`'s workers: (coarse, fine, config, seed, episodes)
_WORKER: dict[str, Any] = {}


def _worker_init(coarse: str, fine: str | None, threads: int, config: RolloutConfig, seed: int,
                 episodes_per_plane: int, engine: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's: it stops the pool, quietly
    c, f = load_runtimes(coarse, fine, threads, engine)
    _WORKER.update(coarse=c, fine=f, config=config, seed=seed, episodes=episodes_per_plane)


def _worker_subject(subject_seed: int) -> tuple[int, list[RolloutResult]]:
    w = _WORKER
    return subject_seed, run_episodes([subject_seed], w["coarse"].planes, w["coarse"], w["fine"], w["config"],
                                      seed=w["seed"], episodes_per_plane=w["episodes"])


#: Engines rollouts run their models on: ``auto`` is ONNX Runtime where it loads the bundle (the guidance
#: node's choice on CPUs; 1.2x faster rollouts on 2 cores, docs/BENCHMARK.md), else TorchScript (``torch``,
#: the engine of the rollouts before session 12). The two agree to 1e-3 mm/deg per frame, so episodes match
#: closely but not exactly across engines.
ROLLOUT_ENGINES = ("auto", "torch", "onnxruntime")


def engines_used(results: Iterable[RolloutResult]) -> list[str]:
    """The distinct ``coarse=<engine> fine=<engine>`` combinations the episodes ran on (sorted)."""
    return sorted({" ".join(f"{k}={v}" for k, v in sorted(r.engines.items())) for r in results} - {""})


def load_runtimes(coarse: str | Path, fine: str | Path | None = None, threads: int = 0,
                  engine: str = "torch") -> tuple[Any, Any]:
    """The coarse (and fine, or None) :class:`..runtime.GuidanceRuntime` for rollouts on ``engine``
    (:data:`ROLLOUT_ENGINES`), ``threads`` torch / ONNX Runtime threads (0: the library's default), one
    warm-up frame. ONNX Runtime uses ``<bundle>.onnx`` beside a bundle (``cardiac-copilot export --format onnx``)
    or converts it in memory (about 15 s); with ``auto``, a bundle ONNX Runtime cannot load runs on TorchScript
    (said on stderr)."""
    from .model.bundle import BundleError
    from .runtime import GuidanceRuntime

    if engine not in ROLLOUT_ENGINES:
        raise ValueError(f"unknown rollout engine {engine!r}; choose one of {', '.join(ROLLOUT_ENGINES)}")

    def one(path: str | Path) -> Any:
        kw: dict[str, Any] = dict(num_threads=threads or None, warmup=1)
        if engine != "auto":
            return GuidanceRuntime(path, engine=engine, **kw)
        try:
            return GuidanceRuntime(path, engine="onnxruntime", **kw)
        except (BundleError, ImportError) as exc:   # no ONNX Runtime, or it cannot run this bundle
            import sys

            print(f"rollout: {path} runs on TorchScript (ONNX Runtime: {exc})", file=sys.stderr)
            return GuidanceRuntime(path, engine="torch", **kw)

    return one(coarse), (one(fine) if fine else None)


def add_process_arguments(parser: Any) -> None:
    """``--engine``, ``--threads`` and ``--workers`` of the commands that run rollouts (bench rollout, dagger)."""
    parser.add_argument("--engine", choices=ROLLOUT_ENGINES, default="auto",
                        help="inference engine of the rollouts (default auto: ONNX Runtime where it loads the "
                             "bundle, else TorchScript; torch reproduces rollouts from before session 12)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per process (0: rollouts share the CPU cores among --workers; dagger's "
                             "training gets torch's default)")
    parser.add_argument("--workers", type=int, default=0,
                        help="rollout processes, each running whole subjects (0: one per CPU core; 1: in this "
                             "process); the same episodes whatever the number")


def check_process_arguments(args: Any) -> None:
    """ValueError for a negative ``--workers`` / ``--threads``."""
    if args.workers < 0 or args.threads < 0:
        raise ValueError("--workers and --threads must be >= 0")


class EpisodeProgress:
    """A ``progress`` callback of :func:`run_episodes`: a tqdm bar over episodes with the successes so far
    (or nothing when not ``enabled``); call :meth:`close` at the end."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="episode", dynamic_ncols=True, file=sys.stderr)
        self.ok = 0

    def __call__(self, res: RolloutResult) -> None:
        self.ok += res.success()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(success=f"{self.ok}/{self.bar.n}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95 % Wilson score interval of a success rate (None for n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(results: Sequence[RolloutResult], mm: float = 5.0, deg: float = 5.0) -> dict[str, Any]:
    """Success rate (with its 95 % Wilson interval), medians of the final error, per plane and overall."""
    def stats(rs: Sequence[RolloutResult]) -> dict[str, Any]:
        n, k = len(rs), sum(r.success(mm, deg) for r in rs)
        ci = wilson_interval(k, n)
        return {"episodes": n, "successes": k, "success_rate": k / n if n else None,
                "success_ci95": None if ci is None else list(ci),
                "median_final_error_mm": float(np.median([r.translation_mm for r in rs])) if n else None,
                "median_final_error_deg": float(np.median([r.rotation_deg for r in rs])) if n else None,
                "converged_rate": float(np.mean([r.converged for r in rs])) if n else None,
                # converged ("plane reached" where the survey or check is on) beyond the tolerance
                "false_reached": sum(r.converged and not r.success(mm, deg) for r in rs),
                "median_frames": float(np.median([r.frames for r in rs])) if n else None}

    out = stats(results)
    out["per_plane"] = {p: stats([r for r in results if r.plane == p])
                        for p in dict.fromkeys(r.plane for r in results)}
    return out


def gate_sweep(results: Sequence[RolloutResult], tolerances_mm: Sequence[float], tolerances_deg: Sequence[float],
               attempts: Sequence[int], mm: float = 5.0, deg: float = 5.0) -> list[dict[str, Any]]:
    """What each survey gate would have said on ``results`` (:attr:`RolloutResult.surveys` of rollouts whose every
    survey failed, so that all attempts ran: ``bench rollout --gate-sweep``).

    A gate (tolerance mm, deg, attempts) reports "reached" at the first of an episode's first ``attempts`` surveys
    whose scatter is within the tolerance, falsely so when that surveyed target is beyond ``mm`` / ``deg`` from
    the truth. One row per gate: ``reached``, ``false_reached``, ``episodes``, ``reached_rate``,
    ``median_frames_to_reached`` (None when none), and ``success_rate`` (the probe ends at the passed survey's target,
    else at the last one's).
    """
    rows = []
    for n, tol_mm, tol_deg in itertools.product(attempts, tolerances_mm, tolerances_deg):
        reached = false = ok = 0
        frames = []
        for r in results:
            runs = r.surveys[:int(n)]
            hit = next((s for s in runs if s["spread_mm"] <= tol_mm and s["spread_deg"] <= tol_deg), None)
            end = hit or (runs[-1] if runs else None)
            if end is None:   # never surveyed (it ran out of steps first): it ends where it ended
                ok += r.success(mm, deg)
                continue
            within = end["error_mm"] <= mm and end["error_deg"] <= deg
            ok += within
            if hit is not None:
                reached += 1
                false += not within
                frames.append(hit["frame"])
        n_ep = len(results)
        rows.append({"attempts": int(n), "tolerance_mm": float(tol_mm), "tolerance_deg": float(tol_deg),
                     "episodes": n_ep, "reached": reached, "false_reached": false,
                     "reached_rate": reached / n_ep if n_ep else None,
                     "success_rate": ok / n_ep if n_ep else None,
                     "median_frames_to_reached": float(np.median(frames)) if frames else None})
    return rows


def states_table(results: Sequence[RolloutResult], stage: str | None = None) -> dict[str, np.ndarray]:
    """The visited states as arrays ``seed`` (N,), ``plane`` (N,) str, ``offset`` (N, 6) mm/deg from the
    target (pose = target @ U(offset)) and ``stage`` (N,) str; only the frames of ``stage`` when given."""
    seeds, planes, offsets, stages = [], [], [], []
    for r in results:
        keep = [i for i, s in enumerate(r.stages) if stage is None or s == stage]
        seeds += [r.subject_seed] * len(keep)
        planes += [r.plane] * len(keep)
        stages += [r.stages[i] for i in keep]
        offsets.append(r.offsets[keep])
    return {"seed": np.asarray(seeds, np.int64), "plane": np.asarray(planes, dtype="U16"),
            "offset": np.concatenate(offsets, 0) if offsets else np.zeros((0, 6)),
            "stage": np.asarray(stages, dtype="U8")}
