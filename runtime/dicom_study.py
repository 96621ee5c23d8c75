"""DICOM study folders: find every series (headers only), decide which one to stage, load it.

A scanner or PACS export of one examination holds many series: localizers, 3-plane pilots,
several sequences, derived reformats and projections, sometimes one enhanced multi-frame file
per series. `series_verdict` holds THE rules for one series, applied in this order (the first
that fails is the reason given):
  1. modality MR, and an image (Rows/Columns);
  2. ImageType ORIGINAL\\PRIMARY (derived, reformatted and secondary images are not acquisitions);
  3. not a localizer or scout, by image type or by description (GE labels localizers
     ORIGINAL\\PRIMARY\\OTHER, with "LOCALIZER" only in the description);
  4. one enhanced instance, or single-frame instances only;
  5. one consistent geometry (`dicom_geometry.series_geometry`: present and finite, one
     orientation, one frame of reference, no duplicate positions, no gaps);
  6. axial: the slice normal within `PLANE_TOLERANCE_DEG` (15 degrees) of the patient's z axis;
  7. at least `MIN_SLICES` slices.
`select_series` picks the one series that passes, or the one `--series` names (MONAI Deploy's
DICOMSeriesSelectorOperator is the model: rules plus an explicit override); none or several is
an InputError listing them. A series the rules refuse is never staged, named or not.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

from .dicom import import_pydicom, load_dicom_series, lossy_reason, transfer_syntax
from .dicom_geometry import PLANE_TOLERANCE_DEG, describe_planes, frames_of, label_of, series_geometry
from .errors import InputError

MIN_SLICES = 8
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "SURVEY", "PILOT"})
LOCALIZER_DESCRIPTION = re.compile(
    r"locali[sz]er|locator|scout|survey|pilot|3[-_ ]?plane|tri[-_ ]?plane|\bloc\b|\bplan(ning)?\b", re.IGNORECASE)
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an image
_LISTED = 12  # series named in a one-line error before "... and N more"


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """One series as its headers describe it; `files` in slice order (instance order if unusable)."""

    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    description: str
    modality: str
    orientation: str                 # axial | coronal | sagittal | oblique | mixed | unknown (no geometry)
    n_instances: int
    n_frames: int
    transfer_syntaxes: tuple[str, ...]  # UIDs
    image_type: tuple[str, ...]
    files: tuple[Path, ...]
    stageable: bool
    reason: str                      # why it would, or would not, be staged
    lossy: bool = False              # LossyImageCompression 01 or a lossy transfer syntax

    @property
    def name(self) -> str:
        """How messages name the series: its number and description."""
        number = "?" if self.series_number is None else str(self.series_number)
        return f"{number} '{self.description}'" if self.description else number

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["files"] = [str(p) for p in self.files]
        out["transfer_syntaxes"] = list(self.transfer_syntaxes)
        out["image_type"] = list(self.image_type)
        return out


@dataclasses.dataclass(frozen=True)
class Study:
    """The series of one StudyInstanceUID found under `folder`: one input of `predict`."""

    folder: Path
    study_instance_uid: str
    series: tuple[SeriesInfo, ...]
    label: str                       # folder, plus the study UID when the folder holds several studies

    def __str__(self) -> str:
        return self.label

    @property
    def mask_stem(self) -> str:
        """The name `--mask-dir` looks for: the folder's name, or the study UID if it holds several."""
        return self.folder.name if self.label == str(self.folder) else self.study_instance_uid


# --- finding series ------------------------------------------------------------------------------

