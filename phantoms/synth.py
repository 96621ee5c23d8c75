"""Synthetic liver phantoms: abdominal-MRI-like volumes with liver masks and a fibrosis stage.

THESE ARE PHANTOMS, NOT PATIENTS. They exist so that the demo, the tests and the benchmarks
run anywhere without patient data. Nothing measured on them says anything about real livers.

Each phantom is a T1-weighted-looking axial stack drawn from simple shapes in patient
coordinates (mm, RAS+: +x = patient's right, +y = anterior, +z = superior): a body outline
with subcutaneous fat, visceral background texture, paraspinal muscles, a vertebra, aorta and
IVC, kidneys, spleen, gallbladder and a three-lobed liver in the right upper abdomen; then a
smooth multiplicative bias field, Rician noise and a random intensity scale; stored as int16
NIfTI in one of several axis orders/flips with the affine to match (so loaders must reorient).

Patient-level variation: body size and position, liver size and position, intensity scale,
tissue contrast, noise level, bias field, in-plane spacing (field of view), slice thickness and
count, stored orientation.

Stage: every phantom gets a latent severity drawn from an overlapping range per stage
(A 0-0.45, B 0.3-0.75, C 0.55-1). Four signs grow with severity, each with its own noise, so
they disagree from patient to patient and no single one gives the stage:
- surface nodularity (creased bumps on the liver boundary, amplitude up to ~5 mm);
- parenchymal heterogeneity: reticular septa (thin brighter sheets) and nodule-like patches;
- caudate-to-right-lobe ratio (caudate grows, right lobe shrinks);
- spleen size.
The mean liver intensity does not depend on the stage (it is drawn per patient).

The stage of patient i is fixed by (seed, number of patients) alone (`stage_plan`), so a
cohort's stage mix is known without drawing any volume; the mix follows the paper's crop mix
(934 A / 1269 B / 602 C: about 33 / 45 / 22 %).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from nibabel import orientations

from liverstage.runtime.atomic import atomic_dir
from liverstage.runtime.stages import STAGES

PHANTOM_NOTE = (
    "These volumes are SYNTHETIC PHANTOMS made by `liverstage synth`, not patients. "
    "They contain no patient data, and results measured on them say nothing about real livers."
)
STAGE_FRACTIONS = (934 / 2805, 1269 / 2805, 602 / 2805)  # the paper's crop mix
SEVERITY_RANGE = {"A": (0.0, 0.45), "B": (0.3, 0.75), "C": (0.55, 1.0)}
SIGN_NOISE = 0.12  # per-patient spread of each sign around the severity

# canonical -> stored orientations (nibabel ornt rows: [stored axis for canonical axis, flip])
STORED_ORIENTATIONS = (
    ((0, 1), (1, 1), (2, 1)),     # RAS as is
    ((0, -1), (1, -1), (2, 1)),   # LPS (DICOM-like)
    ((0, -1), (1, 1), (2, 1)),    # LAS (radiological)
    ((1, 1), (0, -1), (2, 1)),    # in-plane axes swapped, one flipped
    ((0, 1), (1, -1), (2, -1)),   # RPI (superior -> inferior)
    ((2, 1), (0, 1), (1, -1)),    # slice axis stored first
)


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One phantom as stored: data/mask in the stored axis order, affine to match."""

    data: np.ndarray  # int16 [stored axes]
    mask: np.ndarray  # uint8, 1 = liver
    affine: np.ndarray
    stage: str
    params: dict


def stage_plan(patients: int, seed: int = 0) -> list[str]:
    """Stages of patients 0..n-1: the paper's mix by largest remainder, shuffled by seed."""
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    exact = np.array(STAGE_FRACTIONS) * patients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: patients - counts.sum()]:
        counts[i] += 1
    stages = np.repeat(np.array(STAGES), counts)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    return [str(s) for s in rng.permutation(stages)]


# ---------------------------------------------------------------------------------------------
# drawing helpers


