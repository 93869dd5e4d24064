"""Issue 12 item 1: the fast closed loop without ROS (rollout), visited states as a training source, and the
``cardiac-copilot dagger`` command (roll out, label, retrain, validate; resumable)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from cardiac_copilot_ros import rollout
from cardiac_copilot_ros.data.approach import SimFrameDataset, SubjectOverlapError, VisitedStates, split_seeds
from cardiac_copilot_ros.data.build import DatasetError
from cardiac_copilot_ros.pose import action_to_matrix, relative_action
from cardiac_copilot_ros.runtime import Prediction
from cardiac_copilot_ros.sim.phantom import make_subject
from cardiac_copilot_ros.sim.render import Renderer

PLANES = ("PLAX", "PSAX-AV", "PSAX-MV")


class PoseRecordingRenderer:
    """The simulator's renderer, remembering the pose of the last frame (what a perfect model would know)."""

    def __init__(self, seed: int, size: int = 32) -> None:
        self.inner = Renderer(make_subject(seed), size=size, heartbeat=True)
        self.subject = self.inner.subject
        self.last_pose: np.ndarray | None = None

    def render(self, T: np.ndarray, t_s: float = 0.0) -> np.ndarray:
        self.last_pose = np.array(T)
        return self.inner.render(T, t_s)


class TrueMotionModel:
    """A test double of a model: the true remaining motion toward the target moved by ``target_error``
    (an action, mm/deg), with an optional per-axis scale."""

    planes = PLANES

    def __init__(self, renderer: PoseRecordingRenderer, target_error=(0, 0, 0, 0, 0, 0), name: str = "m") -> None:
        self.renderer, self.error, self.name, self.calls = renderer, np.asarray(target_error, float), name, 0

    def predict(self, frame, plane=None, refine=None) -> Prediction:
        self.calls += 1
        target = self.renderer.subject.target_pose(plane) @ action_to_matrix(self.error)
        return Prediction(action=relative_action(self.renderer.last_pose, target), plane=plane, refined=False,
                          action_scale=np.ones(6))


def test_rollout_with_true_motion_converges_on_the_target():
    r = PoseRecordingRenderer(20001)
    res = rollout.run_episode(r, "PLAX", TrueMotionModel(r), config=rollout.RolloutConfig(render_size=32),
                              rng=np.random.default_rng(0))
    assert res.converged and res.success() and res.translation_mm < 1.5 and res.rotation_deg < 2.0
    assert res.offsets.shape == (res.frames, 6) and res.frames < 60
    # the first visited state is the start; states are offsets from the true target
    assert np.allclose(res.offsets[0], res.start_offset, atol=1e-6)
    assert np.linalg.norm(res.start_offset[:3]) > 5


@pytest.mark.parametrize("mode", rollout.MODES)
def test_rollout_stops_where_a_biased_model_points(mode):
    """A model whose target is 8 mm off: the loop converges there and the episode fails (the fixed point
    DAgger is for), in both guidance modes."""
    r = PoseRecordingRenderer(20002)
    model = TrueMotionModel(r, target_error=(8, 0, 0, 0, 0, 0))
    res = rollout.run_episode(r, "PSAX-AV", model, config=rollout.RolloutConfig(mode=mode, render_size=32),
                              rng=np.random.default_rng(1))
    assert res.converged and not res.success()
    assert abs(res.translation_mm - 8.0) < 1.5 and res.rotation_deg < 2.0
    assert set(res.stages) == {"coarse"}


def test_coarse_to_fine_hands_over_and_records_the_stage():
    r = PoseRecordingRenderer(20003)
    coarse = TrueMotionModel(r, target_error=(3, 0, 0, 0, 0, 0), name="coarse")
    fine = TrueMotionModel(r, name="fine")
    res = rollout.run_episode(r, "PSAX-MV", coarse, fine, rollout.RolloutConfig(render_size=32),
                              rng=np.random.default_rng(2), start_offset=[30, -20, 4, 25, -10, 20])
    assert res.stages[0] == "coarse" and res.stages[-1] == "fine"
    assert coarse.calls == res.stages.count("coarse") and fine.calls == res.stages.count("fine")
    assert res.success() and res.translation_mm < 1.5   # the fine model's target, not the coarse one's
    table = rollout.states_table([res], stage="fine")
    assert len(table["seed"]) == res.stages.count("fine") and set(table["stage"]) == {"fine"}
    assert set(table["plane"]) == {"PSAX-MV"} and set(table["seed"]) == {20003}
    assert len(rollout.states_table([res])["seed"]) == res.frames


