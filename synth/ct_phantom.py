"""An analytic chest CT phantom with planted lung nodules.

The phantom is a continuous function of patient position (LPS, millimetres),
so the same anatomy and the same nodules can be sampled on any scanner grid:
a regular axial grid (:func:`make_phantom`), a variable-spacing series or a
gantry-tilted one (``synth.ct``). Ground truth therefore never
depends on how a series was sampled.

Tissues (HU): air −1000 outside the body, subcutaneous fat −100, body wall and
mediastinum soft tissue ~40, heart ~45, lungs ~−850 with parenchymal noise,
vertebral body and ribs ~700 (cortex) around ~250 marrow. Nodules are solid
(~40 HU) or part-solid (a ground-glass halo ~−500 around a solid core), slightly
ellipsoidal, 3–30 mm, always placed wholly inside a lung.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_HEART = 45.0
HU_LUNG = -850.0
HU_BONE_CORTEX = 700.0
HU_BONE_MARROW = 250.0
HU_SOLID_NODULE = 40.0
HU_GROUND_GLASS = -500.0
# The stored range of a 12-bit CT scanner with intercept −1024.
HU_MIN, HU_MAX = -1024, 3071

NODULE_KINDS = ("solid", "part_solid")


@dataclass(frozen=True)
class Nodule:
    """One planted nodule: centre in LPS mm, equivalent-sphere diameter in mm."""

    centre_lps_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str = "solid"
    # Per-axis radius factors (x, y, z); product 1 so the volume matches the diameter.
    axis_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Part-solid only: solid core diameter as a share of the whole diameter.
    core_share: float = 0.45

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Nodule":
        kind = d.get("kind", "solid")
        if kind not in NODULE_KINDS:
            raise ValueError(f"nodule kind {kind!r} is not one of {NODULE_KINDS}")
        diameter = float(d["diameter_mm"])
        if not diameter > 0:
            raise ValueError(f"nodule diameter_mm must be > 0, got {diameter}")
        centre = tuple(float(v) for v in d["centre_lps_mm"])
        if len(centre) != 3:
            raise ValueError(f"nodule centre_lps_mm must be [x, y, z], got {d['centre_lps_mm']!r}")
        return cls(centre_lps_mm=centre, diameter_mm=diameter, kind=kind,  # type: ignore[arg-type]
                   axis_scale=tuple(float(v) for v in d.get("axis_scale", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
                   core_share=float(d.get("core_share", 0.45)))

    def to_dict(self) -> dict[str, Any]:
        return {"centre_lps_mm": [float(v) for v in self.centre_lps_mm],
                "diameter_mm": float(self.diameter_mm), "kind": self.kind,
                "axis_scale": [float(v) for v in self.axis_scale], "core_share": self.core_share}


@dataclass(frozen=True)
class ChestAnatomy:
    """Chest geometry in LPS mm, derived from a field of view (centre + extent)."""

    centre_lps_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]  # x, y, z extents

    @classmethod
    def for_grid(cls, shape_zyx: tuple[int, int, int], spacing_zyx_mm: tuple[float, float, float],
                 origin_lps_mm: tuple[float, float, float]) -> "ChestAnatomy":
        """The anatomy filling an axial grid (identity direction cosines)."""
        nz, ny, nx = shape_zyx
        sz, sy, sx = spacing_zyx_mm
        ox, oy, oz = origin_lps_mm
        centre = (ox + (nx - 1) * sx / 2, oy + (ny - 1) * sy / 2, oz + (nz - 1) * sz / 2)
        return cls(centre_lps_mm=centre, fov_mm=(nx * sx, ny * sy, max(nz * sz, 1e-6)))

    # Shape parameters as shares of the in-plane field of view; chosen so that
    # lungs, spine and ribs never overlap (nodules inside a lung stay in lung).
    @property
    def body_axes_mm(self) -> tuple[float, float]:
        return 0.42 * self.fov_mm[0], 0.30 * self.fov_mm[1]

    @property
    def fat_mm(self) -> float:
        return 0.025 * min(self.fov_mm[0], self.fov_mm[1])

    def lung_centres_mm(self) -> list[tuple[float, float]]:
        cx, cy, _ = self.centre_lps_mm
        dx = 0.19 * self.fov_mm[0]
        # Patient right is −x in LPS.
        return [(cx - dx, cy + 0.01 * self.fov_mm[1]), (cx + dx, cy + 0.01 * self.fov_mm[1])]

    def lung_axes_mm(self, z_mm: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Lung semi-axes at height ``z_mm``: full at the base, tapering towards the apex (+z)."""
        scale = self.lung_scale(z_mm)
        return 0.13 * self.fov_mm[0] * scale, 0.21 * self.fov_mm[1] * scale

    def lung_scale(self, z_mm: np.ndarray | float) -> np.ndarray:
        z0 = self.centre_lps_mm[2] - self.fov_mm[2] / 2
        t = np.clip((np.asarray(z_mm, dtype=np.float64) - z0) / self.fov_mm[2], 0.0, 1.0)
        return 0.6 + 0.4 * (1.0 - t * t)

    def in_lung(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        ax, ay = self.lung_axes_mm(z)
        inside = np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
        for lx, ly in self.lung_centres_mm():
            inside |= ((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2 <= 1.0
        return inside

    def tissue_hu(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free HU and a lung mask at LPS points (broadcastable arrays)."""
        x, y, z = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, y, z)))
        cx, cy, _ = self.centre_lps_mm
        bx, by = self.body_axes_mm
        r_body = ((x - cx) / bx) ** 2 + ((y - cy) / by) ** 2
        hu = np.full(x.shape, HU_AIR, dtype=np.float32)
        body = r_body <= 1.0
        hu[body] = HU_FAT
        fat = self.fat_mm
        inner = ((x - cx) / (bx - fat)) ** 2 + ((y - cy) / (by - fat)) ** 2 <= 1.0
        hu[inner] = HU_SOFT_TISSUE
        # Heart: left-anterior of centre (anterior is −y).
        fx, fy = self.fov_mm[0], self.fov_mm[1]
        heart = ((x - (cx + 0.04 * fx)) / (0.09 * fx)) ** 2 + ((y - (cy - 0.06 * fy)) / (0.11 * fy)) ** 2 <= 1.0
        hu[heart] = HU_HEART
        lung = self.in_lung(x, y, z)
        hu[lung] = HU_LUNG
        # Spine: posterior midline, cortex around marrow.
        r_sp = 0.045 * fx
        d_sp = np.hypot(x - cx, y - (cy + 0.2 * fy))
        hu[d_sp <= r_sp] = HU_BONE_CORTEX
        hu[d_sp <= 0.7 * r_sp] = HU_BONE_MARROW
        # Ribs: a thin shell inside the body wall, in bands every ~26 mm of z, lateral and posterior.
        shell = (r_body <= ((1.0 - 2.4 * fat / bx) ** 2)) & (r_body >= ((1.0 - 3.4 * fat / bx) ** 2))
        band = np.mod(z - (self.centre_lps_mm[2] - self.fov_mm[2] / 2), 26.0) < 9.0
        lateral = (y - cy) > -0.12 * fy
        hu[shell & band & lateral & ~lung] = HU_BONE_CORTEX
        return hu, lung


@dataclass
class ChestPhantom:
    """Anatomy plus nodules; :meth:`sample` evaluates HU and the nodule mask at LPS points."""

    anatomy: ChestAnatomy
    nodules: list[Nodule] = field(default_factory=list)

    def sample(self, x: np.ndarray, y: np.ndarray, z: np.ndarray,
               rng: np.random.Generator | None = None,
               noise_hu: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and nodule mask (uint8) at LPS points; Gaussian noise when ``rng`` is given."""
        x, y, z = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, y, z)))
        hu, lung = self.anatomy.tissue_hu(x, y, z)
        mask = np.zeros(x.shape, dtype=np.uint8)
        for nod in self.nodules:
            _paint_nodule(nod, x, y, z, hu, mask)
        if rng is not None and noise_hu > 0:
            noise = rng.standard_normal(size=hu.shape, dtype=np.float32) * np.float32(noise_hu)
            # Parenchyma is visibly more textured than soft tissue on real scans.
            noise[lung & (mask == 0)] *= 1.6
            noise[hu <= HU_AIR] *= 0.4
            hu += noise
        np.clip(hu, HU_MIN, HU_MAX, out=hu)
        return hu, mask


def _paint_nodule(nod: Nodule, x: np.ndarray, y: np.ndarray, z: np.ndarray,
                  hu: np.ndarray, mask: np.ndarray) -> None:
    r = nod.diameter_mm / 2.0
    nx_, ny_, nz_ = nod.centre_lps_mm
    kx, ky, kz = nod.axis_scale
    # Cheap reject: skip sample sets nowhere near this nodule.
    reach = r * max(kx, ky, kz)
    near = ((np.abs(x - nx_) <= reach) & (np.abs(y - ny_) <= reach) & (np.abs(z - nz_) <= reach))
    if not near.any():
        return
    idx = np.nonzero(near)
    d = np.sqrt(((x[idx] - nx_) / (r * kx)) ** 2 + ((y[idx] - ny_) / (r * ky)) ** 2
                + ((z[idx] - nz_) / (r * kz)) ** 2)  # 1.0 on the surface
    inside = d <= 1.0
    if nod.kind == "solid":
        value = np.where(inside, HU_SOLID_NODULE, hu[idx])
    else:
        core = d <= nod.core_share
        value = np.where(core, HU_SOLID_NODULE, np.where(inside, HU_GROUND_GLASS, hu[idx]))
    hu[idx] = value.astype(np.float32)
    mask[idx] = np.where(inside, 1, mask[idx]).astype(np.uint8)


_SPHERE_DIRS = None


def _fits_in_lung(anatomy: ChestAnatomy, centre: np.ndarray, radius_mm: float) -> bool:
    global _SPHERE_DIRS
    if _SPHERE_DIRS is None:
        # A fixed Fibonacci sphere: deterministic, evenly spread surface probes.
        k = np.arange(256) + 0.5
        phi = np.arccos(1 - 2 * k / 256)
        theta = math.pi * (1 + 5 ** 0.5) * k
        _SPHERE_DIRS = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)
    pts = centre[None, :] + radius_mm * _SPHERE_DIRS
    return bool(anatomy.in_lung(pts[:, 0], pts[:, 1], pts[:, 2]).all())


