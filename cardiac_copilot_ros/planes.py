"""The standard echocardiographic views ("planes") that guidance can target.

Views are data: :data:`VIEWS` is the canonical list shipped with the package (the paper's
three parasternal planes first, at their historical indices 0, 1, 2, then the apical,
subcostal and further short-axis views), and users add their own views from a YAML file
(:func:`load_views_file`; the environment variable ``CARDIAC_COPILOT_VIEWS`` names such files,
``os.pathsep``-separated, and ``--views FILE`` of ``dataset build`` / ``import`` sets it).

Each view has a stable index in this registry (built-ins never reorder, only append; user
views come after them in the order registered), a canonical name (used on topics, in
annotations, file names and JSON), a display name and aliases (any common spelling parses:
case, spaces, ``-``, ``_``, ``.``, ``/`` are ignored).

The registry index is *not* the index a model uses: a dataset records the views it contains
(``planes`` in its manifest, in registry order) and a model bundle carries the names of the views
it was trained on (``planes`` in its metadata); the model's plane query is the position in that
list. :data:`PLANES` / :data:`PLANE_NAMES` stay the three paper planes (the simulator's and the
default model's views).

YAML format of a user views file::

    views:
      - name: A4C-RV                 # canonical name (letters, digits, '-', '_', '.')
        display_name: RV-focused apical four-chamber
        aliases: [RVF4C, A4C RV focused]
        description: apical four-chamber plane rotated to show the whole right ventricle
      - name: A4C                    # an existing view: only adds aliases
        aliases: [Vierkammerblick]
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Environment variable naming user views files (YAML), ``os.pathsep``-separated.
VIEWS_ENV = "CARDIAC_COPILOT_VIEWS"


@dataclass(frozen=True)
class Plane:
    """A standard view."""

    index: int
    name: str
    display_name: str
    description: str
    aliases: tuple[str, ...] = ()


#: The paper's three planes (indices 0, 1, 2; the simulator's and the default model's views).
PLANES: tuple[Plane, ...] = (
    Plane(0, "PLAX", "Parasternal long axis",
          "long-axis plane through the LV apex, the mitral valve and the aortic valve", ("PLA", "PLAX LV")),
    Plane(1, "PSAX-AV", "Parasternal short axis, aortic valve level",
          "short-axis plane through the aortic valve", ("SAX-AV", "PSAX-AoV", "PSAX-AO", "PSAX base")),
    Plane(2, "PSAX-MV", "Parasternal short axis, mitral valve level",
          "short-axis plane through the mitral valve inside the LV ring", ("SAX-MV", "PSAX mitral")),
)

#: Canonical names of the paper planes in index order.
PLANE_NAMES: tuple[str, ...] = tuple(p.name for p in PLANES)

#: The canonical views shipped with the package (registry indices 0..len-1).
VIEWS: tuple[Plane, ...] = PLANES + (
    Plane(3, "A4C", "Apical four-chamber",
          "apical plane through both ventricles, both atria, the mitral and tricuspid valves",
          ("AP4", "A4CH", "4CH", "Apical 4 chamber", "Apical four chamber")),
    Plane(4, "A2C", "Apical two-chamber",
          "apical plane through the LV and LA only (anterior and inferior walls)",
          ("AP2", "A2CH", "2CH", "Apical 2 chamber", "Apical two chamber")),
    Plane(5, "A3C", "Apical three-chamber (apical long axis)",
          "apical plane through the LV, LA, mitral valve and LV outflow tract / aortic valve",
          ("ALAX", "APLAX", "AP3", "A3CH", "3CH", "Apical long axis", "Apical 3 chamber")),
    Plane(6, "A5C", "Apical five-chamber",
          "apical four-chamber plane tilted anteriorly to include the LV outflow tract and aortic valve",
          ("AP5", "A5CH", "5CH", "Apical 5 chamber", "Apical five chamber")),
    Plane(7, "SC4C", "Subcostal four-chamber",
          "subcostal plane through the four chambers, the liver in the near field",
          ("S4C", "SUB4C", "SUBC4", "Subcostal 4 chamber", "Subcostal four chamber")),
    Plane(8, "SC-IVC", "Subcostal inferior vena cava",
          "subcostal long-axis plane of the inferior vena cava entering the right atrium",
          ("IVC", "SUBIVC", "SC IVC long axis", "Subcostal IVC")),
    Plane(9, "PSAX-PM", "Parasternal short axis, papillary muscle level",
          "short-axis plane of the LV at the level of the papillary muscles",
          ("SAX-PM", "PSAX-PAP", "PSAX mid", "PSAX papillary")),
    Plane(10, "PSAX-APEX", "Parasternal short axis, apical level",
          "short-axis plane of the LV near the apex",
          ("SAX-APEX", "PSAX-AP", "PSAX apical")),
    Plane(11, "SSN", "Suprasternal notch (aortic arch)",
          "suprasternal long-axis plane of the aortic arch", ("SSN-AA", "Suprasternal", "Aortic arch")),
)

#: Canonical names of the built-in views in index order.
VIEW_NAMES: tuple[str, ...] = tuple(v.name for v in VIEWS)


class UnknownPlaneError(ValueError):
    """Raised for a view name or index that is not a known view."""


class ViewsFileError(ValueError):
    """Raised for an unreadable or malformed user views file (names the file and entry)."""


def plane_key(text: str) -> str:
    """Normalised spelling used to match view names and aliases."""
    return re.sub(r"[\s_\-./]+", "", str(text).strip().upper())


_key = plane_key
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}$")

_lock = threading.RLock()
_views: list[Plane] = list(VIEWS)
_by_key: dict[str, Plane] = {}
_env_loaded: str | None = None


def _index_view(v: Plane) -> None:
    for text in (v.name, v.display_name, *v.aliases):
        k = _key(text)
        if k:
            _by_key.setdefault(k, v)


for _v in VIEWS:
    _index_view(_v)
_BY_KEY = _by_key  # historical name


def _sync_env() -> None:
    """Load the files named by ``CARDIAC_COPILOT_VIEWS`` once (again when it changes)."""
    global _env_loaded
    value = os.environ.get(VIEWS_ENV, "")
    if value == (_env_loaded or ""):
        return
    with _lock:
        _env_loaded = value
        for path in (p for p in value.split(os.pathsep) if p.strip()):
            load_views_file(path)


def register_view(name: str, display_name: str | None = None, aliases: Iterable[str] = (),
                  description: str = "") -> Plane:
    """Add a view (or aliases of an existing one); returns the view. Never reorders."""
    name = str(name).strip()
    aliases = tuple(str(a).strip() for a in aliases if str(a).strip())
    with _lock:
        existing = _by_key.get(_key(name))
        if existing is not None:
            for a in aliases:
                other = _by_key.get(_key(a))
                if other is not None and other.name != existing.name:
                    raise ValueError(f"alias {a!r} of view {existing.name} already names view {other.name}")
            if aliases:
                new = Plane(existing.index, existing.name, existing.display_name, existing.description,
                            existing.aliases + tuple(a for a in aliases if a not in existing.aliases))
                _views[existing.index] = new
                for k, v in list(_by_key.items()):
                    if v is existing:
                        _by_key[k] = new
                _index_view(new)
                return new
            return existing
        if not _NAME_RE.match(name):
            raise ValueError(f"view name {name!r} must be 1-32 letters, digits, '-', '_' or '.'")
        for a in aliases:
            other = _by_key.get(_key(a))
            if other is not None:
                raise ValueError(f"alias {a!r} of new view {name} already names view {other.name}")
        v = Plane(len(_views), name, str(display_name or name), str(description), aliases)
        _views.append(v)
        _index_view(v)
        return v


def load_views_file(path: str | Path) -> list[Plane]:
    """Register the views of a YAML file (format in the module docstring); returns them."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ViewsFileError(f"{path}: cannot read views file ({exc.strerror or exc})") from None
    except YAMLError as exc:
        raise ViewsFileError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    entries = data.get("views") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ViewsFileError(f"{path}: expected a list under 'views:' (see docs/DATA.md, 'Views')")
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ViewsFileError(f"{path}: views[{i}] needs a 'name' (string)")
        unknown = set(e) - {"name", "display_name", "aliases", "description"}
        if unknown:
            raise ViewsFileError(f"{path}: views[{i}] ({e['name']}): unknown keys {sorted(unknown)}")
        aliases = e.get("aliases") or []
        if isinstance(aliases, str):
            aliases = [aliases]
        try:
            out.append(register_view(e["name"], e.get("display_name"), aliases, e.get("description") or ""))
        except ValueError as exc:
            raise ViewsFileError(f"{path}: views[{i}]: {exc}") from None
    return out


