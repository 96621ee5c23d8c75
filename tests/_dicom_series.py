"""Write volumes as DICOM MR series for the tests (loaded by conftest's `dicom_series` fixture).

Every instance starts from the header of pydicom's real MR_small.dcm (a Toshiba MR slice) and
gets the geometry, pixels and UIDs of its slice. UIDs are derived from the arguments, so a
series written twice is the same series.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from liverstage.runtime.io import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def testdata(name: str) -> Path:
    """An installed pydicom / pydicom-data test file, never downloaded (pytest.skip if absent)."""
    import importlib.util  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    spec = importlib.util.find_spec("data_store")  # the pydicom-data package
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent / "data")
    for root in roots:
        if (root / name).exists():
            return root / name
    pytest.skip(f"{name} is not installed here (pydicom's test files or pydicom-data); not downloading it")


def _ds(values) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_series(folder: str | Path, data: np.ndarray, affine: np.ndarray, *, study_uid: str = "1.2.826.0.1.3680043.10.1",
                 series_number: int = 5, description: str = "AX T1 LIVER",
                 image_type=("ORIGINAL", "PRIMARY", "OTHER"), transfer_syntax: str = ExplicitVRLittleEndian,
                 series_uid: str | None = None, frame_of_reference_uid: str | None = None,
                 encode_kwargs: dict | None = None) -> list[Path]:
    """`data` [column, row, slice] (int16) with its RAS `affine` as one instance per slice.

    Files are named in REVERSE slice order, so sorting by name would be wrong.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(testdata("MR_small.dcm"))
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "DataSetTrailingPadding", "ImageComments"):
        if keyword in base:
            delattr(base, keyword)
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    r, c = col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)
    series_uid = series_uid or _uid(study_uid, series_number, description, transfer_syntax)
    frame_of_reference_uid = frame_of_reference_uid or _uid(study_uid, "frame of reference")
    n_cols, n_rows, n_slices = data.shape
    paths = []
    for k in range(n_slices):
        ds = copy.deepcopy(base)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(series_uid, k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = _ds(np.concatenate([r, c]).round(6))
        position = lps[:3, 3] + k * slice_step
        ds.ImagePositionPatient = _ds(position.round(4))
        ds.SliceLocation = format_number_as_ds(float(position[2].round(4)))
        ds.PixelSpacing = _ds([np.linalg.norm(row_step), np.linalg.norm(col_step)])
        ds.SliceThickness = ds.SpacingBetweenSlices = format_number_as_ds(float(np.linalg.norm(slice_step)))
        ds.Rows, ds.Columns = n_rows, n_cols
        pixels = np.ascontiguousarray(data[:, :, k].T.astype(np.int16))
        ds.PixelData = pixels.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, pixels, **(encode_kwargs or {}))
        path = folder / f"IM{n_slices - k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def volume_as_series(volume: Volume, folder: str | Path, **kwargs) -> list[Path]:
    """A canonical (RAS) volume as an axial series the way scanners store one.

    Rows run to the patient's posterior and columns to the patient's left (IOP 1\\0\\0\\0\\1\\0),
    so the stored grid is the canonical one flipped in x and y.
    """
    nx, ny, _ = volume.shape
    flip = np.array([[-1.0, 0, 0, nx - 1], [0, -1.0, 0, ny - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    data = np.rint(volume.data[::-1, ::-1, :]).astype(np.int16)
    return write_series(folder, data, volume.affine @ flip, **kwargs)


def legacy_enhanced(files, path: str | Path, *, series_number: int = 6) -> Path:
    """The classic `files` of one series as one Legacy Converted Enhanced MR instance (highdicom)."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage  # noqa: PLC0415

    datasets = [pydicom.dcmread(p) for p in files]
    series_uid = _uid(datasets[0].SeriesInstanceUID, "enhanced")
    image = LegacyConvertedEnhancedMRImage(datasets, series_uid, series_number, _uid(series_uid, 0), 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path)
    return Path(path)


def phantom_case(manifest: str | Path, index: int):
    """(volume path, mask path, Volume) of phantom `index` of a cohort manifest."""
    from liverstage.runtime.io import load_volume  # noqa: PLC0415
    from liverstage.runtime.manifest import read_manifest  # noqa: PLC0415

    row = read_manifest(manifest)[index]
    return row.image, row.mask, load_volume(row.image)


def real_distractors(folder: str | Path) -> dict[str, Path]:
    """One real study from pydicom's dicomdirtests/98892003, one subfolder per series.

    Study ...18148.0.1 holds a FAST LOCALIZER (series 1, sagittal), a 3-plane pilot (series 2,
    mixed orientations) and an angiography projection (series 700, DERIVED\\SECONDARY).
    """
    import shutil  # noqa: PLC0415

    root = testdata("dicomdirtests") / "98892003"
    parts = {"loc": ["MR1/5641"], "pilot": ["MR2/6273", "MR2/6605", "MR2/6935"],
             "proj": [f"MR700/{n}" for n in (4467, 4528, 4558, 4588, 4618, 4648, 4678)]}
    out = {}
    for name, files in parts.items():
        target = Path(folder) / name
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(root / f, target / Path(f).name)
        out[name] = target
    return out


REAL_STUDY_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.1"
