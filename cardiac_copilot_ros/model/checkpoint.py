"""Reading training checkpoints (``torch.save`` files written by :mod:`..training.loop`).

Lives in the model layer so that code below training (``model/export.py``, evaluation) can
read checkpoints without importing the training loop; ``training.loop`` re-exports these names
(``from cardiac_copilot_ros.training.loop import load_checkpoint`` keeps working).

Checkpoints are read with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cardiac_copilot_ros.model.policy import GuidanceModel
from cardiac_copilot_ros.planes import PLANE_NAMES

__all__ = ["find_checkpoint", "load_checkpoint", "model_from_checkpoint"]


def find_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file from a file or a run folder (``prefer`` 'best' -> best.pt, 'latest' -> newest)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint or run folder not found")
    if path.is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step_*.pt"))
    best = path / "best.pt"
    order = [best, *reversed(steps)] if prefer == "best" else [*reversed(steps), best]
    for cand in order:
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{path}: run folder without best.pt or checkpoints/step_*.pt")


def load_checkpoint(path: str | Path, prefer: str = "best") -> dict[str, Any]:
    """A checkpoint (weights_only: no arbitrary pickle) from a file or run folder; errors name the file."""
    path = find_checkpoint(path, prefer)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, dict) or state.get("format") != "cardiac_copilot_checkpoint":
        raise ValueError(f"{path}: not a cardiac_copilot training checkpoint")
    state["path"] = str(path)
    return state


def model_from_checkpoint(state: dict[str, Any]) -> GuidanceModel:
    model = GuidanceModel(**state["model_args"])
    model.load_state_dict(state["model"])
    model.plane_names = list(state.get("planes") or PLANE_NAMES[: model.n_planes])  # old runs: paper planes
    return model.eval()
