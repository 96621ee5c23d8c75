"""A folder holding one DICOM MR series -> Volume (pydicom; optional dependency).

Geometry (DICOM PS3.3 C.7.6.2, as nibabel's DICOM orientation notes explain it):
- ImageOrientationPatient = (row cosine r, column cosine c): r points along increasing column
  index, c along increasing row index. PixelSpacing = (spacing between rows, between columns).
- Slices are sorted by their ImagePositionPatient projected on the slice normal n = r x c, and
  must share orientation, pixel spacing and shape, and be evenly spaced.
- Voxel (i = column, j = row, k = slice) sits at IPP_0 + i*dc*r + j*dr*c + k*step, in DICOM's LPS
  patient coordinates; flipping the first two axes gives nibabel's RAS affine.
The array [i, j, k] and that affine go through the same canonical (RAS) path as a NIfTI file;
a `--bbox` for a series is given in this (column, row, slice in position order) grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

# Tolerances: DICOM stores decimal strings of ~6 significant digits.
_ORIENT_TOL = 1e-4
_SPACING_TOL = 1e-3
_GAP_REL_TOL = 0.01


def _import_pydicom():
    try:
        import pydicom  # noqa: PLC0415
    except ImportError:
        raise InputError("reading DICOM needs pydicom: pip install 'liverstage[dicom]'") from None
    return pydicom


def dicom_files(folder: Path) -> list:
    """Every readable DICOM image dataset in `folder` (not recursive); other files are ignored."""
    pydicom = _import_pydicom()
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001  (not DICOM, or unreadable: not part of a series)
            continue
        if "PixelData" in ds:
            ds.filename = str(path)
            datasets.append(ds)
    return datasets


def is_dicom_folder(folder: str | Path) -> bool:
    """True if `folder` holds at least one DICOM image (cheap: headers only, stops at the first)."""
    pydicom = _import_pydicom()
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001
            continue
        if "ImagePositionPatient" in ds or "Rows" in ds:
            return True
    return False


def _floats(ds, key: str, n: int, folder: Path) -> np.ndarray:
    value = ds.get(key)
    if value is None or len(value) != n:
        raise InputError(f"{folder}: DICOM file {Path(ds.filename).name} has no valid {key}")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one series: (data float32 [cols, rows, slices], RAS affine 4x4, warnings)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    datasets = dicom_files(folder)
    if not datasets:
        raise InputError(f"{folder}: no DICOM images found")
    series = sorted({str(ds.get("SeriesInstanceUID", "?")) for ds in datasets})
    if len(series) > 1:
        counts = [f"{uid} ({sum(str(d.get('SeriesInstanceUID', '?')) == uid for d in datasets)} files)" for uid in series]
        raise InputError(f"{folder}: holds {len(series)} DICOM series, expected one: {'; '.join(counts)}")
    frames = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if frames:
        raise InputError(f"{folder}: multi-frame (enhanced) DICOM is not supported: {Path(frames[0].filename).name}")

    first = datasets[0]
    orient = _floats(first, "ImageOrientationPatient", 6, folder)
    spacing = _floats(first, "PixelSpacing", 2, folder)
    shape = (int(first.Rows), int(first.Columns))
    for ds in datasets[1:]:
        name = Path(ds.filename).name
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, folder), orient, atol=_ORIENT_TOL):
            raise InputError(f"{folder}: inconsistent slices: {name} has another ImageOrientationPatient than {Path(first.filename).name}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, folder), spacing, atol=_SPACING_TOL):
            raise InputError(f"{folder}: inconsistent slices: {name} has another PixelSpacing than {Path(first.filename).name}")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise InputError(f"{folder}: inconsistent slices: {name} is {int(ds.Rows)}x{int(ds.Columns)}, "
                             f"{Path(first.filename).name} is {shape[0]}x{shape[1]}")

    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise InputError(f"{folder}: ImageOrientationPatient {orient.tolist()} is not two orthogonal unit vectors")
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, folder) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    datasets = [datasets[i] for i in order]
    positions, along = positions[order], along[order]

    warnings: list[str] = []
    if len(datasets) > 1:
        gaps = np.diff(along)
        names = [Path(ds.filename).name for ds in datasets]
        dup = np.flatnonzero(gaps < 1e-3 * max(float(spacing.min()), 1e-3))
        if dup.size:
            i = int(dup[0])
            raise InputError(f"{folder}: inconsistent slices: {names[i]} and {names[i + 1]} are at the same position")
        median = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - median) > _GAP_REL_TOL * median + 1e-3)
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{folder}: inconsistent slices: uneven gap {gaps[i]:.3g} mm between {names[i]} and "
                             f"{names[i + 1]} (others {median:.3g} mm); missing slice?")
        step = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        step = normal * thickness
        warnings.append("single-slice DICOM series")

    slices = []
    for ds in datasets:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # noqa: BLE001  (compressed without a decoder, truncated, ...)
            raise InputError(f"{folder}: cannot decode pixels of {Path(ds.filename).name} ({exc})") from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels * slope + intercept)
    # pixel_array is [rows, cols]; nibabel's order is [i = column, j = row, k = slice].
    data = np.stack([s.T for s in slices], axis=2)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * spacing[1]
    affine_lps[:3, 1] = col_cos * spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    return data, affine, warnings


def load_dicom_series(folder: str | Path):
    """Load a DICOM series folder as a canonical (RAS+) `Volume`, like `io.load_volume` a NIfTI file.

    The reorientation is the same pure transpose/flip (nibabel's closest canonical), so a series
    and the same data saved as NIfTI give the same crops.
    """
    from .io import volume_from_array  # noqa: PLC0415

    folder = Path(folder)
    data, affine, warnings = read_dicom_series(folder)
    return volume_from_array(data, affine, source=f"DICOM series {folder}", warnings=warnings)


def series_files(folder: str | Path) -> tuple[Path, ...]:
    """The image files `read_dicom_series` stacks from `folder`, in its slice order (headers only).

    DICOM results (runtime/dicom_out.py) cite these instances as their evidence.
    """
    pydicom = _import_pydicom()
    headers = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001  (not DICOM: not part of the series)
            continue
        if "Rows" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            headers.append((path, ds))
    if not headers:
        return ()
    orient = _floats(headers[0][1], "ImageOrientationPatient", 6, Path(folder))
    normal = np.cross(orient[:3], orient[3:])
    along = [float(_floats(ds, "ImagePositionPatient", 3, Path(folder)) @ normal) for _, ds in headers]
    return tuple(headers[i][0] for i in np.argsort(along, kind="stable"))