class StillModel:
    """A model that always says "you are there": its implied target moves with the probe."""

    planes = PLANES

    def predict(self, frame, plane=None, refine=None) -> Prediction:
        return Prediction(action=np.zeros(6), plane=plane, refined=False, action_scale=np.ones(6))


def test_rollout_final_approach_check_passes_true_motion_and_refuses_a_model_that_moves_along():
    r = PoseRecordingRenderer(20006)
    cfg = rollout.RolloutConfig(render_size=32, verify_step_mm=8.0, verify_settle_frames=10, steps=120)
    res = rollout.run_episode(r, "PLAX", TrueMotionModel(r), config=cfg, rng=np.random.default_rng(3))
    assert res.verify == "passed" and res.converged and res.success()
    # the stepped pose and the frames held there are visited states (DAgger sees the check)
    side = np.abs(res.offsets[:, 0])
    assert np.sum((side > 6.0) & (side < 10.0)) >= 10
    still = rollout.run_episode(r, "PLAX", StillModel(), config=dataclasses.replace(cfg, mode="per_frame"),
                                rng=np.random.default_rng(4))
    assert still.verify == "failed" and not still.converged
    assert still.frames == 2 * (cfg.stop_frames + cfg.verify_settle_frames)   # two attempts, then the honest stop
    with pytest.raises(ValueError, match="verify"):
        rollout.RolloutConfig(verify_step_mm=-1.0).validate()


class BumpModel:
    """The true remaining motion plus a local bias: near the pose ``bump_mm`` off the target (probe x) the
    implied target is the probe's own pose (a spurious fixed point); a few mm away the bias fades."""

    planes = PLANES

    def __init__(self, renderer: PoseRecordingRenderer, bump_mm: float = 4.0, width_mm: float = 2.5) -> None:
        self.renderer, self.bump, self.width = renderer, bump_mm, width_mm

    def predict(self, frame, plane=None, refine=None) -> Prediction:
        target = self.renderer.subject.target_pose(plane)
        T = self.renderer.last_pose
        centre = (target @ action_to_matrix([self.bump, 0, 0, 0, 0, 0]))[:3, 3]
        w = float(np.exp(-np.sum((T[:3, 3] - centre) ** 2) / (2 * self.width ** 2)))
        implied = target.copy()
        implied[:3, 3] += w * (T[:3, 3] - target[:3, 3])
        return Prediction(action=relative_action(T, implied), plane=plane, refined=False, action_scale=np.ones(6))


def test_rollout_final_approach_survey_moves_off_a_local_fixed_point():
    """The servo's survey in the rollout: without it the loop rests on the fixed point 4 mm off; with a
    4-pose survey the mean of the targets read around it is the true one (reached, survey states visited)."""
    r = PoseRecordingRenderer(20007)
    start = [4.0, 0.0, 0.0, 0.0, 0.0, 0.0]   # on the fixed point
    plain = rollout.run_episode(r, "PLAX", BumpModel(r), config=rollout.RolloutConfig(render_size=32),
                                rng=np.random.default_rng(5), start_offset=start)
    assert plain.converged and abs(plain.translation_mm - 4.0) < 0.5
    cfg = rollout.RolloutConfig(render_size=32, survey_poses=4, steps=120)
    res = rollout.run_episode(r, "PLAX", BumpModel(r), config=cfg, rng=np.random.default_rng(5), start_offset=start)
    assert res.verify == "passed" and res.converged and res.translation_mm < 1.5
    assert len(res.survey_spread) == 2 and res.survey_spread[0] <= cfg.survey_tolerance_mm
    # the survey poses are visited states: +-6 mm sideways around the fixed point
    assert np.sum(np.abs(res.offsets[:, 1]) > 5.0) >= 2 * (cfg.survey_settle_frames + cfg.survey_read_frames)
    # a survey whose targets disagree: honest, not converged (scatter tolerance far below the bias)
    strict = dataclasses.replace(cfg, survey_tolerance_mm=0.01, survey_attempts=2)
    res = rollout.run_episode(r, "PLAX", BumpModel(r), config=strict, rng=np.random.default_rng(5),
                              start_offset=start)
    assert res.verify == "failed" and not res.converged
    with pytest.raises(ValueError, match="survey_poses"):
        rollout.RolloutConfig(survey_poses=3).validate()


class JitterModel(TrueMotionModel):
    """The true remaining motion, its target estimate jumping +-6 mm (probe x) from frame to frame: the fused
    target averages the jitter away, each frame's own estimate does not."""

    def predict(self, frame, plane=None, refine=None) -> Prediction:
        self.error = np.array([6.0 if self.calls % 2 else -6.0, 0, 0, 0, 0, 0])
        return super().predict(frame, plane, refine)


