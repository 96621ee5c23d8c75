"""Is the volume an MR image at all? A volume-level check on its raw intensities, beside the crop gate.

The crops are normalised over the liver region (runtime/crops.py), so the crop gate
(runtime/ood.py) sees a CT's liver only as texture, and a CT of a liver that looks enough like the
training crops would pass it (measured on 15 phantoms whose intensities were mapped to Hounsfield
units with CT-like noise: all flagged, but with volume scores down to 1.04, a thin margin). A CT
carries its own signature in the raw values, though: air is about -1000 HU (outside the body, in
the lung bases and the bowel), and a CT's field of view holds a lot of it, while an MR magnitude
image is never negative (its noise floor is about 0) and a z-scored MR stays within a few units of
0. So a volume with at least AIR_SHARE of its voxels at or below AIR_LEVEL looks like a CT in
Hounsfield units (or an MR phase map, which is not what the model stages either), and its answer
is `uncertain`. DICOM input is already refused unless its modality is MR
(runtime/dicom_study.py); NIfTI has no modality, and this is what covers it.
"""

from __future__ import annotations

import numpy as np

from .io import Volume

# Hounsfield units: air -1000, lung about -850, fat about -100, water 0, soft tissue 20-80. Half
# way from air to water is below every tissue and above air with any CT noise.
AIR_LEVEL = -500.0
# An abdominal CT's field of view holds far more air than this (outside the body alone is usually a
# fifth or more of the voxels, and scanners pad outside the reconstruction circle at -1024 or
# lower); an MR magnitude image holds none.
AIR_SHARE = 0.01
SLAB_SLICES = 16  # counted slab by slab: no temporary the size of the volume


def air_share(volume: Volume) -> float:
    """The share of the volume's voxels at or below AIR_LEVEL (0.0 for an MR magnitude image)."""
    data = volume.data
    if data.size == 0:
        return 0.0
    count = 0
    for start in range(0, data.shape[2], SLAB_SLICES):
        count += int(np.count_nonzero(np.asarray(data[:, :, start:start + SLAB_SLICES]) <= AIR_LEVEL))
    return count / data.size


def air_reason(share: float | None) -> str | None:
    """The reason a volume with this air share is uncertain, or None (below AIR_SHARE, or not measured)."""
    if share is None or share < AIR_SHARE:
        return None
    return (f"{share:.1%} of its voxels are at or below {AIR_LEVEL:g}, as air is in a CT's Hounsfield units, "
            "and an MR magnitude image has no such values: not MR like the training data, so the stage is not reliable")
