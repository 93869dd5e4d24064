"""Parametric heart phantoms ("subjects") in a chest, with their standard-plane probe poses.

Frames (see docs/SIMULATOR.md):

* **heart frame** (mm): origin at the centre of the mitral annulus plane; ``e1`` the LV long
  axis from base to apex, ``e2`` anterior (towards the chest wall) inside the PLAX plane,
  ``e3 = e1 x e2``. The anatomy is built here from primitives (ellipsoids, capsules, shells).
* **base frame** (``panda_link0``, mm): the robot base. Each subject places its heart (and its
  chest wall, ribs and acoustic window) somewhere in front of the arm; probe poses are given
  in this frame, like the arm reports them.

A subject is made from a seed: size, shape, orientation and position vary between subjects in
ranges like real adults (:data:`PARAMETER_RANGES`), so other seeds are unseen subjects.
Everything here is numpy, deterministic, and free of rclpy.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import numpy as np

from ..planes import PLANE_NAMES, Plane, parse_plane
from ..pose import euler_to_rotation, invert

#: The views the simulator has target poses for: the paper's three parasternal planes and the
#: apical four-chamber view (apical window). Simulated data defaults to the paper's three.
SIM_VIEWS: tuple[str, ...] = (*PLANE_NAMES, "A4C")


def sim_view(plane: str | int | Plane) -> str:
    """Canonical name of a simulated view; ValueError naming the simulated views otherwise."""
    name = parse_plane(plane).name
    if name not in SIM_VIEWS:
        raise ValueError(f"the simulator has no {name} view; simulated views: {', '.join(SIM_VIEWS)}")
    return name


class Label(enum.IntEnum):
    """Ground-truth label ids of the label maps (:meth:`Renderer.labels`)."""

    OUTSIDE_SECTOR = 0  #: pixel outside the imaging sector
    BACKGROUND = 1      #: soft tissue outside the heart (mediastinum, epicardial fat), or air
    LV = 2              #: left-ventricular cavity (incl. the LV outflow tract)
    RV = 3              #: right-ventricular cavity (incl. the RV outflow tract)
    LA = 4              #: left-atrial cavity
    RA = 5              #: right-atrial cavity
    MYOCARDIUM = 6      #: ventricular walls and septum
    AORTA = 7           #: lumen of the aortic root and ascending aorta
    MITRAL_VALVE = 8    #: mitral annulus and leaflets
    AORTIC_VALVE = 9    #: aortic annulus and the three cusps
    PERICARDIUM = 10    #: pericardial sac (bright layer around the heart)
    BLOOD = 11          #: other blood pool (descending aorta)
    WALL = 12           #: atrial and aortic walls (connective tissue)
    CHEST_WALL = 13     #: skin, fat and intercostal muscle under the probe
    RIB = 14            #: rib (bright surface, acoustic shadow behind it)


#: Mean backscatter amplitude (linear, arbitrary units) per label, before speckle.
ECHOGENICITY: dict[Label, float] = {
    Label.OUTSIDE_SECTOR: 0.0,
    Label.BACKGROUND: 0.30,
    Label.LV: 0.012, Label.RV: 0.012, Label.LA: 0.012, Label.RA: 0.012,
    Label.AORTA: 0.012, Label.BLOOD: 0.012,
    Label.MYOCARDIUM: 0.22,
    Label.MITRAL_VALVE: 0.9,
    Label.AORTIC_VALVE: 0.9,
    Label.PERICARDIUM: 1.0,
    Label.WALL: 0.45,
    Label.CHEST_WALL: 0.35,
    Label.RIB: 1.6,
}

#: Documented ranges of the subject parameters (uniform draws per seed).
PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "scale": (0.88, 1.14),              # overall heart size (LV length ~ 77-100 mm)
    "shape_jitter": (-0.08, 0.08),       # per-structure radius factor
    "lv_wall_mm": (8.0, 12.0),           # LV wall / septum thickness
    "heart_rot_deg": (-10.0, 10.0),      # heart orientation vs the window, each axis
    "window_depth_mm": (75.0, 95.0),     # skin -> LV long axis, along e2 at the window
    "window_x_mm": (-6.0, 10.0),         # window position along the LV axis (heart frame)
    "chest_wall_mm": (14.0, 26.0),       # skin to the inner chest wall
    "rib_spacing_mm": (25.0, 32.0),      # rib centre to centre
    "rib_radius_mm": (4.0, 5.5),
    "rib_angle_deg": (45.0, 75.0),       # ribs vs the PLAX image's lateral axis, in the skin plane
    "body_tilt_deg": (10.0, 35.0),       # left-lateral decubitus tilt of the chest
    "body_yaw_deg": (-15.0, 15.0),       # patient axis vs the base frame's x axis
    "window_base_x_mm": (470.0, 530.0),  # window position in panda_link0
    "window_base_y_mm": (-30.0, 30.0),
    "window_base_z_mm": (160.0, 200.0),
    "heart_rate_bpm": (55.0, 85.0),
    "beat_amplitude": (0.05, 0.10),      # systolic shrink of the chambers (fraction)
}

#: Voxel size of the precomputed label / echogenicity volumes (mm).
VOXEL_MM = 1.0
#: Heart-frame box of the volumes (mm): x, y, z ranges (before scaling by the subject size).
_BOX = ((-85.0, 115.0), (-75.0, 72.0), (-75.0, 60.0))


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(origin: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, origin
    return T


@dataclass
class Volume:
    """Precomputed voxel volumes of a subject's heart, in the heart frame."""

    origin_mm: np.ndarray  #: (3,) heart-frame position of voxel (0, 0, 0)
    spacing_mm: float
    labels: np.ndarray     #: (nx, ny, nz) uint8 Label ids
    echo: np.ndarray       #: (nx, ny, nz) float32 mean backscatter

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]


