"""Geometry of a DICOM series from its headers alone: per-frame planes, orientation, slice order.

Both the series rules (`dicom_study.series_verdict`, headers only) and the reader
(`dicom.read_dicom_series`) go through `series_geometry`, so a series that the listing calls
stageable is one the reader can stack, and a refusal names the same problem in both places.

Where the geometry lives (DICOM PS3.3 C.7.6.2 and C.7.6.16):
- classic single-frame images: ImagePositionPatient, ImageOrientationPatient, PixelSpacing at
  the top level of each instance;
- enhanced and legacy converted enhanced multi-frame images: per frame in the functional groups
  (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence), each looked up in
  the frame's PerFrameFunctionalGroupsSequence item first, then in SharedFunctionalGroupsSequence.

ImageOrientationPatient = (row cosine r, column cosine c): r points along increasing column
index, c along increasing row index; the slice normal is n = r x c, in DICOM's LPS patient
coordinates. Slices are ordered by their position projected on n (increasing).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

# A series is called axial, coronal or sagittal when its slice normal is within this angle of
# the patient's superior-inferior, anterior-posterior or left-right axis; otherwise oblique.
PLANE_TOLERANCE_DEG = 15.0
# Two orientations are the same when both direction cosines agree to this cosine similarity
# (highdicom's `orientation_tol` has the same meaning): 1e-4 is about 0.8 degrees.
ORIENTATION_TOL = 1e-4
# Slice gaps may differ from their median by this fraction (highdicom's default rtol).
GAP_RTOL = 0.01
# The stacking direction may differ from the slice normal by this much (1 - cosine).
PERPENDICULAR_TOL = 1e-3

_AXES = (("sagittal", np.array([1.0, 0.0, 0.0])), ("coronal", np.array([0.0, 1.0, 0.0])),
         ("axial", np.array([0.0, 0.0, 1.0])))


@dataclasses.dataclass(frozen=True)
class Frame:
    """One image plane: where it is, how it is oriented, and which instance/frame holds it."""

    label: str                 # file name (or instance number) for messages
    where: str                 # the label, plus "frame k" inside a multi-frame instance
    index: int                 # instance index in the series' header list
    frame: int                 # 0-based frame number inside that instance
    position: np.ndarray       # IPP, mm, LPS
    orientation: np.ndarray    # IOP (6)
    spacing: np.ndarray        # PixelSpacing (between rows, between columns), mm
    shape: tuple[int, int]     # (Rows, Columns)


@dataclasses.dataclass(frozen=True)
class SeriesGeometry:
    """A checked, evenly spaced stack of parallel planes."""

    orientation: str           # axial | coronal | sagittal | oblique
    tilt_deg: float            # angle between the slice normal and the patient's z axis
    frames: tuple[Frame, ...]  # in slice order (increasing position along the normal)
    slice_gap: float           # mm between neighbouring slices (0 for a single slice)

    @property
    def n_slices(self) -> int:
        return len(self.frames)


def label_of(ds, index: int) -> str:
    """How messages name an instance: its file name, else its instance number or position."""
    filename = getattr(ds, "filename", None)
    if isinstance(filename, (str, Path)) and str(filename):
        return Path(filename).name
    number = ds.get("InstanceNumber")
    return f"instance {number}" if number not in (None, "") else f"instance #{index + 1}"


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in (value if hasattr(value, "__len__") and not isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        return None
    if len(values) != n:
        return None
    return np.asarray(values, dtype=np.float64)


def _attribute(item, sequence: str, keyword: str):
    seq = item.get(sequence) if item is not None else None
    if not seq:
        return None
    return seq[0].get(keyword)


def _checked(value, keyword: str, n: int, where: str) -> np.ndarray:
    arr = _floats(value, n)
    if arr is None:
        raise InputError(f"{where} has no valid {keyword} (missing geometry)")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{where} has a non-finite {keyword} {arr.tolist()}")
    return arr


def _frame(ds, index: int, frame: int, n_frames: int, ipp, iop, spacing, label: str) -> Frame:
    where = label if n_frames == 1 else f"{label} frame {frame + 1}"
    position = _checked(ipp, "ImagePositionPatient", 3, where)
    orientation = _checked(iop, "ImageOrientationPatient", 6, where)
    pixel_spacing = _checked(spacing, "PixelSpacing", 2, where)
    if np.any(pixel_spacing <= 0):
        raise InputError(f"{where} has a non-positive PixelSpacing {pixel_spacing.tolist()}")
    r, c = orientation[:3], orientation[3:]
    if not (abs(np.linalg.norm(r) - 1) < 1e-3 and abs(np.linalg.norm(c) - 1) < 1e-3 and abs(r @ c) < 1e-3):
        raise InputError(f"{where}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise InputError(f"{label} has no Rows/Columns")
    return Frame(label=label, where=where, index=index, frame=frame, position=position, orientation=orientation,
                 spacing=pixel_spacing, shape=(int(rows), int(cols)))


def frames_of(ds, index: int = 0) -> list[Frame]:
    """Every plane of one instance (classic: one; multi-frame: one per frame); InputError if absent."""
    label = label_of(ds, index)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InputError(f"{label} has an invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if per_frame is None and shared is None:
        if n_frames > 1:
            raise InputError(f"{label} has {n_frames} frames but no functional groups with their positions "
                             "(missing geometry)")
        return [_frame(ds, index, 0, 1, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                       ds.get("PixelSpacing"), label)]
    if per_frame is None or len(per_frame) != n_frames:
        found = 0 if per_frame is None else len(per_frame)
        raise InputError(f"{label} has {n_frames} frames but {found} PerFrameFunctionalGroupsSequence items")

    def lookup(item, sequence: str, keyword: str):
        value = _attribute(item, sequence, keyword)
        return value if value is not None else _attribute(shared, sequence, keyword)

    return [_frame(ds, index, k, n_frames,
                   lookup(item, "PlanePositionSequence", "ImagePositionPatient"),
                   lookup(item, "PlaneOrientationSequence", "ImageOrientationPatient"),
                   lookup(item, "PixelMeasuresSequence", "PixelSpacing"), label)
            for k, item in enumerate(per_frame)]


def normal_of(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def plane_of(orientation: np.ndarray) -> tuple[str, float]:
    """(axial | coronal | sagittal | oblique, angle in degrees between the normal and patient z)."""
    n = normal_of(orientation)
    tilt = math.degrees(math.acos(min(1.0, abs(float(n[2])))))
    for name, axis in _AXES:
        if math.degrees(math.acos(min(1.0, abs(float(n @ axis))))) <= PLANE_TOLERANCE_DEG:
            return name, tilt
    return "oblique", tilt


def same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[:3] @ b[:3] >= 1.0 - ORIENTATION_TOL and a[3:] @ b[3:] >= 1.0 - ORIENTATION_TOL)


def orientation_groups(frames: Sequence[Frame]) -> list[list[Frame]]:
    """Frames grouped by orientation (first-seen order)."""
    groups: list[list[Frame]] = []
    for f in frames:
        for g in groups:
            if same_orientation(g[0].orientation, f.orientation):
                g.append(f)
                break
        else:
            groups.append([f])
    return groups


def describe_planes(frames: Sequence[Frame]) -> str:
    """axial | coronal | sagittal | oblique for one orientation, 'mixed' for several."""
    groups = orientation_groups(frames)
    if len(groups) > 1:
        return "mixed"
    return plane_of(groups[0][0].orientation)[0]


def series_geometry(headers: Sequence) -> SeriesGeometry:
    """Check that the headers of one series form an evenly spaced stack; InputError naming the problem.

    Refused: missing or non-finite geometry, several orientations (a 3-plane pilot), frames of
    another size or pixel spacing, another frame of reference, duplicate positions (several
    stacks or time points), uneven gaps (a missing slice), slices not stacked along their normal.
    """
    if not headers:
        raise InputError("no DICOM images in the series")
    frames = [f for i, ds in enumerate(headers) for f in frames_of(ds, i)]
    refs = {str(ds.get("FrameOfReferenceUID", "")) for ds in headers}
    if "" in refs:
        missing = next(label_of(ds, i) for i, ds in enumerate(headers) if not ds.get("FrameOfReferenceUID"))
        raise InputError(f"{missing} has no FrameOfReferenceUID (missing geometry)")
    if len(refs) > 1:
        raise InputError(f"the instances are in {len(refs)} frames of reference")
    groups = orientation_groups(frames)
    if len(groups) > 1:
        planes = sorted({plane_of(g[0].orientation)[0] for g in groups})
        raise InputError(f"mixed orientations: {len(groups)} planes ({', '.join(planes)}), e.g. "
                         f"{groups[0][0].label} and {groups[1][0].label}")
    first = frames[0]
    for f in frames[1:]:
        if f.shape != first.shape:
            raise InputError(f"{f.label} is {f.shape[0]}x{f.shape[1]}, {first.label} is {first.shape[0]}x{first.shape[1]}")
        if not np.allclose(f.spacing, first.spacing, rtol=1e-6, atol=1e-6):
            raise InputError(f"{f.label} has another PixelSpacing ({f.spacing.tolist()}) than {first.label} "
                             f"({first.spacing.tolist()})")
    orientation, tilt = plane_of(first.orientation)
    normal = normal_of(first.orientation)
    along = np.array([f.position @ normal for f in frames])
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    if len(frames) == 1:
        return SeriesGeometry(orientation=orientation, tilt_deg=tilt, frames=tuple(frames), slice_gap=0.0)
    gaps = np.diff(along)
    tiny = 1e-3 * float(first.spacing.min())
    dup = np.flatnonzero(gaps < tiny)
    if dup.size:
        i = int(dup[0])
        raise InputError(f"duplicate positions: {frames[i].where} and {frames[i + 1].where} are at the same "
                         f"position ({int(np.sum(gaps < tiny))} duplicates; several stacks or time points?)")
    # A missing slice makes one gap larger, so the smallest gap is the nominal one.
    smallest = float(gaps.min())
    bad = np.flatnonzero(gaps - smallest > GAP_RTOL * smallest)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"slice gap: {gaps[i]:.4g} mm between {frames[i].where} and {frames[i + 1].where}, "
                         f"elsewhere {smallest:.4g} mm (missing slice?)")
    median = float(np.median(gaps))
    stack = frames[-1].position - frames[0].position
    if float(stack @ normal) / float(np.linalg.norm(stack)) < 1.0 - PERPENDICULAR_TOL:
        raise InputError("the slices are not stacked along their normal (sheared stack)")
    return SeriesGeometry(orientation=orientation, tilt_deg=tilt, frames=tuple(frames), slice_gap=median)