def default_origin_lps_mm(shape_zyx: tuple[int, int, int],
                          spacing_zyx_mm: tuple[float, float, float]) -> tuple[float, float, float]:
    """An origin that centres the grid on (0, 0) in-plane, with z running from −(extent/2)."""
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx_mm
    return (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)


def make_phantom(shape_zyx: tuple[int, int, int], spacing_zyx_mm: tuple[float, float, float],
                 nodules: list[dict[str, Any]], rng: np.random.Generator,
                 origin_lps_mm: tuple[float, float, float] | None = None,
                 noise_hu: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """A chest phantom on an axial grid: ``(hu int16 (z, y, x), nodule mask uint8 (z, y, x))``.

    Voxel (k, j, i) sits at LPS ``origin + (i·sx, j·sy, k·sz)`` (identity direction
    cosines: columns run to patient left, rows to posterior, slices to superior).
    ``nodules`` are dicts with ``centre_lps_mm`` [x, y, z], ``diameter_mm`` and
    optional ``kind`` ("solid" | "part_solid"); see :func:`random_nodules`.
    ``origin_lps_mm`` defaults to a grid centred on the origin.
    """
    shape_zyx = tuple(int(v) for v in shape_zyx)  # type: ignore[assignment]
    spacing_zyx_mm = tuple(float(v) for v in spacing_zyx_mm)  # type: ignore[assignment]
    if len(shape_zyx) != 3 or min(shape_zyx) < 1:
        raise ValueError(f"shape_zyx must be three positive sizes, got {shape_zyx}")
    if len(spacing_zyx_mm) != 3 or min(spacing_zyx_mm) <= 0:
        raise ValueError(f"spacing_zyx_mm must be three positive spacings, got {spacing_zyx_mm}")
    if origin_lps_mm is None:
        origin_lps_mm = default_origin_lps_mm(shape_zyx, spacing_zyx_mm)
    phantom = ChestPhantom(ChestAnatomy.for_grid(shape_zyx, spacing_zyx_mm, origin_lps_mm),
                           [Nodule.from_dict(n) for n in nodules])
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx_mm
    ox, oy, oz = origin_lps_mm
    xs = (ox + np.arange(nx) * sx)[None, :]
    ys = (oy + np.arange(ny) * sy)[:, None]
    hu = np.empty(shape_zyx, dtype=np.int16)
    mask = np.empty(shape_zyx, dtype=np.uint8)
    # Slice by slice keeps peak memory at one slice of float64 coordinates.
    for k in range(nz):
        h, m = phantom.sample(xs, ys, np.float64(oz + k * sz), rng=rng, noise_hu=noise_hu)
        hu[k] = np.rint(h).astype(np.int16)
        mask[k] = m
    return hu, mask


def random_nodules(rng: np.random.Generator, n: int, anatomy: ChestAnatomy,
                   diameter_range_mm: tuple[float, float] = (3.0, 30.0),
                   part_solid_share: float = 0.3, min_gap_mm: float = 4.0,
                   max_tries: int = 2000) -> list[dict[str, Any]]:
    """``n`` non-overlapping nodules wholly inside the lungs of ``anatomy`` (dicts for make_phantom).

    Diameters are log-uniform in ``diameter_range_mm`` (small nodules are the
    common case) but capped so every nodule fits its lung with a margin;
    raises ValueError naming the field of view when the lungs are too small.
    """
    lo, hi = diameter_range_mm
    if not 0 < lo <= hi:
        raise ValueError(f"diameter_range_mm must be 0 < low <= high, got {diameter_range_mm}")
    cz = anatomy.centre_lps_mm[2]
    z_half = anatomy.fov_mm[2] / 2.0
    out: list[dict[str, Any]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"could not place {n} nodules of {lo}-{hi} mm inside the lungs of a "
                f"{anatomy.fov_mm[0]:.0f}x{anatomy.fov_mm[1]:.0f}x{anatomy.fov_mm[2]:.0f} mm field "
                "of view; use a larger field of view, fewer nodules or smaller diameters")
        d = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        r = d / 2.0
        # Ellipsoid factors up to ±12 %; the widest axis bounds what must fit.
        f = rng.uniform(0.88, 1.12, size=3)
        f = f / np.prod(f) ** (1.0 / 3.0)
        reach = r * float(f.max()) + 1.0
        if z_half - reach <= 0:
            continue
        z = float(rng.uniform(cz - z_half + reach, cz + z_half - reach))
        # Lungs narrow upwards: the top of the nodule is where it must fit.
        ax, ay = anatomy.lung_axes_mm(z + reach)
        ax, ay = float(ax), float(ay)
        if ax <= reach * 1.15 or ay <= reach * 1.15:
            continue
        lx, ly = anatomy.lung_centres_mm()[int(rng.integers(0, 2))]
        # A point in the lung ellipse shrunk by the nodule's reach (conservative: shrink each axis).
        ang = rng.uniform(0, 2 * math.pi)
        rad = math.sqrt(rng.uniform(0, 1))
        x = lx + rad * (ax - reach * 1.15) * math.cos(ang)
        y = ly + rad * (ay - reach * 1.15) * math.sin(ang)
        centre = np.array([x, y, z])
        # The shrunken ellipse is not exactly the inner parallel curve, so check the surface itself.
        if not _fits_in_lung(anatomy, centre, reach + 0.5):
            continue
        if any(np.linalg.norm(centre - np.array(o["centre_lps_mm"])) < r + o["diameter_mm"] / 2 + min_gap_mm
               for o in out):
            continue
        kind = "part_solid" if rng.uniform() < part_solid_share and d >= 6.0 else "solid"
        out.append(Nodule(centre_lps_mm=(x, y, z), diameter_mm=d, kind=kind,
                          axis_scale=tuple(float(v) for v in f)).to_dict())  # type: ignore[arg-type]
    return out