def _smooth_noise(rng: np.random.Generator, coords: tuple[np.ndarray, ...], scale_mm: float) -> np.ndarray:
    """Smooth random field on the grid `coords` (1D mm arrays): coarse normals, linear upsampling.

    Normalised to unit standard deviation; float32.
    """
    out = None
    mats = []
    for c in coords:
        lo, hi = float(c.min()), float(c.max())
        n = max(2, int(np.ceil((hi - lo) / scale_mm)) + 2)
        knots = lo - scale_mm / 2 + scale_mm * np.arange(n)
        t = np.clip((c - knots[0]) / scale_mm, 0, n - 1 - 1e-9)
        i = np.floor(t).astype(int)
        f = t - i
        m = np.zeros((c.size, n), dtype=np.float32)
        m[np.arange(c.size), i] = 1 - f
        m[np.arange(c.size), np.minimum(i + 1, n - 1)] += f
        mats.append(m)
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats)).astype(np.float32)
    out = np.einsum("ia,abc->ibc", mats[0], coarse, optimize=True)
    out = np.einsum("jb,ibc->ijc", mats[1], out, optimize=True)
    out = np.einsum("kc,ijc->ijk", mats[2], out, optimize=True)
    std = float(out.std())
    return (out / (std if std > 0 else 1.0)).astype(np.float32)