def test_rollout_survey_gate_reads_the_frames_own_estimates():
    """survey_gate frame_target judges the survey by the frames' own estimates (they disagree by +-6 mm: not
    reached, the probe still at the fused mean); the default gate, the fused guidance, agrees with itself."""
    r = PoseRecordingRenderer(20008)
    # 3 frames per pose (an odd number): the frame read at each pose jumps to the other side
    cfg = rollout.RolloutConfig(render_size=32, survey_poses=4, survey_attempts=1, steps=150, survey_settle_frames=2,
                                survey_read_frames=1)
    fused = rollout.run_episode(r, "PLAX", JitterModel(r), config=cfg, rng=np.random.default_rng(6))
    assert fused.verify == "passed" and fused.converged and fused.survey_spread[0] < 3.0
    frame = rollout.run_episode(r, "PLAX", JitterModel(r), config=dataclasses.replace(cfg, survey_gate="frame_target"),
                                rng=np.random.default_rng(6))
    assert frame.verify == "failed" and not frame.converged and frame.survey_spread[0] > 3.0
    assert frame.translation_mm == pytest.approx(fused.translation_mm, abs=1e-6)   # the same surveyed target
    assert rollout.summarize([fused, frame])["false_reached"] == int(not fused.success())
    for bad in ({"survey_gate": "fused"}, {"survey_read": "frame"}):
        with pytest.raises(ValueError, match="survey_"):
            rollout.RolloutConfig(**bad).validate()


class SettlingJitterModel(JitterModel):
    """JitterModel for the first ``jitter_frames`` frames, then exact."""

    def __init__(self, renderer: PoseRecordingRenderer, jitter_frames: int) -> None:
        super().__init__(renderer)
        self.jitter_frames = jitter_frames

    def predict(self, frame, plane=None, refine=None) -> Prediction:
        if self.calls >= self.jitter_frames:
            self.error = np.zeros(6)
            return TrueMotionModel.predict(self, frame, plane, refine)
        return super().predict(frame, plane, refine)


def test_rollout_pooled_second_survey_judges_both_surveys():
    """survey_attempts 2, frame_target gate: the frames' own estimates disagree (+-6 mm) during the first
    survey and agree exactly from then on. The second survey alone passes ("reached" after one failed
    survey); pooled with the first survey's estimates it fails: not reached."""
    r = PoseRecordingRenderer(20008)
    cfg = rollout.RolloutConfig(render_size=32, survey_poses=4, survey_attempts=1, steps=200, survey_settle_frames=2,
                                survey_read_frames=1, survey_gate="frame_target")
    first = rollout.run_episode(r, "PLAX", JitterModel(r), config=cfg, rng=np.random.default_rng(6))
    assert first.verify == "failed"   # the episode ends with its first survey: its length is when that ends
    two = dataclasses.replace(cfg, survey_attempts=2)
    fresh = rollout.run_episode(r, "PLAX", SettlingJitterModel(r, first.frames), config=two,
                                rng=np.random.default_rng(6))
    assert fresh.verify == "passed" and fresh.converged and fresh.survey_spread[0] < 0.1
    pooled = rollout.run_episode(r, "PLAX", SettlingJitterModel(r, first.frames),
                                 config=dataclasses.replace(two, survey_pool=True), rng=np.random.default_rng(6))
    assert pooled.verify == "failed" and not pooled.converged and pooled.survey_spread[0] > 3.0
    assert pooled.frames == fresh.frames   # the same two surveys, judged differently
    # every finished survey is logged: the pooled second one judged 8 estimates, and its target is where it ended
    assert [(s["attempt"], s["estimates"]) for s in pooled.surveys] == [(1, 4), (2, 8)]
    assert [(s["attempt"], s["estimates"]) for s in fresh.surveys] == [(1, 4), (2, 4)]
    last = pooled.surveys[-1]
    assert last["spread_mm"] == pooled.survey_spread[0] and last["frame"] == pooled.frames
    assert last["error_mm"] == pytest.approx(pooled.translation_mm) and last["error_deg"] == pytest.approx(
        pooled.rotation_deg)
    with pytest.raises(ValueError, match="survey_pool"):
        rollout.RolloutConfig(survey_pool=1).validate()


