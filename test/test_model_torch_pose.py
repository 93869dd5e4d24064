"""Differentiable torch pose algebra agrees with pose.py and has finite gradients everywhere."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from cardiac_copilot_ros import pose
from cardiac_copilot_ros.model import torch_pose


def _random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    a = np.empty((n, 6))
    a[:, :3] = rng.uniform(-80, 80, (n, 3))
    a[:, 3] = rng.uniform(-179, 179, n)
    a[:, 4] = rng.uniform(-89, 89, n)
    a[:, 5] = rng.uniform(-179, 179, n)
    return a


def test_matches_numpy_on_random_inputs():
    rng = np.random.default_rng(0)
    a1, a2 = _random_actions(rng, 500), _random_actions(rng, 500)
    t1, t2 = torch.from_numpy(a1), torch.from_numpy(a2)
    np.testing.assert_allclose(torch_pose.action_to_matrix(t1).numpy(), pose.action_to_matrix(a1), atol=1e-12)
    T = pose.action_to_matrix(a1) @ pose.action_to_matrix(a2)
    np.testing.assert_allclose(torch_pose.matrix_to_action(torch.from_numpy(T)).numpy(),
                               pose.matrix_to_action(T), atol=1e-9)
    np.testing.assert_allclose(torch_pose.compose_actions(t1, t2).numpy(), pose.compose_actions(a1, a2),
                               atol=1e-9)
    inv = torch_pose.invert_action(t1).numpy()
    np.testing.assert_allclose(pose.compose_actions(a1, inv), np.zeros_like(a1), atol=1e-9)
    # float32 (what the model uses) agrees to float precision
    c32 = torch_pose.compose_actions(t1.float(), t2.float()).double().numpy()
    ref = pose.compose_actions(a1, a2)
    assert np.abs(c32[:, :3] - ref[:, :3]).max() < 1e-3
    # compare rotations (Euler angles wrap at +-180)
    r32 = pose.euler_to_rotation(c32[:, 3:])
    assert np.abs(r32 - pose.euler_to_rotation(ref[:, 3:])).max() < 1e-4


def test_singularity_values_and_gradients_are_finite():
    for pitch in (90.0, -90.0, 89.9999, 0.0):
        for dtype in (torch.float32, torch.float64):
            a1 = torch.tensor([[1.0, 2.0, 3.0, 10.0, pitch, 20.0]], dtype=dtype, requires_grad=True)
            a2 = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
            out = torch_pose.compose_actions(a1, a2)
            out.sum().backward()
            assert torch.isfinite(out).all()
            assert torch.isfinite(a1.grad).all() and torch.isfinite(a2.grad).all()
            if abs(pitch) == 90.0 and dtype == torch.float64:
                ref = pose.compose_actions(a1.detach().numpy(), a2.detach().numpy())
                assert np.allclose(pose.action_to_matrix(out.detach().numpy()), pose.action_to_matrix(ref),
                                   atol=1e-9)
    # identity rotation: every atan2 branch at a safe point
    a = torch.zeros(4, 6, requires_grad=True)
    torch_pose.compose_actions(a, a).square().sum().backward()
    assert torch.isfinite(a.grad).all()


def test_gradcheck_and_torchscript():
    rng = np.random.default_rng(1)
    a1 = torch.from_numpy(_random_actions(rng, 3)).requires_grad_(True)
    a2 = torch.from_numpy(_random_actions(rng, 3) * 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(torch_pose.compose_actions, (a1, a2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(torch_pose.compose_actions)
    assert torch.allclose(scripted(a1, a2), torch_pose.compose_actions(a1, a2))
