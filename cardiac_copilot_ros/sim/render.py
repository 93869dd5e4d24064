"""B-mode-like phased-array sector images and label maps of a subject at any probe pose.

The image is formed in the polar (depth x beam) domain, then scan-converted:

1. sample points along each beam of the sector (probe frame: x lateral, z along the beam)
   are moved into the heart frame with the probe pose;
2. mean echogenicity: trilinear lookup in the subject's precomputed voxel volume
   (optionally warped by the heartbeat), chest wall and ribs evaluated analytically;
3. speckle fixed to the anatomy: a random 3-D tile indexed by heart-frame position, so the
   same pose gives the same image and nearby poses give similar images;
4. rib shadows (nothing behind a rib), depth attenuation, blur that grows with depth (fixed
   angular beam width plus a depth-weighted extra blur), log compression;
5. scan conversion to a square-pixel (H, W) image with the apex at the top centre; pixels
   outside the sector are 0.

Image columns follow the probe's x axis (left to right), rows follow depth (z). A Renderer
holds only read-only arrays after construction, so one instance may be used from several
threads at once. numpy + OpenCV; about 3-6 ms per 224 x 224 frame on one core.
"""

from __future__ import annotations

import cv2
import numpy as np

from .phantom import Label, Subject

#: Residual attenuation after time-gain compensation (per mm of depth, amplitude).
ATTENUATION_PER_MM = 0.0055
#: Displayed dynamic range (dB) and gain (dB) of the log compression.
DYNAMIC_RANGE_DB = 50.0
GAIN_DB = -6.0
#: Speckle tile: voxel size (mm) and side (voxels); period = side x size.
SPECKLE_MM = 0.6
SPECKLE_SIDE = 128