@dataclass
class Subject:
    """One simulated subject: anatomy parameters, placement, target probe poses.

    Build with :func:`make_subject`. Immutable after construction; the voxel volume is built
    lazily (thread-safe) on first use by a renderer.
    """

    subject_id: str
    seed: int
    params: dict[str, float]
    anatomy: dict[str, np.ndarray | float]
    T_base_heart: np.ndarray          #: (4, 4) heart frame -> base frame, mm
    window_heart: dict[str, np.ndarray]  #: skin point, outward normal, rib axes (heart frame)
    _targets_heart: dict[str, np.ndarray] = field(default_factory=dict)
    _volume: Volume | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def target_pose(self, plane: str | int | Plane) -> np.ndarray:
        """Target probe pose (4, 4) of a standard plane in the base frame, translation mm."""
        return self.T_base_heart @ self._targets_heart[sim_view(plane)]

    def target_pose_heart(self, plane: str | int | Plane) -> np.ndarray:
        """Target probe pose in the heart frame (mm)."""
        return self._targets_heart[sim_view(plane)].copy()

    @property
    def T_heart_base(self) -> np.ndarray:  # noqa: N802 (math name: heart <- base)
        return invert(self.T_base_heart)

    def volume(self) -> Volume:
        """The label / echogenicity voxel volume (built once, ~0.5 s, then cached)."""
        with self._lock:
            if self._volume is None:
                self._volume = build_volume(self)
            return self._volume

    def beat(self, t_s: float) -> float:
        """Chamber scale factor at time ``t_s`` (1 at end-diastole, < 1 in systole)."""
        period = 60.0 / self.params["heart_rate_bpm"]
        phase = (t_s / period) % 1.0
        # systole: smooth contraction over the first 35% of the cycle, relaxation after
        s = np.sin(np.pi * phase / 0.35) ** 2 if phase < 0.35 else 0.0
        return float(1.0 - self.params["beat_amplitude"] * s)


def _draw(rng: np.random.Generator, name: str) -> float:
    lo, hi = PARAMETER_RANGES[name]
    return float(rng.uniform(lo, hi))