def _walk(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return found


def dicom_headers(folder: str | Path, *, recursive: bool = True) -> list:
    """The headers (pixel data deferred, not read) of every DICOM file under `folder`; other files are
    ignored, a damaged DICOM file is refused (InputError naming it)."""
    pydicom = import_pydicom()
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    headers = []
    for path in _walk(folder, recursive):
        try:
            # Every element is parsed, the large ones (pixel data) deferred: not read, but seen to be there.
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
            for _element in (*ds.file_meta, *ds):  # values are parsed lazily: a damaged one fails here, not later
                pass
        except Exception as exc:  # noqa: BLE001  (not DICOM: ignored; a damaged DICOM file: refused)
            if _has_dicom_preamble(path) or path.suffix.lower() in _DICOM_SUFFIXES:
                raise InputError(f"{folder}: {path.name} is a damaged DICOM file ({type(exc).__name__}); "
                                 "repair or remove it (a series missing it could be staged without a slice)") from None
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY:
            continue
        for key in ("StudyInstanceUID", "SeriesInstanceUID"):
            uid = str(ds.get(key, "") or "").strip()
            if not _UID.fullmatch(uid):
                what = f"an invalid {key} {uid[:70]!r}" if uid else f"no {key}"
                raise InputError(f"{folder}: DICOM file {path.name} has {what} (damaged?); repair or remove it")
        if _is_image_class(ds) and not any(k in ds for k in _PIXEL_KEYWORDS):
            raise InputError(f"{folder}: DICOM image file {path.name} has no pixel data (cut short?); "
                             "repair or remove it (a series missing it could be staged without a slice)")
        ds.filename = str(path)
        headers.append(ds)
    return headers


_DEFER_BYTES = 4096
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # a file named so that does not parse is a damaged DICOM file
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _is_image_class(ds) -> bool:
    """An instance of an image storage SOP class (MR, enhanced MR, CT, secondary capture, ...)."""
    pydicom = import_pydicom()
    try:
        return "Image Storage" in pydicom.uid.UID(str(ds.get("SOPClassUID", "") or "")).name
    except Exception:  # noqa: BLE001  (an unknown class: not known to be an image)
        return False


_UID = re.compile(r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*")  # PS3.5 9.1: digits and dots, at most 64 characters


def _has_dicom_preamble(path: Path) -> bool:
    """The DICOM file format's magic 'DICM' after the 128-byte preamble (PS3.10 7.1)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _image_type(ds) -> tuple[str, ...]:
    value = ds.get("ImageType")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in values)


def _series_number(ds) -> int | None:
    try:
        value = ds.get("SeriesNumber")
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _n_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _analyse(headers: Sequence):
    """(stageable, reason, geometry or None) for the headers of one series."""
    first = headers[0]
    modality = str(first.get("Modality", "") or "")
    if modality != "MR":
        return False, f"modality {modality or 'missing'}, not MR", None
    if not all(ds.get("Rows") and ds.get("Columns") for ds in headers):
        return False, "not an image (no Rows/Columns)", None
    for ds in headers:
        image_type = _image_type(ds)
        if image_type[:2] != ("ORIGINAL", "PRIMARY"):
            shown = "\\".join(image_type) or "missing"
            return False, f"image type {shown}: not ORIGINAL\\PRIMARY (derived or secondary)", None
        marked = LOCALIZER_IMAGE_TYPES.intersection(image_type)
        if marked:
            return False, f"localizer by image type ({sorted(marked)[0]})", None
    description = str(first.get("SeriesDescription", "") or "")
    if LOCALIZER_DESCRIPTION.search(description):
        return False, f"localizer or scout by its description '{description}'", None
    multi = [ds for ds in headers if _n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds]
    if multi and len(headers) > 1:
        return False, f"{len(headers)} instances with multi-frame ones among them; one enhanced instance is supported", None
    try:
        geometry = series_geometry(headers)
    except InputError as exc:
        return False, str(exc), None
    if geometry.orientation != "axial":
        return False, (f"{geometry.orientation} slices (normal {geometry.tilt_deg:.0f} degrees from the patient's "
                       f"z axis; axial means within {PLANE_TOLERANCE_DEG:g})"), geometry
    if geometry.n_slices < MIN_SLICES:
        return False, f"{geometry.n_slices} slices; at least {MIN_SLICES} are needed", geometry
    return True, (f"MR ORIGINAL\\PRIMARY, axial (tilt {geometry.tilt_deg:.1f} degrees), {geometry.n_slices} slices "
                  f"{geometry.slice_gap:.3g} mm apart"), geometry


def series_verdict(headers: Sequence) -> tuple[bool, str]:
    """THE rules (module docstring) for the headers of one series: (would be staged, why or why not)."""
    if not headers:
        return False, "no instances"
    stageable, reason, _ = _analyse(headers)
    return stageable, reason


def _orientation(headers: Sequence, geometry) -> str:
    if geometry is not None:
        return geometry.orientation
    try:
        frames = [f for i, ds in enumerate(headers) for f in frames_of(ds, i)]
    except InputError:
        return "unknown"
    return describe_planes(frames)


def _slice_order(headers: Sequence, geometry) -> list[Path]:
    if geometry is not None:
        indices = list(dict.fromkeys(f.index for f in geometry.frames))
    else:
        def key(i):
            number = headers[i].get("InstanceNumber")
            try:
                return (0, int(number), label_of(headers[i], i))
            except (TypeError, ValueError):
                return (1, 0, label_of(headers[i], i))
        indices = sorted(range(len(headers)), key=key)
    return [Path(headers[i].filename) for i in indices]


def _series_info(headers: Sequence) -> SeriesInfo:
    first = headers[0]
    stageable, reason, geometry = _analyse(headers)
    return SeriesInfo(
        study_instance_uid=str(first.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(first.get("SeriesInstanceUID", "") or ""),
        series_number=_series_number(first),
        description=str(first.get("SeriesDescription", "") or "").strip(),
        modality=str(first.get("Modality", "") or ""),
        orientation=_orientation(headers, geometry),
        n_instances=len(headers),
        n_frames=sum(_n_frames(ds) for ds in headers),
        transfer_syntaxes=tuple(sorted({transfer_syntax(ds) for ds in headers})),
        image_type=_image_type(first),
        files=tuple(_slice_order(headers, geometry)),
        stageable=stageable,
        reason=reason,
        lossy=lossy_reason(headers) is not None,
    )


def scan_dicom(folder: str | Path, *, recursive: bool = True) -> list[SeriesInfo]:
    """Every series under `folder` (headers only; non-DICOM files ignored), by study then series number."""
    groups: dict[tuple[str, str], list] = {}
    for ds in dicom_headers(folder, recursive=recursive):
        key = (str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or ""))
        groups.setdefault(key, []).append(ds)
    infos = [_series_info(h) for h in groups.values()]
    return sorted(infos, key=lambda s: (s.study_instance_uid, s.series_number is None, s.series_number or 0,
                                        s.series_instance_uid))


def find_studies(folder: str | Path) -> list[Study]:
    """The studies under `folder` (recursive), each one input of `predict`; [] if it holds no DICOM."""
    folder = Path(folder)
    by_study: dict[str, list[SeriesInfo]] = {}
    for info in scan_dicom(folder):
        by_study.setdefault(info.study_instance_uid, []).append(info)
    several = len(by_study) > 1
    return [Study(folder=folder, study_instance_uid=uid, series=tuple(series),
                  label=f"{folder} [study {uid}]" if several else str(folder))
            for uid, series in by_study.items()]


# --- choosing one ----------------------------------------------------------------------------------

def _listing(series: Sequence[SeriesInfo], *, reasons: bool) -> str:
    shown = [f"{s.name} ({s.reason})" if reasons else f"{s.name} ({s.series_instance_uid})" for s in series[:_LISTED]]
    more = f"; ... and {len(series) - _LISTED} more" if len(series) > _LISTED else ""
    return "; ".join(shown) + more


def _matches(series: Sequence[SeriesInfo], choice: str) -> list[SeriesInfo]:
    if re.fullmatch(r"[0-9]+(\.[0-9]+)+", choice):
        return [s for s in series if s.series_instance_uid == choice]
    if re.fullmatch(r"[+-]?[0-9]+", choice):
        return [s for s in series if s.series_number == int(choice)]
    try:
        pattern = re.compile(choice, re.IGNORECASE)
    except re.error as exc:
        raise InputError(f"--series {choice!r} is not a SeriesInstanceUID, a series number or a valid "
                         f"description pattern ({exc})") from None
    return [s for s in series if pattern.search(s.description)]


def select_series(series: list[SeriesInfo], *, choice: str | None = None) -> SeriesInfo:
    """The one series to stage: the only one that passes the rules, or the one `choice` names.

    `choice` is a SeriesInstanceUID, a series number, or a case-insensitive regular expression
    searched in SeriesDescription. No candidate, or several, is an InputError listing them.
    """
    if choice is not None and (not isinstance(choice, str) or not choice.strip()):
        raise InputError(f"--series must be a SeriesInstanceUID, a series number or a description pattern, got {choice!r}")
    if not series:
        raise InputError("no DICOM series found")
    study = series[0].study_instance_uid
    if choice is None:
        pool, where, hint = list(series), f"study {study}", "pick one with --series"
    else:
        choice = choice.strip()
        pool = _matches(series, choice)
        if not pool:
            raise InputError(f"--series {choice!r} matches none of the {len(series)} series of study {study}: "
                             f"{_listing(series, reasons=False)}")
        where, hint = f"--series {choice!r} in study {study}", "give its number or SeriesInstanceUID"
    candidates = [s for s in pool if s.stageable]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"{where}: none of its {len(pool)} series can be staged: {_listing(pool, reasons=True)}")
    raise InputError(f"{where}: {len(candidates)} series could be staged: "
                     f"{_listing(candidates, reasons=False)}; {hint}")


def chosen_because(series: Sequence[SeriesInfo], chosen: SeriesInfo, choice: str | None) -> str:
    """Why `chosen` was staged, for the report."""
    how = (f"named by --series {choice!r}" if choice is not None
           else f"the only one of the study's {len(series)} series that passes the rules")
    return f"{how}: {chosen.reason}"


def series_record(info: SeriesInfo, reason: str) -> dict:
    """What the report says about the staged series (`VolumeResult.series`)."""
    return {
        "study_instance_uid": info.study_instance_uid,
        "series_instance_uid": info.series_instance_uid,
        "series_number": info.series_number,
        "description": info.description,
        "modality": info.modality,
        "reason": reason,
        "transfer_syntax": list(info.transfer_syntaxes),
        "lossy": info.lossy,
    }


def load_series(info: SeriesInfo):
    """Read a series the rules accept into a canonical `Volume` (InputError if they refuse it)."""
    folder = info.files[0].parent if info.files else Path(".")
    if not info.stageable:
        raise InputError(f"DICOM series {info.name} in {folder} would not be staged: {info.reason}")
    return load_dicom_series(info.files, name=f"DICOM series {info.name} in {folder}")