def _sizes(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


class Renderer:
    """Render sector images and label maps of one subject.

    Args:
        subject: the phantom (:func:`~cardiac_copilot_ros.sim.phantom.make_subject`).
        size: output (H, W) in pixels, or one int for a square image.
        depth_mm: imaging depth.
        sector_deg: full sector opening angle.
        heartbeat: chambers contract over the cardiac cycle (images depend on ``t_s``).
    """

    def __init__(self, subject: Subject, size: int | tuple[int, int] = (224, 224),
                 depth_mm: float = 160.0, sector_deg: float = 80.0, heartbeat: bool = False) -> None:
        H, W = _sizes(size)
        if not (16 <= H <= 4096 and 16 <= W <= 4096):
            raise ValueError(f"image size must be 16..4096 px per side, got {W} x {H}")
        if not 20.0 <= depth_mm <= 400.0:
            raise ValueError(f"depth_mm must be in [20, 400], got {depth_mm}")
        if not 10.0 <= sector_deg <= 150.0:
            raise ValueError(f"sector_deg must be in [10, 150], got {sector_deg}")
        self.subject = subject
        self.size = (H, W)
        self.depth_mm = float(depth_mm)
        self.sector_deg = float(sector_deg)
        self.heartbeat = bool(heartbeat)
        self._vol = subject.volume()
        half = np.deg2rad(sector_deg) / 2.0
        width_mm = 2.0 * depth_mm * np.sin(min(half, np.pi / 2))
        #: square pixel size (mm) of the output image
        self.pixel_mm = float(max(depth_mm / H, width_mm / W))

        # polar sample grid: rows = depth samples, columns = beams
        n_r = int(np.clip(round(depth_mm / self.pixel_mm), 16, 2048))
        n_b = int(np.clip(round(W * 0.6), 24, 1024))
        self._n_r, self._n_b = n_r, n_b
        dr = depth_mm / n_r
        dth = 2 * half / n_b
        r = (np.arange(n_r) + 0.5) * dr
        th = -half + (np.arange(n_b) + 0.5) * dth
        R, TH = np.meshgrid(r, th, indexing="ij")
        self._polar_pts = np.stack([R * np.sin(TH), np.zeros_like(R), R * np.cos(TH)],
                                   axis=-1).reshape(-1, 3).astype(np.float32)
        self._att = np.exp(-ATTENUATION_PER_MM * r).astype(np.float32)[:, None]
        self._depth_w = (r / depth_mm).astype(np.float32)[:, None]
        self._surface_rows = max(1, int(round(1.5 / dr)))

        # scan conversion maps (output pixel -> polar sample coordinates)
        cols = (np.arange(W) + 0.5 - W / 2.0) * self.pixel_mm
        rows = (np.arange(H) + 0.5) * self.pixel_mm
        Z, X = np.meshgrid(rows, cols, indexing="ij")
        rr = np.hypot(X, Z)
        tt = np.arctan2(X, Z)
        inside = (rr <= depth_mm) & (np.abs(tt) <= half)
        self.sector_mask = inside  #: (H, W) bool: pixels inside the sector
        map_x = np.where(inside, (tt + half) / dth - 0.5, -10.0).astype(np.float32)
        map_y = np.where(inside, rr / dr - 0.5, -10.0).astype(np.float32)
        self._map1, self._map2 = cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)
        self._pix_idx = np.flatnonzero(inside)
        self._pix_pts = np.stack([X.ravel()[self._pix_idx], np.zeros(self._pix_idx.size),
                                  Z.ravel()[self._pix_idx]], axis=-1).astype(np.float32)

        # speckle tile, fixed to the subject's anatomy
        rng = np.random.default_rng(np.random.SeedSequence([0x5BEC, subject.seed]))
        tile = rng.rayleigh(np.sqrt(2.0 / np.pi), size=(SPECKLE_SIDE,) * 3).astype(np.float32)
        self._speckle = tile.ravel()

        v = self._vol
        self._echo_flat = v.echo.ravel()
        self._label_flat = v.labels.ravel()
        self._vshape = np.array(v.shape, dtype=np.int64)
        self._vorigin = v.origin_mm.astype(np.float32)
        self._vinv = np.float32(1.0 / v.spacing_mm)
        sy, sz = int(v.shape[1]), int(v.shape[2])
        self._strides = np.array([sy * sz, sz, 1], dtype=np.int64)
        self._corner = np.array([0, 1, sz, sz + 1, sy * sz, sy * sz + 1, sy * sz + sz, sy * sz + sz + 1],
                                dtype=np.int64)
        w = subject.window_heart
        self._win = {k: np.asarray(val, dtype=np.float32) for k, val in w.items()}
        self._lv_center = np.asarray(subject.anatomy["lv_center"], dtype=np.float32)
        self._blur_small = (3, 3)
        self._blur_large = (max(3, 2 * int(round(n_b / 64)) + 1), 3)

    # -------------------------------------------------------------------------------------

    def _to_heart(self, T_probe_mm: np.ndarray, pts: np.ndarray) -> np.ndarray:
        T = np.asarray(T_probe_mm, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"probe pose must be a finite (4, 4) matrix, got shape {T.shape}")
        M = (self.subject.T_heart_base @ T).astype(np.float32)
        return pts @ M[:3, :3].T + M[:3, 3]

    def _warp(self, p: np.ndarray, t_s: float) -> np.ndarray:
        """Heartbeat: sample further from the LV centre in systole (chambers look smaller)."""
        if not self.heartbeat:
            return p
        b = self.subject.beat(t_s)
        if b >= 0.9999:
            return p
        d = p - self._lv_center
        w = np.exp(-np.einsum("ij,ij->i", d, d) / np.float32(2 * 60.0 ** 2))
        return p + d * ((1.0 / b - 1.0) * w)[:, None].astype(np.float32)

    def _chest(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Depth below the skin, chest-wall mask and rib mask (analytic, heart frame)."""
        w = self._win
        rel = p - w["point"]
        dep = -(rel @ w["normal"])
        u = rel @ w["rib_u"]
        sp = w["rib_spacing_mm"]
        m = u / sp - 0.5
        du = (m - np.round(m)) * sp
        dd = dep - w["rib_depth_mm"]
        rib = du * du + dd * dd <= w["rib_radius_mm"] ** 2
        chest = dep < w["chest_wall_mm"]
        return dep, chest, rib

    def _voxel(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = (p - self._vorigin) * self._vinv
        hi = (self._vshape - 2).astype(np.float32)
        g = np.clip(g, 0.0, hi)
        i0 = g.astype(np.int64)
        return i0, g - i0

    def _echo(self, p: np.ndarray) -> np.ndarray:
        i0, f = self._voxel(p)
        base = i0 @ self._strides
        e = self._echo_flat
        fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
        c = self._corner
        c00 = e[base + c[0]] * (1 - fz) + e[base + c[1]] * fz
        c01 = e[base + c[2]] * (1 - fz) + e[base + c[3]] * fz
        c10 = e[base + c[4]] * (1 - fz) + e[base + c[5]] * fz
        c11 = e[base + c[6]] * (1 - fz) + e[base + c[7]] * fz
        c0 = c00 * (1 - fy) + c01 * fy
        c1 = c10 * (1 - fy) + c11 * fy
        return c0 * (1 - fx) + c1 * fx

    def _speckle_at(self, p: np.ndarray) -> np.ndarray:
        """Trilinear lookup in the periodic speckle tile (continuous in the pose)."""
        g = p * np.float32(1.0 / SPECKLE_MM)
        g0 = np.floor(g)
        f = g - g0
        k = g0.astype(np.int64)
        n, m = SPECKLE_SIDE, SPECKLE_SIDE - 1
        x0, y0, z0 = k[:, 0] & m, k[:, 1] & m, k[:, 2] & m
        x1, y1, z1 = (x0 + 1) & m, (y0 + 1) & m, (z0 + 1) & m
        sp = self._speckle
        fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
        a0, a1 = x0 * n * n, x1 * n * n
        b0, b1 = y0 * n, y1 * n
        c00 = sp[a0 + b0 + z0] * (1 - fz) + sp[a0 + b0 + z1] * fz
        c01 = sp[a0 + b1 + z0] * (1 - fz) + sp[a0 + b1 + z1] * fz
        c10 = sp[a1 + b0 + z0] * (1 - fz) + sp[a1 + b0 + z1] * fz
        c11 = sp[a1 + b1 + z0] * (1 - fz) + sp[a1 + b1 + z1] * fz
        return (c00 * (1 - fy) + c01 * fy) * (1 - fx) + (c10 * (1 - fy) + c11 * fy) * fx

    # -------------------------------------------------------------------------------------

    def render(self, T_probe_mm: np.ndarray, t_s: float = 0.0) -> np.ndarray:
        """The B-mode image (H, W) uint8 at probe pose ``T_probe_mm`` (base frame, mm)."""
        p = self._to_heart(T_probe_mm, self._polar_pts)
        dep, chest, rib = self._chest(p)
        ph = self._warp(p, t_s)
        amp = self._echo(ph)
        # chest wall: bright skin line, layered fat / muscle
        layers = np.float32(0.32) * (1.0 + np.float32(0.6) * np.sin(dep * np.float32(2 * np.pi / 4.0)))
        amp = np.where(chest, np.where(dep < 1.5, np.float32(0.9), layers), amp)
        amp = np.where(dep < 0, np.float32(0.0), amp)  # air above the skin
        amp = amp * self._speckle_at(ph)
        shape = (self._n_r, self._n_b)
        amp = amp.reshape(shape)
        rib = rib.reshape(shape)
        # ribs: bright surface, shadow behind
        hit = np.logical_or.accumulate(rib, axis=0)
        k = self._surface_rows
        deeper = np.zeros_like(hit)
        deeper[k:] = hit[:-k]
        surface = hit & ~deeper
        amp = np.where(surface, np.float32(1.6), np.where(deeper, amp * np.float32(0.03), amp))
        amp *= self._att
        small = cv2.GaussianBlur(amp, self._blur_small, 0)
        large = cv2.GaussianBlur(amp, self._blur_large, 0)
        amp = small + (large - small) * self._depth_w
        db = np.log10(amp + np.float32(1e-4)) * np.float32(20.0)
        scale = np.float32(255.0 / DYNAMIC_RANGE_DB)
        polar = np.clip((db + np.float32(DYNAMIC_RANGE_DB + GAIN_DB)) * scale, 0, 255).astype(np.uint8)
        return cv2.remap(polar, self._map1, self._map2, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def labels(self, T_probe_mm: np.ndarray, t_s: float = 0.0) -> np.ndarray:
        """The ground-truth label map (H, W) int32 of :class:`Label` ids at the same pose."""
        p = self._to_heart(T_probe_mm, self._pix_pts)
        dep, chest, rib = self._chest(p)
        ph = self._warp(p, t_s)
        g = (ph - self._vorigin) * self._vinv
        i = np.clip(np.rint(g), 0, self._vshape - 1).astype(np.int64)
        lab = self._label_flat[i @ self._strides].astype(np.int32)
        lab = np.where(chest, int(Label.CHEST_WALL), lab)
        lab = np.where(rib, int(Label.RIB), lab)
        lab = np.where(dep < 0, int(Label.BACKGROUND), lab)
        out = np.full(self.size[0] * self.size[1], int(Label.OUTSIDE_SECTOR), dtype=np.int32)
        out[self._pix_idx] = lab
        return out.reshape(self.size)
