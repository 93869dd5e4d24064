"""The standard echocardiographic planes that guidance can target.

Each plane has a stable index (used by the model's plane query and stored in datasets and
model bundles: never reorder, only append), a canonical name (used on topics, in
annotations, file names and JSON) and a display name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Plane:
    """A standard plane."""

    index: int
    name: str
    display_name: str
    description: str


PLANES: tuple[Plane, ...] = (
    Plane(0, "PLAX", "Parasternal long axis",
          "long-axis plane through the LV apex, the mitral valve and the aortic valve"),
    Plane(1, "PSAX-AV", "Parasternal short axis, aortic valve level",
          "short-axis plane through the aortic valve"),
    Plane(2, "PSAX-MV", "Parasternal short axis, mitral valve level",
          "short-axis plane through the mitral valve inside the LV ring"),
)

#: Canonical names in index order.
PLANE_NAMES: tuple[str, ...] = tuple(p.name for p in PLANES)


class UnknownPlaneError(ValueError):
    """Raised for a plane name or index that is not a standard plane."""


def _key(text: str) -> str:
    return re.sub(r"[\s_\-./]+", "", text.strip().upper())


_BY_KEY = {_key(p.name): p for p in PLANES}
_BY_KEY.update({_key(p.display_name): p for p in PLANES})


def parse_plane(value: str | int | Plane) -> Plane:
    """Return the plane for a name in any common spelling, an index, or a Plane.

    Accepts e.g. ``PLAX``, ``plax``, ``psax_av``, ``PSAX-AV``, ``psax-av``, ``psax av``.
    Raises :class:`UnknownPlaneError` listing the valid names otherwise.
    """
    if isinstance(value, Plane):
        return value
    if isinstance(value, (int,)) and not isinstance(value, bool):
        if 0 <= value < len(PLANES):
            return PLANES[value]
        raise UnknownPlaneError(
            f"unknown plane index {value}; valid indices 0..{len(PLANES) - 1} ({', '.join(PLANE_NAMES)})")
    if isinstance(value, str):
        plane = _BY_KEY.get(_key(value))
        if plane is not None:
            return plane
    raise UnknownPlaneError(
        f"unknown plane {value!r}; valid planes: {', '.join(PLANE_NAMES)}")


def plane_index(value: str | int | Plane) -> int:
    """The stable index of a plane given in any accepted form."""
    return parse_plane(value).index
