"""The liver region, three ways, each returning a bool array on the canonical grid.

- `region_from_mask`: a label mask file that matches the volume (see `io.load_mask`).
- `region_from_bbox`: a box `(x0, y0, z0, x1, y1, z1)`, half-open, in the ORIGINAL file's voxel
  coordinates (what a viewer shows for the file as stored); mapped to canonical by the same
  transpose/flip as the volume, so it is exact.
- `region_auto`: a rough heuristic, no mask needed (see its docstring for its limits).

Crops only use each slice's bounding box of the region, so a rough region is enough.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from nibabel import orientations

from .errors import InputError
from .io import Volume, load_mask


def region_from_mask(volume: Volume, path, *, label: int | None = None) -> np.ndarray:
    """Bool region from a mask file; shape and affine must match the volume."""
    return load_mask(path, like=volume, label=label)


def parse_bbox(text: str | Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """'x0,y0,z0,x1,y1,z1' (or a sequence of six ints) -> tuple; InputError otherwise."""
    if isinstance(text, str):
        parts = [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]
    else:
        parts = list(text)
    if len(parts) != 6:
        raise InputError(f"--bbox needs six integers x0,y0,z0,x1,y1,z1, got {text!r}")
    values = []
    for v in parts:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InputError(f"--bbox needs six integers x0,y0,z0,x1,y1,z1, got {text!r}") from None
        if not np.isfinite(f) or f != int(f):
            raise InputError(f"--bbox needs six integers x0,y0,z0,x1,y1,z1, got {text!r}")
        values.append(int(f))
    return tuple(values)  # type: ignore[return-value]


def region_from_bbox(volume: Volume, bbox: str | Sequence[int]) -> np.ndarray:
    """Bool region of a half-open box given in the original file's voxel coordinates.

    The whole box must lie inside the volume (0 <= lo < hi <= size on each axis): a box partly
    outside usually means coordinates from another series or another axis order.
    """
    x0, y0, z0, x1, y1, z1 = parse_bbox(bbox)
    shape = volume.original_shape
    for axis, lo, hi in zip("xyz", (x0, y0, z0), (x1, y1, z1)):
        size = shape["xyz".index(axis)]
        if not 0 <= lo < hi <= size:
            raise InputError(
                f"--bbox {x0},{y0},{z0},{x1},{y1},{z1} is outside the volume {volume.source}: "
                f"need 0 <= {axis}0 < {axis}1 <= {size} (voxel shape as stored: {tuple(shape)})"
            )
    region = np.zeros(shape, dtype=bool)
    region[x0:x1, y0:y1, z0:z1] = True
    return np.ascontiguousarray(orientations.apply_orientation(region, volume.ornt))


# ---------------------------------------------------------------------------------------------
# auto


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (histogram based, deterministic)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))])


def _erode(mask: np.ndarray) -> np.ndarray:
    """6-neighbour erosion in-plane (4-neighbour per slice); border counts as outside."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:-1, :] |= mask[1:, :]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def fill_holes_inplane(mask: np.ndarray) -> np.ndarray:
    """Fill, slice by slice, every background area not connected to the slice's border."""
    free = ~mask
    reach = np.zeros_like(mask)
    reach[0, :, :] = reach[-1, :, :] = True
    reach[:, 0, :] = reach[:, -1, :] = True
    reach &= free
    for _ in range(2 * (mask.shape[0] + mask.shape[1])):
        grown = _dilate(reach) & free
        if np.array_equal(grown, reach):
            break
        reach = grown
    return ~reach


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected component of a 3D bool mask (numpy only: min-label propagation).

    Iterates "each voxel takes the smallest label among itself and its 6 neighbours" until
    nothing changes; fine for the small, downsampled masks `region_auto` uses.
    """
    if not mask.any():
        return mask.copy()
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size, dtype=np.int64).reshape(mask.shape), big)
    for _ in range(10 * sum(mask.shape)):
        new = labels.copy()
        for axis in range(3):
            n = mask.shape[axis]
            if n < 2:
                continue
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
            np.minimum(new[tuple(lo)], labels[tuple(hi)], out=new[tuple(lo)])
            np.minimum(new[tuple(hi)], labels[tuple(lo)], out=new[tuple(hi)])
        new = np.where(mask, new, big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[int(np.argmax(counts))]


def _box3_inplane(a: np.ndarray) -> np.ndarray:
    """3x3 in-plane mean (edges replicated): takes the edge off the noise before thresholding."""
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros_like(a)
    for dx in range(3):
        for dy in range(3):
            out += p[dx : dx + a.shape[0], dy : dy + a.shape[1], :]
    return out / 9.0


ERODE_FRACTION = 0.10  # of the body's width: skin, subcutaneous fat, abdominal wall


def region_auto(volume: Volume) -> np.ndarray:
    """Rough liver region for an axial abdominal MRI, with no mask.

    Heuristic (on a copy block-averaged to about 64 voxels in-plane, then 3x3 smoothed):
    1. body = voxels above Otsu's threshold of the whole volume (air is dark in MRI), with the
       holes inside each slice's outline filled;
    2. the right upper interior: the body eroded by ~6 % of its width (skin, subcutaneous fat,
       abdominal wall), on the patient's right (high x in RAS+), in the upper 3/4 of the
       slices that contain body;
    3. fat cut = halfway between the subcutaneous fat (75th percentile of the body's outer
       rim) and the interior's median; candidates = voxels of the right upper interior below
       the fat cut and above Otsu's threshold of the upper half's values below the cut (on
       T1-like images the liver is the brightest large soft tissue there);
    4. one in-plane erosion (cuts thin bridges), the largest 6-connected component, one
       dilation back, restricted to the body.

    Limits, honestly: it assumes axial coverage of the upper abdomen, the patient roughly
    centred, and a liver that fills most of the right upper abdomen with fairly even signal.
    It fails on coronal/sagittal acquisitions, when the coverage misses the liver or the liver
    is small or displaced (situs inversus, large masses, ascites), and it may leak into kidney,
    bowel or spleen with similar signal, or miss lesions and vessels of other signal. It
    returns a region for cropping, not a segmentation: look at the crops (`liverstage crops`)
    and give a mask or a box when it is wrong.
    """
    # C order for the block means below (a view reshape, sums in the order they always had): the
    # canonical array is Fortran-ordered (io._canonical), and copying it strided into the padded
    # grid made this function 61 ms instead of 50-54 ms with this one copy (224 x 224 x 40).
    data = np.ascontiguousarray(volume.data)
    X, Y, Z = data.shape
    step = max(1, int(round(max(X, Y) / 64)))
    sx, sy = -(-X // step), -(-Y // step)
    finite = np.isfinite(data)
    clean = np.where(finite, data, 0.0).astype(np.float64)
    padded = np.zeros((sx * step, sy * step, Z), dtype=np.float64)
    padded[:X, :Y] = clean
    small = padded.reshape(sx, step, sy, step, Z).mean(axis=(1, 3))
    small = _box3_inplane(small)
    body = fill_holes_inplane(small > otsu_threshold(small.ravel()))
    if not body.any():
        raise InputError(f"--roi auto found no body in {volume.source}; give --mask or --bbox")
    xs = np.nonzero(body.any(axis=(1, 2)))[0]
    cx = (xs.min() + xs.max()) / 2.0
    zs = np.nonzero(body.any(axis=(0, 1)))[0]
    z_lo = zs.min() + (zs.max() - zs.min() + 1) // 4
    interior = body.copy()
    for _ in range(max(1, int(round(ERODE_FRACTION * (xs.max() - xs.min() + 1))))):
        interior = _erode(interior)
    ruq = interior.copy()
    ruq[: int(np.ceil(cx)), :, :] = False
    ruq[:, :, :z_lo] = False
    if not ruq.any():
        raise InputError(f"--roi auto found no right upper abdomen in {volume.source}; give --mask or --bbox")
    upper = ruq.copy()
    upper[:, :, : zs.min() + (zs.max() - zs.min() + 1) // 2] = False
    vals = small[upper if upper.any() else ruq]
    t_liver = otsu_threshold(vals)
    rim = body & ~_erode(_erode(body))
    fat_level = float(np.percentile(small[rim], 75))
    cand = ruq & (small > t_liver)
    soft = vals[(vals > t_liver) & (vals < fat_level)]
    if soft.size:  # fat brighter than liver (T1): keep what is nearer the liver's level
        cand &= small < (float(np.median(soft)) + fat_level) / 2.0
    eroded = _erode(cand)
    comp = largest_component(eroded if eroded.any() else cand)
    comp = _dilate(comp) & body
    if not comp.any():
        raise InputError(f"--roi auto found no liver-like region in {volume.source}; give --mask or --bbox")
    full = np.repeat(np.repeat(comp, step, axis=0), step, axis=1)[:X, :Y, :]
    return np.ascontiguousarray(full)


def resolve_region(volume: Volume, *, mask=None, mask_label: int | None = None, bbox=None, roi: str | None = None) -> np.ndarray:
    """Exactly one of mask / bbox / roi='auto' -> bool region on the canonical grid."""
    given = [name for name, v in (("--mask", mask), ("--bbox", bbox), ("--roi", roi)) if v is not None]
    if len(given) != 1:
        raise InputError(
            "give exactly one liver region: --mask FILE, --bbox x0,y0,z0,x1,y1,z1 or --roi auto"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    if mask_label is not None and mask is None:
        raise InputError("--mask-label needs --mask")
    if mask is not None:
        return region_from_mask(volume, mask, label=mask_label)
    if bbox is not None:
        return region_from_bbox(volume, bbox)
    if str(roi).lower() != "auto":
        raise InputError(f"--roi must be 'auto', got {roi!r}")
    return region_auto(volume)
