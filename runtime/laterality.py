"""Which side of the body the liver region lies on: a volume-level check beside the crop gate.

The crop-level gate (runtime/ood.py) cannot see a liver on the wrong side: a crop of a liver
mirrored left-right looks like a crop of a liver (measured: 0 of 6 mirrored phantoms flagged,
benchmarks/ood_heldout.py). The models were trained without flips (train/data.py), on livers in
the patient's right upper abdomen, so a region on the patient's left means the file's
orientation is flipped (a converter or header error) or the anatomy is one the model never saw
(situs inversus). Either way its stage is not to be trusted, and the answer is `uncertain`.

The measure, on the canonical (RAS+) grid where axis 0 runs from the patient's left to right:
over the slices that hold the region, the body is the voxels above Otsu's threshold of those
slices (on a grid of about `GRID_COLUMNS` columns: the extent, not the outline, counts); the region's
side is (its centroid x - the body's centroid x) / half the body's 2-98 % x extent, positive on
the patient's right. It is None, and nothing is judged, when the body fills much of an x edge of
the field of view (`EDGE_FILL`: then its midline is not known, as in a field of view cut to the
liver or noise that fills the image) or there is no body at all. Measured on phantoms (synthetic,
not patients) by benchmarks/laterality_eval.py: 100 of seed 9000001 at 96 px, 60 of seed 0 at
128 px and 20 of seed 5 at 224 px gave +0.12 to +0.36 (2 of 180 not judged, none flagged), their
mirrored copies -0.36 to -0.12 (178 of 180 flagged, 2 not judged); 1-4 ms per volume of 96 to
512 px in-plane. On real abdomens the liver's centroid lies further right (the right lobe holds
most of its volume); a liver whose left lobe has grown and right lobe shrunk (advanced cirrhosis)
moves it toward the midline, and one past it is flagged: a person then looks, which is the point.
"""

from __future__ import annotations

import numpy as np

from .io import Volume
from .roi import otsu_threshold

# The region's side below which it is on the patient's left: the midline itself. A normal liver's
# centroid is well right of it; one to its left is a flipped file or anatomy the model never saw.
LEFT_OF_MIDLINE = 0.0
# A body that fills more than this fraction of an edge column's (y, z) plane is cut off heavily
# there (a field of view cut to the liver), and its midline is not known. A body cut a little (its
# flank at the edge) moves the midline estimate a little toward the visible side: with this test
# switched off, none of 100 phantoms at 96 px (seed 9000001) was flagged.
EDGE_FILL = 0.25
# The body and the region are read on a grid of about this many columns in-plane (every n-th
# voxel): the side needs the body's extent, not its outline, and one column of such a grid is 1/50
# of a half body width, a sixth of the narrowest margin measured. Otsu's threshold is taken on an
# even sample of at most OTSU_SAMPLE of the grid's voxels.
GRID_COLUMNS = 100
OTSU_SAMPLE = 1 << 16


def _column_profile(mask: np.ndarray) -> np.ndarray:
    """Voxels of a bool [X, Y, Z] mask per x column (float64)."""
    return np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1).astype(np.float64)


def region_side(volume: Volume, region: np.ndarray) -> float | None:
    """The region's side of the body's midline, in half body widths (+ the patient's right), or
    None where the midline cannot be told (module docstring)."""
    zs = np.nonzero(region.any(axis=(0, 1)))[0]
    if len(zs) == 0:
        return None
    step = max(1, int(round(max(region.shape[:2]) / GRID_COLUMNS)))
    slab = np.asarray(volume.data[::step, ::step, zs], dtype=np.float32)
    finite = np.isfinite(slab)
    values = slab.ravel() if finite.all() else slab[finite]
    if values.size == 0:
        return None
    # The body-air split does not need every voxel; the histogram of all of them was 2.5-2.8 ms.
    body = slab > otsu_threshold(values[:: -(-values.size // OTSU_SAMPLE)])
    body_columns = _column_profile(body)
    body_total = body_columns.sum()
    plane = float(body.shape[1] * body.shape[2])
    if body_total == 0 or max(body_columns[0], body_columns[-1]) > EDGE_FILL * plane:
        return None
    region_columns = _column_profile(region[::step, ::step, zs])
    region_total = region_columns.sum()
    if region_total == 0:  # a region narrower than the grid's step
        return None
    x = np.arange(len(body_columns), dtype=np.float64)
    cumulative = np.cumsum(body_columns) / body_total
    low, high = np.searchsorted(cumulative, [0.02, 0.98])  # the body's 2-98 % x extent, in columns
    half_width = (float(high) - float(low)) / 2.0
    if half_width <= 0:
        return None
    body_x = float(np.dot(x, body_columns) / body_total)
    region_x = float(np.dot(x, region_columns) / region_total)
    return (region_x - body_x) / half_width


def side_reason(side: float | None) -> str | None:
    """Why a volume is uncertain by its region's side, or None where the side is not against it."""
    if side is None or side >= LEFT_OF_MIDLINE:
        return None
    return (f"the liver region lies on the patient's left ({-side:.2f} half body widths left of the body's "
            "midline); the model was trained on livers on the right: the file's left-right orientation may be "
            "flipped, or the anatomy is one the model never saw (situs inversus), so the stage is not reliable")