def _surveyed(*surveys: tuple[float, float, float, float], final_mm: float = 9.0) -> rollout.RolloutResult:
    """A rollout whose surveys (scatter mm, deg; surveyed target's error mm, deg) all ran."""
    logged = [{"attempt": k + 1, "frame": 10 * (k + 1), "estimates": 4 * (k + 1), "spread_mm": a, "spread_deg": b,
               "error_mm": c, "error_deg": d} for k, (a, b, c, d) in enumerate(surveys)]
    return rollout.RolloutResult(subject_seed=8000, plane="PLAX", start_offset=[0.0] * 6, translation_mm=final_mm,
                                 rotation_deg=1.0, converged=False, frames=40, surveys=logged)


def test_survey_moves_stop_short_where_the_servo_counts_a_pose_as_arrived():
    """survey_arrive_mm / _deg: the probe stops on the straight path where it is within both tolerances of the
    survey pose (the servo's survey_arrive_m / _rad), as far from it as they allow; 0 = exactly there."""
    from cardiac_copilot_ros.pose import pose_error

    goal = action_to_matrix([12.0, 0, 0, 6.0, 0, 0])   # 12 mm and 6 deg away: translation binds
    exact = rollout.RolloutConfig(survey_poses=4)
    assert np.allclose(rollout._arrive(np.eye(4), goal, exact), goal)
    cfg = rollout.RolloutConfig(survey_poses=4, survey_arrive_mm=2.0, survey_arrive_deg=2.3)
    stop = rollout._arrive(np.eye(4), goal, cfg)
    left_mm, left_deg = pose_error(stop, goal)
    assert left_mm == pytest.approx(2.0, abs=1e-6) and left_deg == pytest.approx(1.0, abs=1e-3)
    moved_mm, moved_deg = pose_error(np.eye(4), stop)
    assert moved_mm == pytest.approx(10.0, abs=1e-6) and moved_deg == pytest.approx(5.0, abs=1e-3)
    near = action_to_matrix([1.0, 0, 0, 1.0, 0, 0])    # already within both: no move
    assert np.allclose(rollout._arrive(np.eye(4), near, cfg), np.eye(4))
    for bad in ({"survey_arrive_mm": 2.0}, {"survey_arrive_mm": -1.0, "survey_arrive_deg": 2.0}):
        with pytest.raises(ValueError, match="survey_arrive"):
            rollout.RolloutConfig(**bad).validate()


def test_gate_sweep_replays_each_gate_on_the_logged_surveys():
    results = [_surveyed((1.0, 1.0, 2.0, 2.0), (0.5, 0.5, 1.0, 1.0)),   # passes any gate at once, truly
               _surveyed((1.5, 2.5, 6.0, 1.0), (1.2, 1.0, 3.0, 2.0)),   # a loose first gate passes it falsely
               _surveyed((3.0, 3.0, 8.0, 8.0), (1.1, 2.9, 4.0, 4.0)),   # only the second survey can pass
               rollout.RolloutResult(subject_seed=8001, plane="PLAX", start_offset=[0.0] * 6, translation_mm=2.0,
                                     rotation_deg=2.0, converged=False, frames=120)]   # never surveyed
    rows = {(r["attempts"], r["tolerance_mm"], r["tolerance_deg"]): r
            for r in rollout.gate_sweep(results, [1.0, 2.0], [3.0], [1, 2])}
    loose1, tight1, loose2, tight2 = rows[1, 2.0, 3.0], rows[1, 1.0, 3.0], rows[2, 2.0, 3.0], rows[2, 1.0, 3.0]
    assert (loose1["reached"], loose1["false_reached"]) == (2, 1)
    assert (tight1["reached"], tight1["false_reached"]) == (1, 0)
    assert (loose2["reached"], loose2["false_reached"]) == (3, 1)
    assert (tight2["reached"], tight2["false_reached"]) == (1, 0)
    # success: the probe ends at the passed survey's target, else at the last run one's, else where it ended
    assert loose1["success_rate"] == 2 / 4 and tight2["success_rate"] == 4 / 4 and tight1["success_rate"] == 2 / 4
    assert loose2["median_frames_to_reached"] == 10.0 and loose2["episodes"] == 4
    assert rollout.gate_sweep([], [1.0], [1.0], [1])[0]["reached_rate"] is None


