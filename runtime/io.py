"""Load NIfTI volumes and masks into one canonical (RAS+) orientation.

Everything downstream (liver region, crops, training, predict) works on the canonical array,
so the same anatomy stored in any axis order or flip, with an affine to match, gives the same
array bit for bit: reorientation is a pure transpose/flip (nibabel's `as_closest_canonical`
logic), never a resampling. In the canonical array axis 0 runs from the patient's left to
right, axis 1 from posterior to anterior and axis 2 (axial slices) from inferior to superior.

Every bad input raises `InputError` with one line naming the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from . import nifti_check
from .errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in closest-canonical (RAS+) orientation.

    data: float32 [X, Y, Z], Fortran-ordered (each axial slice contiguous); axis 2 is axial, inferior -> superior.
    affine: 4x4 float64 voxel -> world (mm) of the canonical array.
    spacing: voxel size in mm along the canonical axes.
    original_shape / original_affine: as stored in the file (spatial part only).
    ornt: nibabel orientation array mapping original voxel axes to canonical ones (used to map a
        box given in the file's voxel coordinates and to reorient masks the same way).
    warnings: things the user should know but that did not stop loading (e.g. 4D frame choice).
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    ornt: np.ndarray
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def _open_nifti(path: str | Path, *, what: str) -> nib.Nifti1Image:
    """Open a NIfTI file through the integrity checks (runtime/nifti_check.py); one InputError line."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        raise InputError(f"{what} is a folder, expected a .nii or .nii.gz file: {p}")
    if not _is_nifti_name(p):
        raise InputError(f"{what} is not a NIfTI file (.nii or .nii.gz): {p}")
    try:
        return nifti_check.open_image(p, what=what)
    except OSError as exc:
        raise InputError(f"cannot read {what} {p} ({_why(exc)})") from None


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _read_array(img, path: Path, *, what: str, index: tuple = (), warnings: list[str] | None = None) -> np.ndarray:
    """Read (part of) the data with scaling applied, then check the rest of the file
    (nifti_check.finish: gzip CRC and length, size against the header); its warnings go to `warnings`."""
    found: list[str] = []
    try:
        with nifti_check.captured_warnings(found, Path(path).name):
            arr = np.asanyarray(img.dataobj[index] if index else img.dataobj)
    except (*nifti_check.stream_errors(), ValueError, MemoryError) as exc:
        nifti_check.close(img)
        raise InputError(f"cannot read the voxels of {what} {path} (truncated or corrupt file? {_why(exc)})") from None
    found = nifti_check.finish(img, path, what=what) + found
    if warnings is not None:
        warnings.extend(found)
    return np.asarray(arr)


def _check_affine(affine: np.ndarray, path: Path, *, what: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{what} {path} has a non-finite affine")
    lin = affine[:3, :3]
    scale = float(np.max(np.abs(lin)))
    # Relative test: a zero or rank-deficient direction matrix cannot be oriented.
    if scale == 0.0 or abs(float(np.linalg.det(lin))) <= 1e-6 * scale**3:
        raise InputError(f"{what} {path} has a singular or zero affine; cannot tell its orientation")
    return affine


def _spatial_shape(shape: tuple[int, ...], path: Path, *, what: str, frame: int | None) -> tuple[tuple[int, ...], tuple, list[str]]:
    """Decide which 3D part of the file to read: (3D shape, index for dataobj, warnings)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3:
        raise InputError(f"{what} {path} is {len(shape)}D with shape {shape}; a 3D volume is needed")
    extra = shape[3:]
    if len(shape) == 3:
        if frame not in (None, 0):
            raise InputError(f"--frame {frame} given but {what} {path} is 3D with shape {shape}")
        return shape, (), []
    if len(shape) > 4 and any(n != 1 for n in shape[4:]):
        raise InputError(f"{what} {path} has shape {shape}; only 3D volumes (or 4D with a chosen frame) are supported")
    n_frames = extra[0]
    tail = (0,) * (len(shape) - 4)
    if frame is None:
        if n_frames != 1:
            raise InputError(
                f"{what} {path} is 4D with shape {shape}; pick one of its {n_frames} frames with --frame N"
            )
        return shape[:3], (Ellipsis, 0) + tail if tail else (Ellipsis, 0), [
            f"{path.name}: 4D input with one frame, shape {shape}; used it as 3D"
        ]
    if not 0 <= frame < n_frames:
        raise InputError(f"--frame {frame} is outside the {n_frames} frames of {what} {path} (shape {shape})")
    index = (slice(None), slice(None), slice(None), frame) + tail
    return shape[:3], index, [f"{path.name}: 4D input with shape {shape}; used frame {frame}"]


def _canonical(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Pure transpose/flip into canonical order, as one Fortran-ordered array: every axial slice
    contiguous for the cropper, and the order NIfTI stores voxels in, so a file already in
    canonical orientation needs no copy (a C-ordered copy cost 4.6 ms of a 224 x 224 x 40 read)."""
    return np.asfortranarray(orientations.apply_orientation(arr, ornt))


def load_volume(path: str | Path, *, frame: int | None = None) -> Volume:
    """Load a NIfTI volume: scaling applied, closest-canonical (RAS+) orientation, float32.

    A 4D file is refused (naming its shape) unless its 4th axis has length 1 or `frame` picks
    one; either way the choice is recorded in `Volume.warnings`. A volume whose finite voxels
    are all equal (or that has none) is refused: nothing can be normalised from it. Non-finite
    voxels are allowed here; `make_crops` refuses them only inside the liver region.
    """
    p = Path(path)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or frame < 0):
        raise InputError(f"--frame must be a non-negative integer, got {frame!r}")
    img = _open_nifti(p, what="volume")
    shape3, index, warnings = _spatial_shape(img.shape, p, what="volume", frame=frame)
    affine = _check_affine(img.affine, p, what="volume")
    arr = _read_array(img, p, what="volume", index=index, warnings=warnings)
    if arr.dtype.kind == "c":
        raise InputError(f"volume {p} holds complex numbers; a magnitude image is needed")
    return volume_from_array(arr.reshape(shape3), affine, source=str(p), warnings=warnings)


