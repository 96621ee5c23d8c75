"""A phantom volume as a classic single-frame DICOM MR series, as a scanner would send it.

THE PIXELS ARE A SYNTHETIC PHANTOM, NOT A PATIENT (PatientName says so). The series exists so
that the DICOM paths (network node, series rules, readers) are exercised on data with a liver
in it, without patient data.

Geometry: the volume is reoriented to closest canonical (RAS+) and each axial slice becomes one
instance, written the way scanners write axial series: rows run from the patient's right to left
and columns from anterior to posterior (ImageOrientationPatient 1,0,0,0,1,0 in DICOM's LPS), and
ImagePositionPatient climbs from inferior to superior. `liverstage.runtime.dicom` reads it back
to the same canonical array bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from nibabel import orientations

PHANTOM_PATIENT_NAME = "PHANTOM^NOT A PATIENT"


def series_from_volume(data: np.ndarray, affine: np.ndarray, *, study_uid: str | None = None,
                       series_uid: str | None = None, series_number: int = 1,
                       description: str = "AX T1 LIVER PHANTOM", patient_id: str = "PHANTOM",
                       transfer_syntax: str | None = None) -> list:
    """One pydicom Dataset per axial slice of `data` (3D, any stored orientation, `affine` to match).

    `transfer_syntax` defaults to Explicit VR Little Endian; RLE Lossless is encoded with pydicom's
    own encoder, other compressed syntaxes need the matching pydicom plugin.
    """
    import pydicom  # noqa: PLC0415  (pydicom is optional)
    from pydicom.dataset import FileMetaDataset  # noqa: PLC0415
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, UID, generate_uid  # noqa: PLC0415

    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    values = np.rint(np.asarray(data, dtype=np.float64))
    if values.min() < -32768 or values.max() > 32767:
        raise ValueError("phantom intensities do not fit int16")
    ornt = orientations.io_orientation(affine)
    canonical = orientations.apply_orientation(values, ornt).astype(np.int16)
    can_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape)
    # Flip x and y: voxel (i, j, k) of `lps` is canonical (X-1-i, Y-1-j, k).
    nx, ny, nz = canonical.shape
    lps = canonical[::-1, ::-1, :]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ can_affine @ flip
    col_step, row_step, slice_step = affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2]
    dc, dr = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    iop = [float(v) for v in np.concatenate([col_step / dc, row_step / dr])]
    thickness = float(np.linalg.norm(slice_step))

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    syntax = UID(transfer_syntax or ExplicitVRLittleEndian)
    out = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = PHANTOM_PATIENT_NAME
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = "20261201"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "liverstage phantom generator"
        ds.Modality = "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.PositionReferenceIndicator = ""
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 150.0
        ds.EchoTime = 2.3
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.SliceThickness = round(thickness, 6)
        ds.SpacingBetweenSlices = round(thickness, 6)
        ds.ImageOrientationPatient = [round(v, 6) for v in iop]
        ds.ImagePositionPatient = [round(float(v), 4) for v in affine_lps[:3, :3] @ [0, 0, k] + affine_lps[:3, 3]]
        ds.PixelSpacing = [round(dr, 6), round(dc, 6)]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(lps[:, :, k].T).tobytes()  # [rows = j, columns = i]
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        out.append(ds)
    return out


def write_series(datasets: Sequence, folder: str | Path) -> list[Path]:
    """Save each dataset as `folder/<SOPInstanceUID>.dcm` (DICOM file format, with file meta)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