def all_views() -> tuple[Plane, ...]:
    """Every known view (built-ins, then user views) in registry order."""
    _sync_env()
    with _lock:
        return tuple(_views)


def view_names() -> tuple[str, ...]:
    """Canonical names of :func:`all_views`."""
    return tuple(v.name for v in all_views())


def parse_plane(value: str | int | Plane) -> Plane:
    """Return the view for a name or alias in any common spelling, a registry index, or a Plane.

    Accepts e.g. ``PLAX``, ``plax``, ``psax_av``, ``PSAX-AV``, ``psax av``, ``A4C``, ``ap4``,
    ``ALAX``. Raises :class:`UnknownPlaneError` listing the valid names otherwise.
    """
    if isinstance(value, Plane):
        return value
    views = all_views()
    if isinstance(value, (int,)) and not isinstance(value, bool):
        if 0 <= value < len(views):
            return views[value]
        raise UnknownPlaneError(
            f"unknown plane index {value}; valid indices 0..{len(views) - 1} "
            f"({', '.join(v.name for v in views)})")
    if isinstance(value, str):
        with _lock:
            plane = _by_key.get(_key(value))
        if plane is not None:
            return plane
    raise UnknownPlaneError(
        f"unknown plane {value!r}; valid planes: {', '.join(v.name for v in views)} "
        f"(add views with a YAML file, see docs/DATA.md)")


