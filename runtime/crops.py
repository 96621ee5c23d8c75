"""THE preprocessing path: volume + liver region -> normalised square 2D crops.

Training, `liverstage crops` and `liverstage predict` all call `crops_for_volume` (or
`make_crops`), driven by one `PreprocessSpec`, so a model sees exactly what it was trained on.

Per axial slice (canonical z) whose region area is at least `min_area_fraction` of the largest
slice's: take the square bounding box of the region in that slice, grown by `box_margin` of its
side on every side, normalise intensities with percentiles taken inside the region over the
whole volume, less `percentile_inset` voxels along its in-plane edge (-> 0..1, clipped to
[clip_low, clip_high]; outside the image and non-finite voxels
outside the region read as clip_low, i.e. dark background), and resample to crop_size with a
triangle filter widened when shrinking (anti-aliased, like PIL's BILINEAR resize).

Bit-identical for the same anatomy in any stored axis order/flip: everything depends only on
the canonical array, sums run in a fixed order of elementwise numpy operations (no BLAS, whose
blocking could reorder them), and the canonical arrays always have one memory layout (Fortran
order, io._canonical), whatever the file's.

Crop images are shown as radiologists look at axial slices: rows run anterior (top) to
posterior, columns from the patient's right (left of the picture) to the patient's left.
`boxes` stay in canonical voxel coordinates (x0, y0, x1, y1), half-open.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import Volume, load_volume
from .laterality import region_side
from .roi import resolve_region
from .spec import PreprocessSpec


@dataclasses.dataclass(frozen=True, eq=False)
class CropSet:
    """Crops of one volume.

    images: float32 [N, 1, S, S]; slices: int64 [N] canonical z index; boxes: int64 [N, 4]
    (x0, y0, x1, y1) canonical in-plane voxel coordinates, half-open, square (may extend
    beyond the image); spacing: mm of the canonical axes; region_voxels: voxels in the region.
    """

    images: np.ndarray
    slices: np.ndarray
    boxes: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    region_voxels: int
    warnings: tuple[str, ...] = ()
    intensity_range: tuple[float, float] = (0.0, 1.0)  # raw values mapped to 0 and 1
    region_side: float | None = None  # the region's side of the body's midline (runtime/laterality.py)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@lru_cache(maxsize=64)
def _resample_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [n_out, K] and weights [n_out, K] of a triangle filter resampling n_in -> n_out.

    Pixel centres are aligned (half-pixel convention); when shrinking the triangle is widened
    by n_in / n_out so every input pixel contributes (anti-aliasing). Taps beyond the edge are
    dropped and the weights renormalised. Weights are >= 0 and sum to 1.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    first = np.floor(centers - support).astype(np.int64)
    k = int(np.ceil(2 * support)) + 2
    idx = first[:, None] + np.arange(k, dtype=np.int64)[None, :]
    w = 1.0 - np.abs((idx + 0.5 - centers[:, None]) / support)
    w = np.where((w > 0) & (idx >= 0) & (idx < n_in), w, 0.0)
    w /= w.sum(axis=1, keepdims=True)
    idx = np.clip(idx, 0, n_in - 1)
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


@lru_cache(maxsize=64)
def _packed_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """`_resample_taps` with each row's zero-weight taps dropped (order kept), padded with
    zero-weight taps to the longest row: upsampling needs 2 taps per output instead of 4.

    Exact for finite inputs: the sum starts at +0.0 and can never become -0.0, so adding a
    zero-weight term (+-0.0) never changed it."""
    idx, w = _resample_taps(n_in, n_out)
    nonzero = w != 0
    k = max(1, int(nonzero.sum(axis=1).max()))
    packed_idx = np.repeat(idx[:, :1], k, axis=1)
    packed_w = np.zeros((n_out, k), dtype=np.float64)
    for row in range(n_out):
        taps = np.nonzero(nonzero[row])[0]
        packed_idx[row, : len(taps)] = idx[row, taps]
        packed_w[row, : len(taps)] = w[row, taps]
    packed_idx.setflags(write=False)
    packed_w.setflags(write=False)
    return packed_idx, packed_w


def _resample(a: np.ndarray, n_out: int, *, axis: int, finite: bool) -> np.ndarray:
    """`a` (float64, 2D) resampled to n_out along `axis` (0 or 1): w0*a[i0] + w1*a[i1] + ..., taps
    in order, one elementwise multiply-add per tap (no BLAS, whose blocking could reorder sums).

    The sum starts at its first term; the plain sum's leading +0.0 is added once, by the caller,
    after the last pass (`_finish`): bit for bit the same result (the two can differ only in the
    sign of a zero, which adding +0.0 at the end makes +0.0, as the plain sum always gives)."""
    # With NaN/inf in `a`: every tap, so they spread exactly as in the plain sum.
    idx, w = (_packed_taps if finite else _resample_taps)(a.shape[axis], n_out)
    out = None
    for k in range(idx.shape[1]):
        if axis == 0:
            term = a[idx[:, k]]
            term *= w[:, k, None]
        else:
            term = a[:, idx[:, k]]
            term *= w[None, :, k]
        if out is None:
            out = term
        else:
            out += term
    return out


def _finish(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The plain sum's leading +0.0 (see `_resample`), written to `out` (any float dtype) if given."""
    return np.add(a, 0.0, out=out if out is not None else a)