def test_rollout_summary_and_config_checks():
    r = PoseRecordingRenderer(20004)
    model = TrueMotionModel(r)
    results = [rollout.run_episode(r, p, model, config=rollout.RolloutConfig(render_size=32, steps=40),
                                   rng=np.random.default_rng(k)) for k, p in enumerate(PLANES)]
    s = rollout.summarize(results)
    assert s["episodes"] == 3 and s["success_rate"] == 1.0 and s["success_ci95"][1] == 1.0
    assert set(s["per_plane"]) == set(PLANES)
    assert rollout.wilson_interval(0, 0) is None
    for bad in ({"mode": "oracle"}, {"gain": 0.0}, {"steps": 0}, {"noise_mm": -1.0}, {"max_step_deg": float("nan")}):
        with pytest.raises(ValueError):
            rollout.RolloutConfig(**bad).validate()


def test_rollout_runs_the_shipped_runtime():
    """The real runtime (GuidanceRuntime on the default bundle) in the loop: a few frames, finite states."""
    from cardiac_copilot_ros.runtime import GuidanceRuntime, default_model_path

    torch.set_num_threads(1)
    rt = GuidanceRuntime(default_model_path(), engine="torch", warmup=0)
    res = rollout.run_episodes([20005], ["PLAX"], rt, config=rollout.RolloutConfig(steps=3, render_size=64))
    assert len(res) == 1 and res[0].frames == 3 and np.isfinite(res[0].offsets).all()


def test_rollouts_in_processes_are_the_same_episodes_in_the_same_order():
    """run_episodes_parallel: two processes give exactly what one gives (coarse to fine, real bundles)."""
    from cardiac_copilot_ros.runtime import default_fine_model_path, default_model_path

    cfg = rollout.RolloutConfig(steps=6, render_size=48, noise_mm=0.5, noise_deg=0.5)
    coarse, fine = default_model_path(), default_fine_model_path()
    seen: list[rollout.RolloutResult] = []
    one = rollout.run_episodes_parallel([20007, 20008, 20009], coarse, fine, cfg, seed=3, workers=1, threads=1)
    two = rollout.run_episodes_parallel([20007, 20008, 20009], coarse, fine, cfg, seed=3, workers=2, threads=1,
                                        progress=seen.append)
    assert len(one) == len(two) == len(seen) == 9
    assert [(r.subject_seed, r.plane) for r in two] == [(s, p) for s in (20007, 20008, 20009) for p in PLANES]
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(a.offsets, b.offsets) and a.stages == b.stages


def test_rollouts_on_onnx_runtime_match_torchscript(tmp_path):
    """engine auto: a fine bundle gets its .onnx written once (dagger) and the rollouts run on ONNX Runtime.
    The first move is TorchScript's to 1e-3 mm/deg (the engines' agreement); later frames render a pose that
    differs by that much, and such differences grow along an episode (about 0.7 mm after 8 frames here), so
    episodes on the two engines are alike, not identical."""
    import shutil

    from cardiac_copilot_ros.model import onnx_bundle
    from cardiac_copilot_ros.runtime import default_fine_model_path, default_model_path
    from cardiac_copilot_ros.training import dagger

    if not (onnx_bundle.onnxruntime_available() and onnx_bundle.exporter_available()):
        pytest.skip("onnxruntime / onnxscript not installed")
    fine = tmp_path / "fine.pt"
    shutil.copy(default_fine_model_path(), fine)
    dagger._onnx_beside(fine)
    stamp = (tmp_path / "fine.onnx").stat().st_mtime_ns
    dagger._onnx_beside(fine)   # once
    assert (tmp_path / "fine.onnx").stat().st_mtime_ns == stamp
    coarse = default_model_path()
    on_onnx = rollout.load_runtimes(coarse, fine, threads=1, engine="auto")
    assert [rt.engine for rt in on_onnx] == ["onnxruntime", "onnxruntime"]
    cfg = rollout.RolloutConfig(steps=8, render_size=48, max_offset_mm=8, max_offset_deg=8)
    torch_res = rollout.run_episodes([20007], PLANES, *rollout.load_runtimes(coarse, fine, 1, "torch"), cfg, seed=3)
    onnx_res = rollout.run_episodes([20007], PLANES, *on_onnx, cfg, seed=3)
    for a, b in zip(torch_res, onnx_res, strict=True):
        assert a.stages == b.stages and "fine" in a.stages and a.frames == b.frames == 8
        assert np.abs(a.offsets[:2] - b.offsets[:2]).max() < 1e-3   # mm / deg
        assert np.abs(a.offsets - b.offsets).max() < 5.0 and np.isfinite(b.offsets).all()
    assert onnx_res[0].engines == {"coarse": "onnxruntime", "fine": "onnxruntime"}   # what auto resolved to
    assert rollout.engines_used(torch_res) == ["coarse=torch fine=torch"]
    with pytest.raises(ValueError, match="rollout engine"):
        rollout.load_runtimes(coarse, fine, engine="tensorrt")