def plane_index(value: str | int | Plane) -> int:
    """The stable registry index of a view given in any accepted form."""
    return parse_plane(value).index


def order_views(names: Sequence[str]) -> list[str]:
    """Canonical names of ``names`` (any spelling), deduplicated, in registry order."""
    return [v.name for v in sorted({parse_plane(n) for n in names}, key=lambda v: v.index)]


def match_view(value: str | int, names: Sequence[str]) -> str:
    """The entry of ``names`` (e.g. a model's views) that ``value`` means, or UnknownPlaneError.

    An int is a position in ``names``; a string matches a name of the list in any spelling,
    or any alias of a registered view that is in the list. Names in the list need not be
    registered here (a model trained on another machine's user views still works).
    """
    names = [str(n) for n in names]
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(names):
            return names[value]
        raise UnknownPlaneError(f"plane index {value} is out of range; valid planes: {', '.join(names)}")
    if isinstance(value, str):
        k = _key(value)
        for n in names:
            if _key(n) == k:
                return n
        try:
            canonical = parse_plane(value).name
        except UnknownPlaneError:
            canonical = None
        for n in names:
            if canonical is not None and _key(n) == _key(canonical):
                return n
        raise UnknownPlaneError(f"plane {value!r} is not one of the valid planes: {', '.join(names)}")
    raise UnknownPlaneError(f"plane {value!r} is not one of the valid planes: {', '.join(names)}")


def use_views_files(paths: Sequence[str | Path] | None) -> None:
    """Register user views files for this process and its children (``--views FILE``).

    The files are appended to ``CARDIAC_COPILOT_VIEWS`` so that worker processes see the
    same registry; :class:`ViewsFileError` for a bad file.
    """
    paths = [str(Path(p)) for p in (paths or []) if str(p).strip()]
    if not paths:
        return
    global _env_loaded
    _sync_env()                 # the files already named by the environment
    with _lock:
        for p in paths:
            load_views_file(p)  # fail here, with the file named, before any worker starts
        old = [p for p in os.environ.get(VIEWS_ENV, "").split(os.pathsep) if p.strip()]
        value = os.pathsep.join([*old, *[p for p in paths if p not in old]])
        os.environ[VIEWS_ENV] = value
        _env_loaded = value