def _cells(rng: np.random.Generator, points: tuple[np.ndarray, ...], cell_mm: float,
           bounds: tuple[tuple[float, float], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voronoi cells (regenerative nodules) around jittered seeds, one per cube of side cell_mm.

    points: 1D mm coordinate arrays (x, y, z) of the voxels to evaluate, inside `bounds`
    ((lo, hi) mm per axis). Returns, per point, the distance (mm) to the nearest cell wall
    (half the gap between the nearest and second-nearest seed distances: 0 on a wall, about
    cell_mm / 2 at a nodule's centre), the index of the cell it falls in, and the number of cells.
    The 27 neighbouring cubes are searched; seeds are jittered within 10-90 % of their cube.
    """
    lo = [b[0] - cell_mm for b in bounds]
    n = [int(np.ceil((b[1] - l) / cell_mm)) + 2 for b, l in zip(bounds, lo)]
    grids = np.meshgrid(*(np.arange(k, dtype=np.float32) for k in n), indexing="ij")
    seeds = [(l + cell_mm * (g + rng.uniform(0.1, 0.9, size=n).astype(np.float32))).ravel()
             for l, g in zip(lo, grids)]
    stride = (n[1] * n[2], n[2], 1)
    base = np.zeros(points[0].shape, dtype=np.int64)
    for c, l, k, st in zip(points, lo, n, stride):
        base += np.clip(((c - l) / cell_mm).astype(np.int64), 1, k - 2) * st
    f1 = np.full(base.shape, np.inf, np.float32)
    f2 = np.full(base.shape, np.inf, np.float32)
    near = np.zeros(base.shape, dtype=np.int64)
    for da in (-1, 0, 1):
        for db in (-1, 0, 1):
            for dc in (-1, 0, 1):
                k = base + (da * stride[0] + db * stride[1] + dc)
                d = np.square(np.take(seeds[0], k) - points[0])
                d += np.square(np.take(seeds[1], k) - points[1])
                d += np.square(np.take(seeds[2], k) - points[2])
                closer = d < f1
                np.minimum(f2, np.where(closer, f1, d), out=f2)
                np.copyto(near, k, where=closer)
                np.minimum(f1, d, out=f1)
    wall = 0.5 * (np.sqrt(f2) - np.sqrt(f1))
    return wall.astype(np.float32), near, int(np.prod(n))


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum (polynomial), blends two shapes into one with a rounded seam of ~k mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


class _Canvas:
    """The canonical grid (mm coordinates) and the image being painted."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, h: float):
        self.x, self.y, self.z, self.h = x, y, z, h
        self.img = np.zeros((x.size, y.size, z.size), dtype=np.float32)

    def block(self, center, half) -> tuple[slice, slice, slice] | None:
        """Index box covering center +- half (mm) plus a margin, or None if outside the grid."""
        out = []
        for c, cc, hh in zip((self.x, self.y, self.z), center, half):
            lo = np.searchsorted(c, cc - hh - 3 * self.h)
            hi = np.searchsorted(c, cc + hh + 3 * self.h, side="right")
            if hi <= lo:
                return None
            out.append(slice(int(lo), int(hi)))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, blk):
        return (self.x[blk[0]][:, None, None], self.y[blk[1]][None, :, None], self.z[blk[2]][None, None, :])

    def frac(self, f: np.ndarray) -> np.ndarray:
        """Soft inside-fraction of a signed distance (mm): partial volume over about a voxel."""
        return np.clip(0.5 - f / self.h, 0.0, 1.0).astype(np.float32)

    def paint(self, blk, m: np.ndarray, value) -> None:
        sub = self.img[blk]
        sub += m * (np.asarray(value, dtype=np.float32) - sub)


def _ellipsoid(X, Y, Z, c, ax) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid."""
    r = np.sqrt(((X - c[0]) / ax[0]) ** 2 + ((Y - c[1]) / ax[1]) ** 2 + ((Z - c[2]) / ax[2]) ** 2)
    return (r - 1.0) * float(min(ax))


def _cylinder(X, Y, c, ax) -> np.ndarray:
    """Signed distance (mm, approximate) to an elliptic cylinder along z."""
    r = np.sqrt(((X - c[0]) / ax[0]) ** 2 + ((Y - c[1]) / ax[1]) ** 2)
    return (r - 1.0) * float(min(ax))


def _voxel_boxes(organs: dict[str, tuple], *, origin, steps) -> dict[str, list[list[int]]]:
    """Each organ's box [[x0, y0, z0], [x1, y1, z1]] (half-open) in the canonical voxel grid; may reach beyond it."""
    boxes = {}
    for name, (centre, semi) in organs.items():
        lo = [int(np.floor((c - r - o) / st)) for c, r, o, st in zip(centre, semi, origin, steps)]
        hi = [int(np.ceil((c + r - o) / st)) + 1 for c, r, o, st in zip(centre, semi, origin, steps)]
        boxes[name] = [lo, hi]
    return boxes


# ---------------------------------------------------------------------------------------------
# one phantom


def synth_patient(index: int, *, seed: int = 0, stage: str | None = None, in_plane: int = 224,
                  slices: int = 47) -> Phantom:
    """Draw phantom `index` of the cohort `seed` (deterministic for (seed, index, sizes)).

    in_plane: matrix size (square); the field of view varies per patient, so the spacing does.
    slices: mean slice count; the count varies +-15 % per patient and the slice thickness follows
    from the covered length. The default size takes well under a second on one core.

    The steps below draw from one generator in a fixed order; that order is what makes a cohort
    reproducible, so a step never draws on behalf of another.
    """
    if stage is None:  # on its own: draw one with the paper's mix (a cohort passes its plan)
        pick = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x57A6E]))
        stage = STAGES[int(pick.choice(len(STAGES), p=STAGE_FRACTIONS))]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x11BE7]))
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if in_plane < 32 or slices < 6:
        raise ValueError(f"in_plane must be >= 32 and slices >= 6, got {in_plane}, {slices}")
    signs = _stage_signs(rng, stage)
    body = _body_geometry(rng, in_plane, slices)
    cv = body.canvas(in_plane)
    values = _intensities(rng)
    f_inner = _paint_body(rng, cv, body, values)
    _paint_posterior(cv, body, values, f_inner)
    organs = _paint_kidneys(rng, cv, body, values)  # name -> (centre, semi-axes) mm: crops of other anatomy
    organs["spleen"] = _paint_spleen(rng, cv, body, values, signs, f_inner)
    organs["below_liver"] = _below_liver(body)
    liver = _paint_liver(rng, cv, body, values, signs, f_inner)
    mask = _paint_over_liver(rng, cv, body, values, liver)
    data, sigma = _acquire(rng, cv, body.fov)
    stored, stored_mask, stored_affine = _store(rng, cv, data, mask, body.dz)
    params = {
        "stage": stage, "severity": round(float(signs.severity), 4), "nodularity_mm": round(signs.nod_amp, 3),
        "septa": round(signs.sep_delta, 4), "septa_mm": round(signs.sep_mm, 3), "nodule_mm": round(liver.cell, 2),
        "heterogeneity": round(signs.het_amp, 4), "caudate_factor": round(signs.caudate, 3),
        "right_lobe_factor": round(signs.right_lobe, 3), "spleen_factor": round(signs.spleen, 3),
        "spacing_mm": [round(body.h, 4), round(body.h, 4), round(body.dz, 4)], "slices": body.nz,
        "noise": round(sigma, 4), "orientation": "".join(nib.aff2axcodes(stored_affine)),
        "organ_boxes": _voxel_boxes(organs, origin=(cv.x[0], cv.y[0], cv.z[0]), steps=(body.h, body.h, body.dz)),
    }
    return Phantom(data=stored, mask=stored_mask, affine=stored_affine, stage=stage, params=params)