# ---------------------------------------------------------------------------------------
# Visited states as training data
# ---------------------------------------------------------------------------------------

def _states(tmp_path, seeds=(20000, 20001)) -> str:
    offsets = np.array([[5.0, 0, 0, 0, 0, 0], [0, -4.0, 1.0, 0, 0, 0], [2.0, 2.0, 0, 0, 0, 0]])
    n = len(seeds)
    VisitedStates(np.array(seeds), np.array(["PLAX", "PSAX-MV"][:n]), offsets[:n]).save(str(tmp_path / "s.npz"))
    return str(tmp_path / "s.npz")


def test_dagger_source_renders_and_labels_the_visited_states(tmp_path):
    states = VisitedStates.load(_states(tmp_path))
    assert len(states) == 2
    ds = SimFrameDataset(split_seeds("train", 4), length=30, image_size=32, render_sizes=(48,), seed=1,
                         mix={"uniform": 0.5, "dagger": 0.5}, states=states)
    drawn = [ds.draw(k) for k in range(30)]
    dag = [d for d in drawn if d["source"] == "dagger"]
    assert 5 <= len(dag) <= 25
    for d in dag:
        k = 0 if d["seed"] == 20000 else 1
        assert d["plane"] == (0 if k == 0 else 2)
        expected = states.offset[k]
        assert np.allclose(relative_action(d["target"], d["pose"]), expected, atol=1e-6)
        # the label is the motion back to the target: for a pure translation, minus the offset
        assert np.allclose(d["action"], -expected, atol=1e-6)
    item = ds[next(k for k, d in enumerate(drawn) if d["source"] == "dagger")]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.uint8
    # without states, the dagger weight is ignored (nothing to draw)
    plain = SimFrameDataset([20000], length=10, mix={"uniform": 1, "dagger": 1})
    assert {plain.draw(k)["source"] for k in range(10)} == {"uniform"}


def test_visited_states_refuse_held_out_subjects_and_bad_files(tmp_path):
    held = VisitedStates.load(_states(tmp_path, seeds=(20000, 9001)))
    with pytest.raises(SubjectOverlapError, match="9001"):
        SimFrameDataset(split_seeds("train", 2), mix={"uniform": 1, "dagger": 1}, states=held,
                        held_out={"test": split_seeds("test", 10)})
    np.save(tmp_path / "junk.npy", np.zeros(3))
    (tmp_path / "junk.npz").write_bytes((tmp_path / "junk.npy").read_bytes())
    with pytest.raises(DatasetError, match="junk.npz"):
        VisitedStates.load(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "obj.npz", seed=np.array([1], dtype=object), plane=np.array(["PLAX"]), offset=np.zeros((1, 6)))
    with pytest.raises(DatasetError, match="obj.npz"):   # object arrays need pickle: refused
        VisitedStates.load(str(tmp_path / "obj.npz"))
    with pytest.raises(ValueError, match="unknown planes"):
        VisitedStates(np.array([1]), np.array(["XYZ"]), np.zeros((1, 6)))
    from cardiac_copilot_ros.training.config import make_config

    with pytest.raises(ValueError, match="dagger-states"):
        make_config("fine", model="baseline", sim_mix="uniform=0.5,dagger=0.5")
    with pytest.raises(ValueError, match="uniform, near or expert"):
        make_config("fine", model="baseline", sim_mix="dagger=1", dagger_states="x.npz")


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