def volume_from_array(arr: np.ndarray, affine: np.ndarray, *, source: str, warnings=()) -> Volume:
    """A 3D array + its voxel->world affine as a canonical (RAS+) float32 `Volume`.

    The one place that reorients: a pure transpose/flip (nibabel's closest canonical), so a
    NIfTI file, a DICOM series and any re-stored copy of the same data give the same crops.
    Refuses a volume whose finite voxels are all equal (or that has none).
    """
    ornt = orientations.io_orientation(affine)
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf: refused in the liver below
        data = _canonical(arr.astype(np.float32, copy=False), ornt)
    finite = np.isfinite(data)
    if not finite.any():
        raise InputError(f"volume {source} has no finite voxel")
    values = data[finite] if not finite.all() else data
    if float(values.min()) == float(values.max()):
        raise InputError(f"volume {source} is constant (every voxel is {float(values.min()):g}); nothing to stage")
    can_affine = affine @ orientations.inv_ornt_aff(ornt, arr.shape)
    spacing = tuple(float(v) for v in np.sqrt(np.sum(can_affine[:3, :3] ** 2, axis=0)))
    return Volume(
        data=data,
        affine=can_affine,
        spacing=spacing,  # type: ignore[arg-type]
        source=source,
        original_shape=tuple(int(n) for n in arr.shape),  # type: ignore[arg-type]
        original_affine=affine,
        ornt=ornt,
        warnings=tuple(warnings),
    )


def affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    """Same voxel->world mapping up to rounding in the header (1e-3 mm / 1e-4 relative)."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4, atol=1e-3))


def load_mask(path: str | Path, *, like: Volume, label: int | None = None) -> np.ndarray:
    """Load a label mask on the voxel grid of `like` -> bool array, canonical.

    The grids are compared in world space: the mask is reoriented to closest canonical on its
    own affine, so a mask stored in another axis order or flip than the volume (TotalSegmentator
    on a dcm2niix conversion of a DICOM series) applies, while a mask on any other grid (other
    shape, spacing, position or orientation) is refused: it would crop the wrong anatomy.
    label None means any non-zero voxel; otherwise voxels equal to `label` (float masks are
    rounded first). No voxel of the label is an InputError too.
    """
    p = Path(path)
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, np.integer))):
        raise InputError(f"--mask-label must be an integer, got {label!r}")
    img = _open_nifti(p, what="mask")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        shape3, index = shape[:3], (Ellipsis,) + (0,) * (len(shape) - 3)
    else:
        shape3, index = shape, ()
    if len(shape3) != 3:
        raise InputError(f"mask {p} has shape {shape}; a 3D mask is needed")
    affine = _check_affine(img.affine, p, what="mask")
    ornt = orientations.io_orientation(affine)
    canonical_shape = tuple(int(shape3[int(axis)]) for axis in np.argsort(ornt[:, 0]))
    if canonical_shape != like.shape:
        raise InputError(f"mask {p} has shape {shape} but the volume {like.source} has shape {like.original_shape} "
                         f"(compared after reorienting both to RAS: {canonical_shape} vs {like.shape})")
    if not affines_match(affine @ orientations.inv_ornt_aff(ornt, shape3), like.affine):
        raise InputError(f"mask {p} has a different affine (position/orientation) from the volume {like.source}, "
                         "even after reorienting both to RAS: it is on another voxel grid")
    arr = _read_array(img, p, what="mask", index=index).reshape(shape3)
    if arr.dtype.kind == "f":
        arr = np.where(np.isfinite(arr), np.rint(arr), 0)
    region = arr != 0 if label is None else arr == label
    if not region.any():
        which = "non-zero voxel" if label is None else f"voxel with label {label}"
        raise InputError(f"mask {p} has no {which}")
    return _canonical(region, ornt)