@dataclasses.dataclass(frozen=True)
class _Signs:
    """The latent severity and the four stage signs it drives (each with its own noise)."""

    severity: float
    nod_amp: float  # mm: nodules bulge out, the surface is notched between them
    sep_mm: float  # septal thickness (mm)
    sep_delta: float  # relative brightening of septa (enhancing fibrosis)
    het_amp: float  # nodule-to-nodule intensity spread
    caudate: float
    right_lobe: float
    spleen: float


def _stage_signs(rng: np.random.Generator, stage: str) -> _Signs:
    lo_s, hi_s = SEVERITY_RANGE[stage]
    sev = rng.uniform(lo_s, hi_s)

    def sign() -> float:
        return float(np.clip(sev + rng.normal(0.0, SIGN_NOISE), 0.0, 1.2))

    s_nod, s_sep, s_cau, s_spl, s_het = sign(), sign(), sign(), sign(), sign()
    # sizes in mm are chosen to survive the usual 64-px crop (about 4 mm per pixel)
    return _Signs(severity=sev, nod_amp=1.0 + 13.0 * s_nod, sep_mm=1.5 + 3.5 * s_sep,
                  sep_delta=0.03 + 0.55 * s_sep**1.5, het_amp=0.01 + 0.12 * s_het, caudate=0.7 + 1.0 * s_cau,
                  right_lobe=1.1 - 0.3 * s_cau, spleen=0.75 + 0.9 * s_spl)


@dataclasses.dataclass(frozen=True)
class _Body:
    """Patient geometry (mm): field of view, body ellipse, fat, liver size and the slab covered."""

    fov: float
    h: float  # in-plane spacing
    a: float  # body semi-axes (LR, AP)
    b: float
    bx: float
    by: float
    tf: float  # subcutaneous fat
    size: float  # liver size
    lz: float
    z_lo: float
    nz: int
    dz: float

    @property
    def post(self) -> float:
        """The inner posterior wall (y, mm)."""
        return self.by - self.b + self.tf

    def canvas(self, in_plane: int) -> _Canvas:
        x = ((np.arange(in_plane) - (in_plane - 1) / 2) * self.h).astype(np.float32)
        y = ((np.arange(in_plane) - (in_plane - 1) / 2) * self.h).astype(np.float32)
        z = (self.z_lo + (np.arange(self.nz) + 0.5) * self.dz).astype(np.float32)
        return _Canvas(x, y, z, self.h)


def _body_geometry(rng: np.random.Generator, in_plane: int, slices: int) -> _Body:
    u = rng.uniform
    fov = u(330.0, 420.0)
    h = fov / in_plane
    a, b = u(135.0, 172.0), u(95.0, 125.0)
    bx, by = u(-15.0, 15.0), u(-12.0, 12.0)
    tf = u(8.0, 24.0)
    size = u(0.85, 1.15)
    lz = 0.0
    rz = 85.0 * size
    z_lo = lz - rz - u(55.0, 85.0)
    z_hi = lz + rz + u(10.0, 30.0)
    nz = max(6, int(round(slices * u(0.85, 1.15))))
    return _Body(fov=fov, h=h, a=a, b=b, bx=bx, by=by, tf=tf, size=size, lz=lz, z_lo=z_lo, nz=nz,
                 dz=(z_hi - z_lo) / nz)


@dataclasses.dataclass(frozen=True)
class _Intensities:
    """T1-like intensities: fat bright, fluid and flowing blood dark."""

    contrast: float
    fat: float
    visc: float
    muscle: float
    liver: float
    spleen: float
    kidney: float
    marrow: float
    fluid: float
    vessel: float