def test_dagger_command_rolls_out_retrains_validates_and_resumes(tmp_path):
    from cardiac_copilot_ros import cli
    from cardiac_copilot_ros.training.loop import load_checkpoint

    torch.set_num_threads(1)
    train = ["--model", "baseline", "--preset", "smoke", "--backbone", "resnet10", "--uncertainty",
             "--sim-subjects", "2", "--sim-val-subjects", "1", "--sim-val-frames-per-plane", "1",
             "--sim-render-sizes", "48", "--sim-items-per-epoch", "32", "--max-steps", "2"]
    assert cli.main(["train", *train, "--out-dir", str(tmp_path), "--run-name", "fine0"]) == 0
    assert cli.main(["export", str(tmp_path / "fine0"), "--out", str(tmp_path / "fine0.pt")]) == 0
    out = tmp_path / "dagger"
    argv = ["dagger", "--stage", "coarse", "--coarse", str(tmp_path / "fine0.pt"), "--fine", "none",
            "--init", str(tmp_path / "fine0"), "--preset", "smoke", "--out", str(out), "--iterations", "1",
            "--subjects", "1", "--steps", "2", "--val-subjects", "1", "--val-episodes-per-plane", "1",
            "--train-set", "sim_subjects=2", "backbone=resnet10", "uncertainty=true", "sim_val_subjects=1",
            "sim_val_frames_per_plane=1", "sim_render_sizes=48", "sim_items_per_epoch=32",
            "--engine", "torch",   # ONNX Runtime rollouts: test_rollouts_on_onnx_runtime_match_torchscript
            "--rollout-set", "steps=4", "render_size=48", "stop_mm=100", "stop_deg=100", "stop_frames=3",
            "--no-progress"]
    assert cli.main(argv) == 0
    assert not (out / "iter_1" / "bundle.onnx").exists()   # only written for ONNX Runtime rollouts
    states = VisitedStates.load(str(out / "iter_1" / "states.npz"))
    assert len(states) > 0 and set(states.seed.tolist()) == {20000}
    assert set(np.load(out / "iter_1" / "states.npz")["stage"].tolist()) == {"coarse"}
    state = load_checkpoint(out / "iter_1" / "train")
    assert state["config"]["init_from"] == str(tmp_path / "fine0")
    assert state["config"]["dagger_states"] == str(out / "iter_1" / "states.npz")
    assert "dagger=0.5" in state["config"]["sim_mix"]
    from cardiac_copilot_ros.model.bundle import load_bundle

    meta = load_bundle(out / "iter_1" / "bundle.pt").meta["training"]
    assert meta["init_from"] == str(tmp_path / "fine0")
    assert meta["dagger_states"] == [str(out / "iter_1" / "states.npz")]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1]
    assert summary["iterations"][1]["states"] == len(states)
    assert (out / "best.txt").read_text().strip() in {str(tmp_path / "fine0.pt"), str(out / "iter_1" / "bundle.pt")}
    # resumable: a second run redoes nothing
    stamp = {p: p.stat().st_mtime_ns for p in (out / "iter_1" / "states.npz", out / "iter_1" / "bundle.pt",
                                               out / "iter_1" / "val.json")}
    assert cli.main(argv) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    # a validation cached before a rollout setting existed (an older version, here without survey_pool) is
    # still valid: the new setting's default is the loop it was made with
    val_path = out / "iter_1" / "val.json"
    old = json.loads(val_path.read_text())
    del old["setting"]["rollout"]["survey_pool"]
    val_path.write_text(json.dumps(old))
    stamp[val_path] = val_path.stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    # another --rollout-set (e.g. the servo's survey) validates every iteration again under it, keeps the rest
    survey = [*argv[:-1], "stop_mm=0.5", "survey_poses=4", "--no-progress"]
    assert cli.main(survey) == 0
    val = json.loads((out / "iter_1" / "val.json").read_text())
    assert val["setting"]["rollout"]["survey_poses"] == 4 and val["setting"]["rollout"]["stop_mm"] == 0.5
    assert json.loads((out / "iter_0_val.json").read_text())["setting"]["rollout"]["survey_poses"] == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items() if p.name != "val.json")
    # bad input: a clear error, exit 2
    fine = [*argv[:2], "fine", *argv[3:6], str(tmp_path / "fine0.pt"), *argv[7:]]
    fine[fine.index(str(out))] = str(tmp_path / "d2")   # this model never gets near: no fine-stage states
    assert cli.main(fine) == 2 and not (tmp_path / "d2" / "iter_1" / "states.npz").exists()
    assert cli.main([*argv[:-1], "--rollout-set", "speed=3"]) == 2
    assert cli.main(["dagger", "--out", str(tmp_path / "x"), "--dagger-weight", "1.5"]) == 2
    assert cli.main(["dagger", "--out", str(tmp_path / "y"), "--fine", "none"]) == 2
    assert cli.main(["train", *train, "--out-dir", str(tmp_path), "--run-name", "bad", "--backbone", "resnet18",
                     "--init-from", str(tmp_path / "fine0")]) == 2