def make_subject(seed: int) -> Subject:
    """A subject from a seed (any int >= 0). Same seed -> identical subject."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"subject seed must be >= 0, got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence([0x5EED, seed]))
    p = {name: _draw(rng, name) for name in PARAMETER_RANGES if name != "shape_jitter"}
    s = p["scale"]

    def j() -> float:  # per-structure shape factor
        return s * (1.0 + _draw(rng, "shape_jitter"))

    a: dict[str, np.ndarray | float] = {}
    # LV: prolate ellipsoid truncated at the base plane x = 0
    ja = j()
    a["lv_center"] = np.array([38.0, 0.0, 0.0]) * s
    a["lv_radii"] = np.array([48.0 * s, 24.5 * ja, 24.5 * ja])
    a["lv_wall"] = p["lv_wall_mm"] * (0.5 + 0.5 * s)
    # LVOT: capsule from the LV base towards the aortic valve
    a["av_center"] = np.array([-5.0, 17.0, 0.0]) * s
    a["lvot_a"] = np.array([12.0, 8.0, 0.0]) * s
    a["ao_dir"] = _unit(np.array([-1.0, 0.45, 0.1]) + rng.normal(0.0, 0.06, 3))
    a["ao_radius"] = 12.5 * j()
    a["ao_length"] = 55.0 * s
    # mitral valve: annulus ring at x = 0 and a funnel of leaflets into the LV
    a["mv_center"] = np.array([0.0, -3.0, 0.0]) * s
    a["mv_radius"] = 13.5 * j()
    a["mv_tip_x"] = 17.0 * s
    a["mv_tip_radius"] = 9.0 * s
    # atria, RV (+ outflow tract), descending aorta
    a["la_center"] = np.array([-21.0, -7.0, 0.0]) * s
    a["la_radii"] = np.array([24.0, 20.0, 22.0]) * np.array([j(), j(), j()])
    a["ra_center"] = np.array([-22.0, 0.0, -34.0]) * s
    a["ra_radii"] = np.array([22.0, 20.0, 19.0]) * np.array([j(), j(), j()])
    a["rv_center"] = np.array([35.0, 40.0, -6.0]) * s
    a["rv_radii"] = np.array([45.0, 15.0, 30.0]) * np.array([s, j(), j()])
    a["rvot_center"] = np.array([-10.0, 37.0, 6.0]) * s
    a["rvot_radii"] = np.array([20.0, 13.0, 17.0]) * j()
    a["dao_point"] = np.array([-14.0, -44.0, 0.0]) * s
    a["dao_dir"] = _unit(np.array([0.35, 0.0, 1.0]))
    a["dao_radius"] = 10.0 * j()

    # acoustic window on the skin, in the heart frame (the PLAX plane z = 0 contains it)
    W = np.array([p["window_x_mm"], p["window_depth_mm"], 0.0])
    n_skin = _unit(np.array([0.15, 1.0, 0.1]) + rng.normal(0.0, 0.05, 3))  # outward
    # small heart rotation about the window (orientation varies between subjects)
    R_h = euler_to_rotation(np.array([_draw(rng, "heart_rot_deg") for _ in range(3)]))
    # rotate the skin normal instead of the heart: equivalent, keeps the heart frame canonical
    n_skin = R_h @ n_skin
    # rib axes: in the skin plane, at an angle to the PLAX lateral axis (-e1 projected)
    lat = -np.array([1.0, 0.0, 0.0])
    lat = _unit(lat - (lat @ n_skin) * n_skin)
    perp = np.cross(n_skin, lat)
    ang = np.deg2rad(p["rib_angle_deg"])
    rib_dir = np.cos(ang) * lat + np.sin(ang) * perp
    rib_u = np.cross(n_skin, rib_dir)  # across the ribs, in the skin plane
    window = {"point": W, "normal": n_skin, "rib_dir": rib_dir, "rib_u": rib_u,
              "chest_wall_mm": np.float64(p["chest_wall_mm"]),
              "rib_spacing_mm": np.float64(p["rib_spacing_mm"]),
              "rib_radius_mm": np.float64(p["rib_radius_mm"]),
              "rib_depth_mm": np.float64(p["chest_wall_mm"] * 0.45)}

    targets = _target_poses(a, window)

    # place the window in the base frame: patient supine with a left-lateral tilt
    yaw, tilt = np.deg2rad(p["body_yaw_deg"]), np.deg2rad(p["body_tilt_deg"])
    n_base = np.array([np.sin(tilt) * np.sin(yaw), -np.sin(tilt) * np.cos(yaw), np.cos(tilt)])
    head_base = _unit(np.array([np.cos(yaw), np.sin(yaw), 0.0]))
    head_base = _unit(head_base - (head_base @ n_base) * n_base)
    # window frame in the heart frame: z = outward normal, x = towards the base (-e1 projected)
    Wz = n_skin
    Wx = _unit(np.array([-1.0, 0.0, 0.0]) - (np.array([-1.0, 0.0, 0.0]) @ Wz) * Wz)
    T_heart_win = _frame(W, Wx, np.cross(Wz, Wx), Wz)
    P = np.array([p["window_base_x_mm"], p["window_base_y_mm"], p["window_base_z_mm"]])
    T_base_win = _frame(P, head_base, np.cross(n_base, head_base), n_base)
    T_base_heart = T_base_win @ invert(T_heart_win)

    return Subject(subject_id=f"sim{seed:04d}", seed=seed, params=p, anatomy=a,
                   T_base_heart=T_base_heart, window_heart=window, _targets_heart=targets)


def _probe_frame(origin: np.ndarray, focus: np.ndarray, elevation_hint: np.ndarray) -> np.ndarray:
    """Probe pose with its beam axis z from ``origin`` through ``focus`` and elevation y along
    the part of ``elevation_hint`` normal to the beam (the image plane is the probe x-z plane)."""
    z = _unit(focus - origin)
    y = _unit(elevation_hint - (elevation_hint @ z) * z)
    x = np.cross(y, z)
    return _frame(origin, x, y, z)


def _target_poses(a: dict, window: dict) -> dict[str, np.ndarray]:
    W, n = window["point"], window["normal"]
    e1 = np.array([1.0, 0.0, 0.0])
    out = {}
    # PLAX: the plane z = 0 (LV apex, mitral and aortic valve), beam through the LV base;
    # elevation -e3 so that the image shows the apex on the left, the aorta on the right.
    focus = np.array([10.0, -6.0, 0.0]) * float(a["lv_center"][0] / 38.0)
    out["PLAX"] = _probe_frame(W, focus, np.array([0.0, 0.0, -1.0]))
    # PSAX-AV: beam through the aortic valve, image plane normal ~ the aortic axis
    out["PSAX-AV"] = _probe_frame(W, np.asarray(a["av_center"]), -np.asarray(a["ao_dir"]))
    # PSAX-MV: probe slightly lower on the skin (same interspace), plane normal ~ the LV long axis,
    # through the mitral leaflets half-way to their tips
    shift = e1 - (e1 @ n) * n
    W_mv = W + 4.0 * _unit(shift)
    mv_focus = np.asarray(a["mv_center"]) + np.array([0.55 * float(a["mv_tip_x"]), 0.0, 0.0])
    out["PSAX-MV"] = _probe_frame(W_mv, mv_focus, e1)
    # A4C (apical window): probe on the skin beyond the LV apex, beam back along the long axis
    # towards the atria; the image plane contains e1 and is turned about it (normal n at 75 deg
    # from e2 towards e3) and shifted -18 mm (scaled) along n, so it cuts the LV, the RV (beside
    # the septum) and both atria but not the aorta (searched on the phantom: each chamber
    # >= ~300 mm^2, no aortic root, i.e. a four- not a five-chamber view).
    # No chest wall or ribs are drawn at this window (the chest model is the parasternal one).
    sc = float(a["lv_center"][0] / 38.0)
    th = np.deg2rad(75.0)
    n_a4c = np.array([0.0, np.cos(th), np.sin(th)])
    apex_x = float(a["lv_center"][0] + a["lv_radii"][0] + a["lv_wall"])
    W_ap = np.array([apex_x + 22.0, 0.0, 0.0]) - 18.0 * sc * n_a4c
    focus_ap = np.array([-10.0 * sc, 0.0, 0.0]) - 18.0 * sc * n_a4c
    out["A4C"] = _probe_frame(W_ap, focus_ap, -n_a4c)
    assert tuple(out) == SIM_VIEWS
    return out


# ---------------------------------------------------------------------------------------
# Voxel volume
# ---------------------------------------------------------------------------------------


class _Painter:
    """Paints labels into sub-boxes of a voxel grid (only where a primitive can be)."""

    def __init__(self, origin: np.ndarray, spacing: float, shape: tuple[int, int, int]) -> None:
        self.origin, self.spacing, self.shape = origin, spacing, shape
        self.labels = np.full(shape, Label.BACKGROUND, dtype=np.uint8)
        self.axes = [origin[k] + spacing * np.arange(shape[k]) for k in range(3)]

    def _sub(self, lo: np.ndarray, hi: np.ndarray):
        sl = []
        for k in range(3):
            i0 = int(np.clip(np.floor((lo[k] - self.origin[k]) / self.spacing), 0, self.shape[k]))
            i1 = int(np.clip(np.ceil((hi[k] - self.origin[k]) / self.spacing) + 1, 0, self.shape[k]))
            sl.append(slice(i0, i1))
        X = self.axes[0][sl[0]][:, None, None]
        Y = self.axes[1][sl[1]][None, :, None]
        Z = self.axes[2][sl[2]][None, None, :]
        return tuple(sl), X, Y, Z

    def paint(self, lo, hi, fn, label: Label, where: tuple[Label, ...] | None = None) -> None:
        sl, X, Y, Z = self._sub(np.asarray(lo), np.asarray(hi))
        if any(s.stop <= s.start for s in sl):
            return
        mask = fn(X, Y, Z)
        view = self.labels[sl]
        if where is not None:
            mask = mask & np.isin(view, np.array(where, dtype=np.uint8))
        view[mask] = label

    def ellipsoid(self, c, r, label: Label, xmin: float | None = None, where=None) -> None:
        c, r = np.asarray(c, float), np.asarray(r, float)

        def fn(X, Y, Z):
            m = ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1.0
            return m & (X >= xmin) if xmin is not None else m
        self.paint(c - r, c + r, fn, label, where)

    def capsule(self, a, b, radius: float, label: Label, where=None) -> None:
        a, b = np.asarray(a, float), np.asarray(b, float)
        ab = b - a
        L2 = max(float(ab @ ab), 1e-9)

        def fn(X, Y, Z):
            t = np.clip(((X - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (Z - a[2]) * ab[2]) / L2, 0, 1)
            d2 = (X - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (Z - a[2] - t * ab[2]) ** 2
            return d2 <= radius * radius
        lo = np.minimum(a, b) - radius
        hi = np.maximum(a, b) + radius
        self.paint(lo, hi, fn, label, where)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Box dilation of a 3-D bool mask by ``r`` voxels (separable, numpy only)."""
    out = mask.copy()
    for axis in range(3):
        src = out.copy()
        for k in range(1, r + 1):
            sl_a = [slice(None)] * 3
            sl_b = [slice(None)] * 3
            sl_a[axis], sl_b[axis] = slice(k, None), slice(None, -k)
            out[tuple(sl_a)] |= src[tuple(sl_b)]
            out[tuple(sl_b)] |= src[tuple(sl_a)]
    return out