def _intensities(rng: np.random.Generator) -> _Intensities:
    u = rng.uniform
    contrast = u(0.8, 1.2)
    base = 0.38

    def tissue(v: float) -> float:
        return float(base + contrast * (v * u(0.92, 1.08) - base))

    v_fat, v_visc, v_muscle = tissue(1.0), base, tissue(0.28)
    v_liver = tissue(u(0.5, 0.62))
    v_spleen = float(v_liver * u(0.7, 0.86))
    v_kidney, v_marrow, v_fluid, v_vessel = tissue(0.44), tissue(0.62), tissue(0.12), tissue(0.1)
    return _Intensities(contrast=contrast, fat=v_fat, visc=v_visc, muscle=v_muscle, liver=v_liver, spleen=v_spleen,
                    kidney=v_kidney, marrow=v_marrow, fluid=v_fluid, vessel=v_vessel)


def _paint_body(rng: np.random.Generator, cv: _Canvas, body: _Body, values: _Intensities) -> np.ndarray:
    """Fat ring, textured visceral inside; returns the signed distance to the inner body wall."""
    full = (slice(None), slice(None), slice(None))
    X, Y, Z = cv.coords(full)
    ph = rng.uniform(0, 2 * np.pi)
    az = body.a * (1 + 0.05 * np.sin(Z / 110.0 + ph))
    bz = body.b * (1 + 0.04 * np.cos(Z / 90.0 + ph))
    r_body = np.sqrt(((X - body.bx) / az) ** 2 + ((Y - body.by) / bz) ** 2)
    f_body = (r_body - 1.0) * np.minimum(az, bz)
    f_inner = f_body + body.tf
    cv.paint(full, cv.frac(f_body), values.fat)
    visc_tex = _smooth_noise(rng, (cv.x, cv.y, cv.z), rng.uniform(12.0, 22.0))
    cv.paint(full, cv.frac(f_inner), values.visc * (1.0 + 0.12 * values.contrast * visc_tex))
    return f_inner


def _paint_posterior(cv: _Canvas, body: _Body, values: _Intensities, f_inner: np.ndarray) -> None:
    """Paraspinal muscles, vertebra (marrow), spinal canal and aorta."""
    post, bx = body.post, body.bx
    for side in (-1, 1):
        c = (bx + side * 38.0, post + 22.0)
        blk = cv.block((c[0], c[1], 0.0), (32.0, 26.0, 1e6))
        Xb, Yb, _ = cv.coords(blk)
        cv.paint(blk, cv.frac(np.maximum(_cylinder(Xb, Yb, c, (30.0, 24.0)), f_inner[blk])), values.muscle)
    for c, r, v in (((bx, post + 45.0), 17.0, values.marrow), ((bx, post + 17.0), 7.0, values.fluid),
                    ((bx - 20.0, post + 75.0), 11.0, values.vessel)):
        blk = cv.block((c[0], c[1], 0.0), (r, r, 1e6))
        Xb, Yb, _ = cv.coords(blk)
        cv.paint(blk, cv.frac(_cylinder(Xb, Yb, c, (r, r))), v)


def _below_liver(body: "_Body") -> tuple:
    """(centre, semi-axes) in mm of the abdomen between the liver's lower tip and the slab's end."""
    liver_bottom = body.lz - 85.0 * body.size  # the liver's axial semi-axis is 85 mm x its size
    return ((body.bx, body.by, (body.z_lo + liver_bottom) / 2),
            (0.5 * body.a, 0.5 * body.b, (liver_bottom - body.z_lo) / 2))


def _paint_kidneys(rng: np.random.Generator, cv: _Canvas, body: _Body, values: _Intensities) -> dict[str, tuple]:
    """Both kidneys (the right one lower), each with a darker sinus; their (centre, semi-axes) in mm."""
    u = rng.uniform
    organs = {}
    for side, dzk in ((-1, -60.0), (1, -78.0)):
        c = (body.bx + side * body.a * u(0.38, 0.46), body.post + u(45.0, 60.0), body.lz + dzk + u(-10, 10))
        ax = (u(24.0, 32.0), u(26.0, 34.0), u(45.0, 60.0))
        organs["kidney_left" if side < 0 else "kidney_right"] = (c, ax)
        organs["kidney_left" if side < 0 else "kidney_right"] = (c, ax)
        blk = cv.block(c, ax)
        if blk is not None:
            Xb, Yb, Zb = cv.coords(blk)
            f = _ellipsoid(Xb, Yb, Zb, c, ax)
            cv.paint(blk, cv.frac(f), values.kidney)
            cv.paint(blk, cv.frac(f + 0.45 * min(ax)), values.fluid * 1.5)  # sinus
    return organs