def test_bench_rollout_gate_sweep_prints_each_gate(tmp_path, capsys):
    from cardiac_copilot_ros import cli

    torch.set_num_threads(1)
    out = tmp_path / "sweep.json"
    assert cli.main(["bench", "rollout", "--subject-seeds", "8000", "--episodes-per-plane", "1", "--quiet",
                     "--modes", "fused", "--rollout-set", "steps=2", "render_size=64", "survey_poses=4",
                     "--gate-sweep", "--sweep-mm", "1,2", "--sweep-deg", "3", "--sweep-attempts", "1,2",
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fused | 2 | 2 / 3 | 0 of 3 (0 %) | 0 |" in text
    doc = json.loads(out.read_text())
    assert len(doc["gate_sweep"]["fused"]) == 4 and doc["config"]["fused"]["survey_attempts"] == 2
    assert doc["config"]["fused"]["survey_tolerance_mm"] < 1e-6   # no survey passes: every attempt runs
    with pytest.raises(SystemExit):
        cli.main(["bench", "rollout", "--gate-sweep", "--sweep-mm", "1,-2"])


def test_bench_rollout_prints_a_table_and_json(tmp_path, capsys):
    from cardiac_copilot_ros import cli

    torch.set_num_threads(1)
    out = tmp_path / "r.json"
    assert cli.main(["bench", "rollout", "--subject-seeds", "8000", "--episodes-per-plane", "1", "--quiet",
                     "--rollout-set", "steps=2", "render_size=64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fused | all | 3 |" in text and "| per_frame | all | 3 |" in text
    doc = json.loads(out.read_text())
    assert doc["fine_bundle"].endswith("fine.pt") and doc["config"]["fused"]["steps"] == 2
    assert len(doc["episodes"]["per_frame"]) == 3 and doc["episodes"]["fused"][0]["frames"] == 2
    # --engine auto is recorded with what it resolved to, in the JSON and the printed line
    assert doc["engine"] == "auto" and len(doc["engines_used"]) == 1
    assert re.fullmatch(r"coarse=(torch|onnxruntime) fine=(torch|onnxruntime)", doc["engines_used"][0])
    assert set(doc["episodes"]["fused"][0]["engines"]) == {"coarse", "fine"} and doc["engines_used"][0] in text
    assert cli.main(["bench", "rollout", "--rollout-set", "speed=1"]) == 2
    assert cli.main(["bench", "rollout", "--modes", "oracle"]) == 2
    assert cli.main(["bench", "rollout", "--workers", "-1"]) == 2
    assert cli.main(["bench", "rollout", "--gate-sweep"]) == 2   # no survey to sweep
    assert "survey_poses" in capsys.readouterr().err
    assert cli.main(["bench", "rollout", "--bundle", str(tmp_path / "missing.pt")]) == 2


def test_init_from_a_bundle_starts_with_its_outputs(tmp_path, capsys):
    """`train --init-from models/X.pt`: a shipped bundle (folded plane query, fp16 weights) starts a fine-tuning
    run with the bundle's outputs; a bundle of another architecture is refused (exit 2) before any training."""
    import torch

    from cardiac_copilot_ros import cli
    from cardiac_copilot_ros.model.bundle import build_metadata, load_bundle, save_bundle
    from cardiac_copilot_ros.model.policy import GuidanceModel
    from cardiac_copilot_ros.training.config import TrainConfig, make_config
    from cardiac_copilot_ros.training.loop import _init_from, build_model

    torch.manual_seed(5)
    shipped = GuidanceModel(backbone="resnet10", dreamer=False, uncertainty=True).eval()
    shipped.set_action_stats(torch.randn(6), torch.rand(6) * 10 + 1)
    shipped.head.fold_plane_query()
    path = save_bundle(shipped, tmp_path / "shipped.pt", build_metadata(shipped, (32, 32)), weights_dtype="float16")
    cfg = make_config("smoke", backbone="resnet10", uncertainty=True, model="baseline", init_from=str(path))
    assert isinstance(cfg, TrainConfig)
    model = build_model(cfg, np.zeros(6, np.float32), np.ones(6, np.float32)).eval()
    _init_from(model, cfg)
    bundle = load_bundle(path)
    x, p = torch.rand(3, 1, 32, 32), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert float((model.forward_with_scale(x, p) - bundle.forward_with_scale(x, p)).abs().max()) < 1e-3
    assert not model.head.folded and model.head.query.weight.requires_grad
    train = ["--model", "baseline", "--preset", "smoke", "--backbone", "resnet10", "--uncertainty",
             "--sim-subjects", "2", "--sim-val-subjects", "1", "--sim-val-frames-per-plane", "1",
             "--sim-render-sizes", "48", "--sim-items-per-epoch", "32", "--max-steps", "2", "--out-dir", str(tmp_path)]
    assert cli.main(["train", *train, "--run-name", "tuned", "--init-from", str(path)]) == 0
    assert cli.main(["train", *train, "--run-name", "bad", "--backbone", "resnet18", "--init-from", str(path)]) == 2
    assert "a different model" in capsys.readouterr().err
