"""What the worker does to one complete series: decide, stage as `predict` does, write results.

Three seams, each one function, so the pieces other modules own plug in at one line:
- `series_verdict(headers)`: the rules that say whether a series is one to stage.
- `open_model(path, ...)`: the model, opened once per process with predict's backend options.
- `write_results(folder, ...)`: report.json, then the DICOM outputs (SR and secondary capture).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import write_json
from ..errors import InputError

log = logging.getLogger("liverstage.serve")

MIN_SLICES = 8
MAX_AXIAL_TILT_DEG = 30.0
LOCALIZER_WORDS = ("LOCALIZER", "SCOUT")


def _image_type(ds) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        return []
    if isinstance(value, str):
        return [value.upper()]
    return [str(v).upper() for v in value]


def series_verdict(headers: Sequence) -> tuple[bool, str]:
    """(True, "") if the series' headers are a series the rules stage, else (False, why not).

    The minimal rules: MR; ORIGINAL/PRIMARY; not a localizer or scout (image type or
    description); one orientation, axial within 30 degrees; at least MIN_SLICES instances.
    """
    if not headers:
        return False, "no instances"
    first = headers[0]
    modality = str(first.get("Modality", "") or "")
    if modality != "MR":
        return False, f"modality {modality or 'missing'}, not MR"
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in headers]
    if max(frames) > 1:
        return False, "enhanced (multi-frame) MR is not read by this version"
    image_type = _image_type(first)
    if image_type[:1] != ["ORIGINAL"] or image_type[1:2] != ["PRIMARY"]:
        return False, f"image type {'/'.join(image_type) or 'missing'}, not ORIGINAL/PRIMARY"
    description = str(first.get("SeriesDescription", "") or "").upper()
    for word in LOCALIZER_WORDS:
        if word in image_type or word in description:
            return False, f"a {word.lower()} (image type or description {word})"
    orientations = set()
    for ds in headers:
        iop = ds.get("ImageOrientationPatient")
        if iop is None or len(iop) != 6:
            return False, "an instance has no ImageOrientationPatient"
        orientations.add(tuple(round(float(v), 3) for v in iop))
    if len(orientations) > 1:
        return False, f"mixed orientations ({len(orientations)} in one series)"
    iop = np.asarray(next(iter(orientations)), dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-3:
        return False, "ImageOrientationPatient is not two independent directions"
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / norm))))
    if tilt > MAX_AXIAL_TILT_DEG:
        return False, f"not axial (slice normal {tilt:.0f} degrees from the body axis; limit {MAX_AXIAL_TILT_DEG:.0f})"
    if len(headers) < MIN_SLICES:
        return False, f"{len(headers)} slices, fewer than {MIN_SLICES}"
    return True, ""


def read_headers(paths: Sequence[Path]) -> list:
    """Every instance's header (no pixel data); InputError naming the first unreadable file."""
    import pydicom  # noqa: PLC0415

    headers = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001  (any parse error: the file is unusable)
            raise InputError(f"cannot read stored instance {path.name} ({type(exc).__name__}: {exc})") from None
    return headers


def open_model(model: str | Path, *, device: str = "auto", threads: int | None = None) -> tuple[object, dict]:
    """Open the model once for the process: (backend, the report's `model` entry)."""
    from ..backends import open_backend  # noqa: PLC0415
    from ..provenance import file_sha256  # noqa: PLC0415

    path = Path(model)
    backend = open_backend(path, device=device, threads=threads)
    info = {"path": str(path.resolve()), "sha256": file_sha256(path),
            "backend": backend.name, "precision": backend.precision}
    return backend, info


def stage_series(predictor, series_dir: Path) -> dict:
    """Stage the series folder exactly as `liverstage predict DIR` does; its report (same schema).

    InputError (one line) if the series cannot be staged.
    """
    from ..report import build_report  # noqa: PLC0415

    run = predictor.run([series_dir])
    if run.errors:
        raise InputError(run.errors[0][1])
    return build_report(run)


def write_results(folder: Path, *, report: dict, series_files: Sequence[Path]) -> list[Path]:
    """Write the results of one series into `folder` (a fresh temporary folder); the files written.

    The DICOM outputs (SR and secondary capture, sent to the PACS) join report.json here:
    `write_dicom_results(folder, series_files=..., result=report["results"][0], model=report["model"], ...)`.
    """
    write_json(folder / "report.json", report)
    return [folder / "report.json"]