def _paint_spleen(rng: np.random.Generator, cv: _Canvas, body: _Body, values: _Intensities, signs: _Signs,
                  f_inner: np.ndarray) -> tuple:
    """The spleen on the patient's left (low x); its size grows with the stage. Its (centre, semi-axes) in mm."""
    u = rng.uniform
    c = (body.bx - body.a * u(0.52, 0.62), body.by - body.b * u(0.2, 0.4), body.lz + u(5.0, 30.0))
    ax = tuple(signs.spleen * s * u(0.9, 1.1) for s in (24.0, 50.0, 48.0))
    blk = cv.block(c, ax)
    if blk is not None:
        Xb, Yb, Zb = cv.coords(blk)
        cv.paint(blk, cv.frac(np.maximum(_ellipsoid(Xb, Yb, Zb, c, ax), f_inner[blk] + 2.0)), values.spleen)
    return c, ax


@dataclasses.dataclass(frozen=True)
class _Liver:
    """The painted liver: its block of the canvas, coordinates there, inside-fraction and centre."""

    blk: tuple[slice, slice, slice]
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    frac: np.ndarray
    lx: float
    ly: float
    cell: float  # nodule size (mm)


def _paint_liver(rng: np.random.Generator, cv: _Canvas, body: _Body, values: _Intensities, signs: _Signs,
                 f_inner: np.ndarray) -> _Liver:
    """Right lobe + left lobe + caudate, smooth union, kept inside the body wall, with nodules,
    septa and heterogeneity."""
    u = rng.uniform
    a, b, lz, size = body.a, body.b, body.lz, body.size
    lx, ly = body.bx + a * u(0.28, 0.38), body.by + b * u(-0.05, 0.12)
    lobes = [
        ((lx, ly, lz), tuple(v * size for v in (a * 0.42 * signs.right_lobe, b * 0.62 * signs.right_lobe, 85.0))),
        ((lx - a * u(0.5, 0.6), ly + b * u(0.25, 0.38), lz + 25.0 * size),
         tuple(v * size * u(0.85, 1.15) for v in (a * 0.33, b * 0.28, 45.0))),
        ((lx - a * 0.3, ly - b * 0.32, lz + 15.0 * size),
         tuple(v * size * signs.caudate for v in (20.0, 18.0, 38.0))),
    ]
    lo_c = np.min([np.array(c) - np.array(ax) for c, ax in lobes], axis=0)
    hi_c = np.max([np.array(c) + np.array(ax) for c, ax in lobes], axis=0)
    pad = signs.nod_amp + 12.0
    blk = cv.block(tuple((lo_c + hi_c) / 2), tuple((hi_c - lo_c) / 2 + pad))
    Xb, Yb, Zb = cv.coords(blk)
    f_liv = None
    for c, ax in lobes:
        f = _ellipsoid(Xb, Yb, Zb, c, ax)
        f_liv = f if f_liv is None else _smin(f_liv, f, 12.0)
    bx_, by_, bz_ = cv.x[blk[0]], cv.y[blk[1]], cv.z[blk[2]]
    # regenerative nodules: Voronoi cells of a per-patient size (not a stage cue), evaluated on
    # the voxels the liver may cover; they bulge the surface (nodularity), their walls carry the
    # septa and each nodule gets its own intensity (heterogeneity)
    cell = u(16.0, 24.0) * size
    near = f_liv < signs.nod_amp + 2.0 * cv.h
    pts = tuple(np.broadcast_to(c, f_liv.shape)[near] for c in (Xb, Yb, Zb))
    bounds = tuple((float(c.min()), float(c.max())) for c in (bx_, by_, bz_))
    wall, cell_id, n_cells = _cells(rng, pts, cell, bounds)
    dome = np.sqrt(np.clip(wall / (0.5 * cell), 0.0, 1.0))  # 0 on a wall, 1 at a nodule's centre
    f_liv[near] -= signs.nod_amp * (dome - 0.5)
    f_liv = np.maximum(f_liv, f_inner[blk] + 3.0)
    liver_frac = cv.frac(f_liv)
    # septa: a triangle profile across the wall; thinner than a voxel they are drawn one voxel wide
    # and fainter (partial volume), so their summed signal does not depend on the voxel size
    half = max(signs.sep_mm, cv.h)
    septa = np.clip(1.0 - wall / half, 0.0, 1.0) * np.float32(signs.sep_delta * signs.sep_mm / half)
    nodule_val = rng.standard_normal(n_cells).astype(np.float32)[cell_id] * np.float32(signs.het_amp)
    texture = _smooth_noise(rng, (bx_, by_, bz_), u(8.0, 12.0))[near] * np.float32(0.02)
    gain = np.ones(f_liv.shape, dtype=np.float32)
    gain[near] += septa + nodule_val + texture
    inside = liver_frac[near] >= 0.5
    gain /= np.float32(gain[near][inside].mean() if inside.any() else 1.0)  # mean not a stage cue
    cv.paint(blk, liver_frac, values.liver * gain)
    return _Liver(blk=blk, coords=(Xb, Yb, Zb), frac=liver_frac, lx=lx, ly=ly, cell=cell)