def _resize_unfinished(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    a = np.ascontiguousarray(image, dtype=np.float64)
    finite = bool(np.isfinite(a).all())
    return _resample(_resample(a, rows, axis=0, finite=finite), cols, axis=1, finite=finite)


def resize2d(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Anti-aliased bilinear resize of a 2D float image to (rows, cols), float64, numpy only."""
    rows, cols = (size, size) if isinstance(size, (int, np.integer)) else size
    return _finish(_resize_unfinished(image, int(rows), int(cols)))


def _square_box(xs_lo: int, xs_hi: int, ys_lo: int, ys_hi: int, margin: float) -> tuple[int, int, int, int]:
    """Square box (half-open) around [xs_lo, xs_hi) x [ys_lo, ys_hi), grown by margin*side per side."""
    side = max(xs_hi - xs_lo, ys_hi - ys_lo)
    out = max(1, int(np.ceil(side * (1.0 + 2.0 * margin) - 1e-9)))
    x0 = (xs_lo + xs_hi - out) // 2
    y0 = (ys_lo + ys_hi - out) // 2
    return x0, y0, x0 + out, y0 + out


def _cut_normalised(slice2d: np.ndarray, box: tuple[int, int, int, int], lo: float, hi: float,
                    spec: PreprocessSpec, fill: float) -> np.ndarray:
    """The box of a [X, Y] slice, normalised (`_normalise`), `fill` (already normalised) where it
    leaves the image: the same values as normalising the cut box, in fewer passes over it."""
    x0, y0, x1, y1 = box
    out = np.full((x1 - x0, y1 - y0), fill, dtype=np.float64)
    X, Y = slice2d.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, X), min(y1, Y)
    if sx0 < sx1 and sy0 < sy1:
        window = out[sx0 - x0 : sx1 - x0, sy0 - y0 : sy1 - y0]
        window[...] = slice2d[sx0:sx1, sy0:sy1]
        _normalise_in_place(window, lo, hi, spec)
    return out


def _to_display(crop_xy: np.ndarray) -> np.ndarray:
    """[x, y] canonical -> [row, col]: anterior at the top, patient's right on the left."""
    return np.ascontiguousarray(crop_xy[::-1, ::-1].T)


def _normalise_in_place(values: np.ndarray, lo: float, hi: float, spec: PreprocessSpec) -> np.ndarray:
    """float64 `values` -> (v - lo) / (hi - lo), non-finite -> clip_low, clipped to the clip range."""
    values -= lo
    values /= hi - lo
    values[~np.isfinite(values)] = spec.clip_low
    return np.clip(values, spec.clip_low, spec.clip_high, out=values)


def _normalise(values: np.ndarray, lo: float, hi: float, spec: PreprocessSpec) -> np.ndarray:
    return _normalise_in_place(np.array(values, dtype=np.float64), lo, hi, spec)


def eroded_in_plane(region: np.ndarray, steps: int) -> np.ndarray:
    """The bool [X, Y, Z] region less `steps` voxels along its in-plane edge: each step keeps a
    voxel whose four in-plane neighbours are all in the region (outside the array counts as
    outside the region), as scipy.ndimage.binary_erosion with a 4-neighbour cross per slice.
    Computed inside the region's bounding box (the liver's, a fraction of the volume)."""
    if steps == 0:
        return region.copy()
    out = np.zeros_like(region)
    if not region.any():
        return out
    footprint = region.any(axis=2)  # [X, Y], one pass over the slices: 3x faster than two reductions over (x|y, z)
    x = np.nonzero(footprint.any(axis=1))[0]
    y = np.nonzero(footprint.any(axis=0))[0]
    z = np.nonzero(region.any(axis=(0, 1)))[0]
    box = (slice(x[0], x[-1] + 1), slice(y[0], y[-1] + 1), slice(z[0], z[-1] + 1))
    core = np.array(region[box], order="F")  # one memory layout for every operand: 4x faster
    for _ in range(steps):
        inner = core.copy(order="F")
        inner[1:] &= core[:-1]
        inner[:-1] &= core[1:]
        inner[:, 1:] &= core[:, :-1]
        inner[:, :-1] &= core[:, 1:]
        # The box's edge rows touch the outside of the region (or of the array): never interior.
        inner[0] = inner[-1] = False
        inner[:, 0] = inner[:, -1] = False
        core = inner
    out[box] = core
    return out


def percentile_region(region: np.ndarray, inset: int) -> np.ndarray:
    """The voxels whose intensities set the normalisation (PreprocessSpec.percentile_inset): the
    region less `inset` in-plane voxels along its edge, or the region itself when that keeps
    less than half of it (a thin region is mostly edge; its percentiles then come from all of it)."""
    if inset == 0:
        return region
    core = eroded_in_plane(region, inset)
    return core if 2 * int(np.count_nonzero(core)) >= int(np.count_nonzero(region)) else region


def make_crops(volume: Volume, region: np.ndarray, spec: PreprocessSpec) -> CropSet:
    """Crops of `volume` over the bool `region` (canonical grid) as `spec` says."""
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
    region = np.asarray(region)
    if region.shape != volume.data.shape:
        raise InputError(f"liver region has shape {region.shape} but the volume {volume.source} has {volume.data.shape}")
    region = np.asfortranarray(region, dtype=bool)  # the volume's layout (io._canonical): slices contiguous
    n_region = int(np.count_nonzero(region))
    if n_region == 0:
        raise InputError(f"the liver region of {volume.source} is empty")
    data = volume.data
    # The region's voxels in memory order (both Fortran-ordered): the count and the percentiles
    # below do not depend on the order, and a C-order walk over these arrays took twice as long.
    inside = data.ravel(order="K")[region.ravel(order="K")] if data.flags.f_contiguous else data[region]
    bad = int(np.count_nonzero(~np.isfinite(inside)))
    if bad:
        raise InputError(f"{bad} non-finite voxel(s) (NaN/inf) inside the liver region of {volume.source}")
    core = percentile_region(region, spec.percentile_inset)
    if core is not region:
        inside = data.ravel(order="K")[core.ravel(order="K")] if data.flags.f_contiguous else data[core]
    lo, hi = (float(v) for v in np.percentile(inside.astype(np.float64), [spec.percentile_low, spec.percentile_high]))
    if not hi > lo:
        raise InputError(
            f"intensities inside the liver region of {volume.source} are constant ({lo:g}) between the "
            f"{spec.percentile_low:g} and {spec.percentile_high:g} percentiles; cannot normalise"
        )
    x_any, y_any = region.any(axis=1), region.any(axis=0)  # the region's in-plane extent per slice, in one pass each
    areas = np.add.reduce(region.reshape(-1, region.shape[2], order="F").view(np.uint8), axis=0, dtype=np.uint32).astype(np.int64)
    keep = np.nonzero((areas > 0) & (areas >= spec.min_area_fraction * float(areas.max())))[0]
    fill_raw = lo + spec.clip_low * (hi - lo)
    fill = float(_normalise(np.array([fill_raw]), lo, hi, spec)[0])  # what the box's outside normalises to (~clip_low)
    size = spec.crop_size
    images = np.empty((len(keep), 1, size, size), dtype=np.float32)
    boxes = []
    for i, z in enumerate(keep):
        xs = np.nonzero(x_any[:, z])[0]
        ys = np.nonzero(y_any[:, z])[0]
        box = _square_box(int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1, spec.box_margin)
        crop = _to_display(_cut_normalised(data[:, :, z], box, lo, hi, spec, fill))
        _finish(_resize_unfinished(crop, size, size), out=images[i, 0])  # float64 sums, rounded once to float32
        boxes.append(box)
    return CropSet(
        images=images,
        slices=np.asarray(keep, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        spacing=tuple(volume.spacing),  # type: ignore[arg-type]
        source=volume.source,
        region_voxels=n_region,
        warnings=tuple(volume.warnings),
        intensity_range=(lo, hi),
        region_side=region_side(volume, region),
    )


def crops_for_volume(
    volume_or_path: Volume | str | Path,
    *,
    spec: PreprocessSpec,
    mask=None,
    mask_label: int | None = None,
    bbox=None,
    roi: str | None = None,
    frame: int | None = None,
) -> CropSet:
    """THE one entry point: load (if a path), find the liver region, make crops.

    Exactly one of `mask` (file path; `mask_label` picks a label, default any non-zero),
    `bbox` ((x0, y0, z0, x1, y1, z1) in the original file's voxel coordinates, half-open, or the
    same as a comma-separated string) or `roi="auto"` must be given.
    """
    if isinstance(volume_or_path, Volume):
        volume = volume_or_path
        if frame is not None:
            raise InputError("frame applies only when loading from a path")
    else:
        volume = load_volume(volume_or_path, frame=frame)
    region = resolve_region(volume, mask=mask, mask_label=mask_label, bbox=bbox, roi=roi)
    return make_crops(volume, region, spec)


def normalise_image2d(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A pre-cut 2D crop [H, W] (or [H, W, 3|4] colour) -> float32 [1, S, S].

    Percentiles are taken over the whole image (a pre-cut crop has no region), then the same
    clip and anti-aliased resize as volume crops; a non-square image is stretched to square.
    The image is used as given (rows/columns as displayed).
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[:, :, 0] if a.shape[2] == 1 else a[:, :, :3].astype(np.float64).mean(axis=2)
    if a.ndim != 2 or min(a.shape) < 1:
        raise InputError(f"a 2D crop must be [H, W] (or [H, W, 3]), got shape {np.shape(image)}")
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        raise InputError("a 2D crop has non-finite pixels")
    lo, hi = (float(v) for v in np.percentile(a, [spec.percentile_low, spec.percentile_high]))
    if not hi > lo:
        raise InputError(f"a 2D crop is constant ({lo:g}); cannot normalise")
    out = resize2d(_normalise(a, lo, hi, spec), spec.crop_size)
    return out.astype(np.float32)[None, :, :]