def build_volume(subject: Subject, spacing_mm: float = VOXEL_MM) -> Volume:
    """Rasterise the subject's heart into label and echogenicity volumes (heart frame)."""
    a = subject.anatomy
    s = subject.params["scale"]
    lo = np.array([b[0] for b in _BOX]) * max(s, 1.0)
    hi = np.array([b[1] for b in _BOX]) * max(s, 1.0)
    shape = tuple(int(np.ceil((hi[k] - lo[k]) / spacing_mm)) + 1 for k in range(3))
    P = _Painter(lo, spacing_mm, shape)
    L = Label
    wall = 2.5

    # descending aorta (behind the LA), right atrium, left atrium: wall then cavity
    d0 = np.asarray(a["dao_point"]) - 70.0 * np.asarray(a["dao_dir"])
    d1 = np.asarray(a["dao_point"]) + 70.0 * np.asarray(a["dao_dir"])
    P.capsule(d0, d1, float(a["dao_radius"]) + wall, L.WALL)
    P.capsule(d0, d1, float(a["dao_radius"]), L.BLOOD)
    P.ellipsoid(a["ra_center"], np.asarray(a["ra_radii"]) + wall, L.WALL)
    P.ellipsoid(a["ra_center"], a["ra_radii"], L.RA)
    P.ellipsoid(a["la_center"], np.asarray(a["la_radii"]) + wall, L.WALL)
    P.ellipsoid(a["la_center"], a["la_radii"], L.LA)
    # RV body and outflow tract
    rv_wall = 3.5
    P.ellipsoid(a["rv_center"], np.asarray(a["rv_radii"]) + rv_wall, L.MYOCARDIUM)
    P.ellipsoid(a["rvot_center"], np.asarray(a["rvot_radii"]) + rv_wall, L.MYOCARDIUM)
    P.ellipsoid(a["rv_center"], a["rv_radii"], L.RV)
    P.ellipsoid(a["rvot_center"], a["rvot_radii"], L.RV)
    # LV myocardium and cavity (truncated at the base plane x = 0), LVOT
    lv_c, lv_r, lv_w = np.asarray(a["lv_center"]), np.asarray(a["lv_radii"]), float(a["lv_wall"])
    P.ellipsoid(lv_c, lv_r + lv_w, L.MYOCARDIUM, xmin=-2.0)
    av = np.asarray(a["av_center"])
    ao_r = float(a["ao_radius"])
    P.capsule(a["lvot_a"], av, ao_r * 0.8 + lv_w * 0.6, L.MYOCARDIUM, where=(L.BACKGROUND, L.RV, L.LA))
    P.ellipsoid(lv_c, lv_r, L.LV, xmin=0.0)
    P.capsule(a["lvot_a"], av, ao_r * 0.8, L.LV)
    # aortic root (sinus bulge) and ascending aorta: wall then lumen
    d = np.asarray(a["ao_dir"])
    ao_end = av + float(a["ao_length"]) * d
    sinus = av + 0.6 * ao_r * d
    P.capsule(av, ao_end, ao_r + wall, L.WALL)
    P.capsule(sinus, sinus, ao_r * 1.25 + wall, L.WALL)
    P.capsule(av, ao_end, ao_r, L.AORTA)
    P.capsule(sinus, sinus, ao_r * 1.25, L.AORTA)

    # aortic valve: annulus ring and three closed cusps in the valve plane (Mercedes sign)
    u = _unit(np.cross(d, np.array([0.0, 0.0, 1.0])))
    v = np.cross(d, u)

    def av_fn(X, Y, Z):
        rx, ry, rz = X - av[0], Y - av[1], Z - av[2]
        ax = rx * d[0] + ry * d[1] + rz * d[2]
        pu = rx * u[0] + ry * u[1] + rz * u[2]
        pv = rx * v[0] + ry * v[1] + rz * v[2]
        rad = np.sqrt(pu * pu + pv * pv)
        in_plane = np.abs(ax - 1.0) <= 1.6
        ring = in_plane & (np.abs(rad - ao_r) <= 2.0)
        cusps = np.zeros(np.broadcast_shapes(X.shape, Y.shape, Z.shape), dtype=bool)
        for k in range(3):
            ang = np.pi / 2 + k * 2 * np.pi / 3
            cu, cv = np.cos(ang), np.sin(ang)
            along = pu * cu + pv * cv
            across = np.abs(-pu * cv + pv * cu)
            cusps |= (along >= 0) & (along <= ao_r) & (across <= 1.3)
        return ring | (in_plane & cusps & (rad <= ao_r))
    P.paint(av - ao_r - 4, av + ao_r + 4, av_fn, L.AORTIC_VALVE)

    # mitral valve: annulus ring in the plane x = 0, leaflet funnel towards the tips
    mc, mr = np.asarray(a["mv_center"]), float(a["mv_radius"])
    tip_x, tip_r = float(a["mv_tip_x"]), float(a["mv_tip_radius"])

    def mv_fn(X, Y, Z):
        rad = np.sqrt((Y - mc[1]) ** 2 + (Z - mc[2]) ** 2)
        ring = (np.abs(X - mc[0]) <= 2.0) & (np.abs(rad - mr) <= 2.2)
        t = (X - mc[0]) / tip_x
        cone_r = mr + (tip_r - mr) * t
        funnel = (t >= 0) & (t <= 1) & (np.abs(rad - cone_r) <= 1.4)
        return ring | funnel
    P.paint(mc - np.array([3, mr + 4, mr + 4]), mc + np.array([tip_x + 2, mr + 4, mr + 4]),
            mv_fn, L.MITRAL_VALVE)

    # pericardium: a bright sac 1-4 voxels outside the heart
    heart = P.labels != L.BACKGROUND
    peri = _dilate(heart, 4) & ~_dilate(heart, 1)
    P.labels[peri] = L.PERICARDIUM
    # keep the box border background, so lookups clipped to the border read tissue
    lab = P.labels
    lab[[0, -1], :, :] = L.BACKGROUND
    lab[:, [0, -1], :] = L.BACKGROUND
    lab[:, :, [0, -1]] = L.BACKGROUND

    lut = np.array([ECHOGENICITY[Label(i)] for i in range(len(Label))], dtype=np.float32)
    return Volume(origin_mm=lo.astype(np.float64), spacing_mm=float(spacing_mm),
                  labels=lab, echo=lut[lab])