def _paint_over_liver(rng: np.random.Generator, cv: _Canvas, body: _Body, values: _Intensities,
                      liver: _Liver) -> np.ndarray:
    """IVC, hepatic veins and gallbladder, drawn over the liver and kept out of its mask; returns
    the liver mask (uint8, canonical)."""
    u = rng.uniform
    a, b, lz, lx, ly = body.a, body.b, body.lz, liver.lx, liver.ly
    Xb, Yb, Zb = liver.coords
    blk, liver_frac = liver.blk, liver.frac
    others = np.zeros_like(liver_frac)
    ivc = (lx - a * 0.22, body.post + u(62.0, 72.0))
    f = _cylinder(Xb, Yb, ivc, (12.0, 10.0))
    m = cv.frac(f)
    cv.paint(blk, m, values.vessel)
    others = np.maximum(others, m)
    for _ in range(3):
        c = (lx + u(-0.5, 0.3) * a * 0.5, ly + u(-0.4, 0.4) * b * 0.5)
        r = u(3.0, 6.0)
        m = cv.frac(_cylinder(Xb, Yb, c, (r, r))) * cv.frac(np.abs(Zb - lz - 20.0) - 50.0) * liver_frac
        cv.paint(blk, m, values.vessel * 1.2)
        others = np.maximum(others, m)
    if u() < 0.7:
        c = (lx - a * u(0.15, 0.25), ly + b * u(0.15, 0.3), lz - u(35.0, 55.0))
        ax = (u(11.0, 17.0), u(14.0, 22.0), u(25.0, 40.0))
        m = cv.frac(_ellipsoid(Xb, Yb, Zb, c, ax))
        cv.paint(blk, m, values.fluid)
        others = np.maximum(others, m)
    mask = np.zeros(cv.img.shape, dtype=np.uint8)
    mask[blk] = (liver_frac * (1.0 - others) >= 0.5).astype(np.uint8)
    return mask


def _acquire(rng: np.random.Generator, cv: _Canvas, fov: float) -> tuple[np.ndarray, float]:
    """Bias field, Rician noise and a random scale: the int16 image (canonical) and the noise level."""
    x, y, z = cv.x, cv.y, cv.z
    xn, yn, zn = (x / (fov / 2))[:, None, None], (y / (fov / 2))[None, :, None], ((z - z.mean()) / 150.0)[None, None, :]
    cb = rng.normal(0.0, 0.12, size=5)
    bias = np.exp(cb[0] * xn + cb[3] * xn**2) * np.exp(cb[1] * yn + cb[4] * yn**2) * np.exp(cb[2] * zn)
    sig = cv.img * bias.astype(np.float32)
    sigma = rng.uniform(0.015, 0.05)
    n1 = rng.standard_normal(sig.shape, dtype=np.float32)
    n1 *= sigma
    n1 += sig
    n2 = rng.standard_normal(sig.shape, dtype=np.float32)
    n2 *= sigma
    mag = np.sqrt(n1 * n1 + n2 * n2)
    scale = rng.uniform(400.0, 2500.0)
    return np.clip(np.rint(mag * scale), 0, 32767).astype(np.int16), sigma


def _store(rng: np.random.Generator, cv: _Canvas, data: np.ndarray, mask: np.ndarray,
           dz: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored orientation (one of STORED_ORIENTATIONS) with the affine to match, and a table
    position: (data, mask, affine) as written to disk."""
    u = rng.uniform
    h, x, y, z = cv.h, cv.x, cv.y, cv.z
    affine = np.diag([h, h, dz, 1.0])
    affine[:3, 3] = [x[0], y[0], z[0]]
    affine[:3, 3] += [u(-20, 20), u(-20, 20), u(-400, -100)]  # table position
    k = int(rng.integers(len(STORED_ORIENTATIONS)))
    ornt = np.array(STORED_ORIENTATIONS[k], dtype=float)
    stored = np.ascontiguousarray(orientations.apply_orientation(data, ornt))
    stored_mask = np.ascontiguousarray(orientations.apply_orientation(mask, ornt))
    return stored, stored_mask, affine @ orientations.inv_ornt_aff(ornt, data.shape)


# ---------------------------------------------------------------------------------------------
# a cohort


def synth_cohort(
    out_dir: str | os.PathLike,
    *,
    patients: int = 117,
    seed: int = 0,
    in_plane: int = 224,
    slices: int = 47,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `patients` phantoms to out_dir (whole or not at all) and return its manifest.csv.

    Layout: OUT/manifest.csv (patient_id,image,mask,stage; paths relative to OUT),
    OUT/images/<id>.nii.gz, OUT/masks/<id>.nii.gz (1 = liver), OUT/README.txt and
    OUT/PHANTOMS_NOT_PATIENTS.txt. `progress(done, total)` is called after each phantom.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    out = Path(out_dir)
    plan = stage_plan(patients, seed)
    width = max(3, len(str(patients - 1)))
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        lines = ["patient_id,image,mask,stage"]
        for i, stage in enumerate(plan):
            ph = synth_patient(i, seed=seed, stage=stage, in_plane=in_plane, slices=slices)
            pid = f"phantom{i:0{width}d}"
            img = nib.Nifti1Image(ph.data, ph.affine)
            img.header.set_xyzt_units("mm", "sec")
            img.header["descrip"] = b"liverstage synthetic phantom, not a patient"
            nib.save(img, str(tmp / "images" / f"{pid}.nii.gz"))
            msk = nib.Nifti1Image(ph.mask, ph.affine)
            msk.header.set_xyzt_units("mm", "sec")
            msk.header["descrip"] = b"liverstage phantom liver mask (1 = liver)"
            nib.save(msk, str(tmp / "masks" / f"{pid}.nii.gz"))
            lines.append(f"{pid},images/{pid}.nii.gz,masks/{pid}.nii.gz,{stage}")
            if progress is not None:
                progress(i + 1, patients)
        (tmp / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts = {s: plan.count(s) for s in STAGES}
        (tmp / "PHANTOMS_NOT_PATIENTS.txt").write_text(PHANTOM_NOTE + "\n", encoding="utf-8")
        (tmp / "README.txt").write_text(
            f"{PHANTOM_NOTE}\n\n"
            f"Made by: liverstage synth --patients {patients} --seed {seed} --in-plane {in_plane} --slices {slices}\n"
            f"Stages (patients): A {counts['A']}, B {counts['B']}, C {counts['C']}\n"
            "manifest.csv: patient_id,image,mask,stage (paths relative to this folder)\n"
            "images/*.nii.gz: int16 volumes stored in several axis orders (affines match)\n"
            "masks/*.nii.gz: liver masks, 1 = liver\n",
            encoding="utf-8",
        )
    return out / "manifest.csv"
