"""Staging results as DICOM objects a PACS shows, written into the source study as new series.

Two instances per staged series, each in its own new series (new SeriesInstanceUID and
SOPInstanceUID; the Patient and Study modules are copied from the source series):
- a Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom). One measurement group
  (TID 1501) carries the finding (SCT "Fibrosis" at SCT "Liver"), the stage as a coded qualitative
  evaluation (concept SCT "Stage"), the probability of each stage (UCUM "1"), the uncertain flag
  (SCT Yes/No) with its reason when there is one, every warning as a DCM "Comment", any further
  scalar key of the result as a Comment "key: value", the algorithm (TID 4019: name
  "liverstage", version, the model's sha256, file, backend and precision as parameters) and every
  instance of the staged series as a source image. The same instances are the SR's evidence
  (CurrentRequestedProcedureEvidenceSequence), which viewers require.
- an RGB secondary capture of the summary picture with a banner burned into its pixels (stage,
  probabilities, uncertain, "RESEARCH USE ONLY - not for diagnosis"; BurnedInAnnotation YES).

The stages A/B/C are this model's own classes (early / middle / last, as in the paper), not a
published staging system such as METAVIR, so their codes and the probability and uncertainty
concepts come from a private coding scheme, `99LIVERSTAGE`, declared in each SR's
CodingSchemeIdentificationSequence. Everything else uses DCM, SCT and UCUM codes.

Series numbers: the SR gets 9000 + (source SeriesNumber mod 1000), the secondary capture
10000 + (source SeriesNumber mod 1000), so viewers sort them after the source and name their
origin. Files: `SR_<SOPInstanceUID>.dcm` and `SC_<SOPInstanceUID>.dcm`, explicit VR little endian.

Both objects are built in memory first, then written through runtime/atomic.py: a failure while
building leaves no file at all. highdicom and pydicom are imported lazily (the `dicom` extra).
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .atomic import atomic_path
from .errors import InputError
from .stages import STAGE_NAMES, STAGES

CODING_SCHEME = "99LIVERSTAGE"
RESEARCH_ONLY = "RESEARCH USE ONLY - not for diagnosis"
ALGORITHM_NAME = "liverstage"
SR_SERIES_BASE = 9000
SC_SERIES_BASE = 10000

# Result keys written as their own content items (or deliberately left out: per-crop detail,
# timings and the input path stay in the JSON report).
_HANDLED_KEYS = {"input", "stage", "stage_name", "probabilities", "uncertain", "crops", "timing_s", "warnings"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Type 2 Patient / Study attributes highdicom copies from the source: present but empty if missing.
_TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _import_highdicom():
    try:
        import highdicom  # noqa: PLC0415
    except ImportError:
        raise InputError("writing DICOM results needs highdicom: pip install 'liverstage[dicom]'") from None
    return highdicom


@dataclasses.dataclass(frozen=True)
class DicomResults:
    """The SR and the secondary capture of one staged series, built and not yet written."""

    source_series_uid: str
    sr: Any   # highdicom.sr.Comprehensive3DSR
    sc: Any   # highdicom.sc.SCImage

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write both files into `out_dir` (created if missing); returns their paths (SR first)."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"cannot write DICOM results into {out_dir}: not a folder")
        items = [(out_dir / f"SR_{self.sr.SOPInstanceUID}.dcm", _encode(self.sr)),
                 (out_dir / f"SC_{self.sc.SOPInstanceUID}.dcm", _encode(self.sc))]
        for path, data in items:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        return [path for path, _ in items]


def write_dicom_results(out_dir: str | Path, *, series_files: Sequence[Path], result: dict, model: dict,
                        picture_rgb: np.ndarray) -> list[Path]:
    """Write the SR and the secondary capture of one staged series into `out_dir`; returns their paths.

    `series_files`: the staged series' instance files (headers are read, pixels are not);
    `result`: one entry of the predict report's "results" (`report.result_to_dict`); `model`: the
    report's "model" dict (path, sha256, backend, precision); `picture_rgb`: uint8 [H, W, 3], the
    summary picture (`report.summary_picture_rgb`).
    """
    built = build_dicom_results(series_files=series_files, result=result, model=model, picture_rgb=picture_rgb)
    return built.write(out_dir)


def build_dicom_results(*, series_files: Sequence[Path], result: dict, model: dict,
                        picture_rgb: np.ndarray) -> DicomResults:
    """Build both objects in memory (arguments as in `write_dicom_results`); nothing is written."""
    _check_arguments(series_files, result, model, picture_rgb)
    hd = _import_highdicom()
    headers = _read_headers(series_files)
    source = headers[0]
    number = _series_number(source)
    sr = _build_sr(hd, headers, result, model, series_number=SR_SERIES_BASE + number % 1000)
    sc = _build_sc(hd, source, result, model, picture_rgb, series_number=SC_SERIES_BASE + number % 1000)
    return DicomResults(source_series_uid=str(source.SeriesInstanceUID), sr=sr, sc=sc)


def check_dicom_out(out_dir: str | Path, inputs: Sequence) -> None:
    """`predict --dicom-out` before any work: the tools are installed, every input is a DICOM
    study (a NIfTI file has no study to write into), and `out_dir` can be a folder."""
    _import_highdicom()
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        raise InputError("--dicom-out draws the summary picture with matplotlib: pip install 'liverstage[plot]'") from None
    from .dicom_study import Study  # noqa: PLC0415

    for item in inputs:
        if not isinstance(item, Study):
            raise InputError(f"--dicom-out writes results into a DICOM study, but {item} is not a DICOM study folder")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--dicom-out is not a folder: {out_dir}")


def build_for_run(run) -> list[DicomResults]:
    """The SR and secondary capture of every staged series of a `PredictRun`, built in memory, so
    that a failure stops `predict` before it has written anything."""
    from .report import result_to_dict, summary_picture_rgb  # noqa: PLC0415

    return [build_dicom_results(series_files=r.dicom_files, result=result_to_dict(r), model=run.model,
                                picture_rgb=summary_picture_rgb(r))
            for r in run.results if r.dicom_files]


# -- argument and source checks ------------------------------------------------------------------
def _check_arguments(series_files, result, model, picture_rgb) -> None:
    if isinstance(series_files, (str, Path)) or not len(series_files):
        raise ValueError("series_files must be a non-empty sequence of the staged series' instance files")
    if not isinstance(result, dict) or result.get("stage") not in STAGES:
        raise ValueError(f"result must be a report result with a stage in {STAGES}, got {result!r:.80}")
    probs = result.get("probabilities")
    if not isinstance(probs, dict) or set(probs) != set(STAGES):
        raise ValueError(f"result['probabilities'] must map each of {STAGES} to a probability, got {probs!r}")
    if not isinstance(result.get("uncertain"), bool):
        raise ValueError(f"result['uncertain'] must be a bool, got {result.get('uncertain')!r}")
    if not isinstance(model, dict) or not _SHA256.fullmatch(str(model.get("sha256", ""))):
        raise ValueError(f"model must be the report's model dict with a hex sha256, got {model!r:.120}")
    if not (isinstance(picture_rgb, np.ndarray) and picture_rgb.dtype == np.uint8 and picture_rgb.ndim == 3
            and picture_rgb.shape[2] == 3 and min(picture_rgb.shape[:2]) > 0):
        raise ValueError(f"picture_rgb must be a uint8 [H, W, 3] array, got {getattr(picture_rgb, 'shape', picture_rgb)!r}")


def _read_headers(series_files: Sequence[Path]) -> list:
    """The series' headers (no pixels), checked to be one series of one study with its UIDs."""
    import pydicom  # noqa: PLC0415

    headers = []
    for path in series_files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001  (missing, unreadable, not DICOM)
            raise InputError(f"{path}: cannot read its DICOM header ({' '.join(str(exc).split())})") from None
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise InputError(f"{path}: has no {keyword}; cannot reference it from a DICOM result")
        for keyword in _TYPE2_KEYWORDS:
            if keyword not in ds:
                setattr(ds, keyword, None)
        headers.append(ds)
    first = headers[0]
    for path, ds in zip(series_files, headers):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if ds.get(keyword) != first.get(keyword):
                raise InputError(f"{path}: another {keyword} than {series_files[0]}; the staged files must be one series")
    return headers


def _series_number(ds) -> int:
    try:
        return abs(int(ds.get("SeriesNumber")))
    except (TypeError, ValueError):
        return 0


# -- the text both objects carry -----------------------------------------------------------------
def _probabilities_text(result: dict) -> str:
    return f"P({'/'.join(STAGES)}) = " + " / ".join(f"{float(result['probabilities'][s]):.2f}" for s in STAGES)


def _verdict_text(result: dict) -> str:
    stage = result["stage"]
    if result["uncertain"]:
        return f"UNCERTAIN - not a reliable stage (best guess {stage} {STAGE_NAMES[stage]}), {_probabilities_text(result)}"
    return f"fibrosis stage {stage} ({STAGE_NAMES[stage]}), {_probabilities_text(result)}"


def _uncertain_reason(result: dict) -> str | None:
    """The result's own reason field if it has one, else its warning that says why it is uncertain."""
    for key, value in result.items():
        if key not in _HANDLED_KEYS and "reason" in key and isinstance(value, str) and value:
            return value
    for warning in result.get("warnings", []):
        if str(warning).startswith("uncertain"):
            return str(warning)
    return None


def _extra_scalars(result: dict) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in result.items()
            if k not in _HANDLED_KEYS and isinstance(v, (str, int, float, bool))]


# -- the structured report -----------------------------------------------------------------------
def _local(value: str, meaning: str):
    from highdicom.sr import CodedConcept  # noqa: PLC0415

    return CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


def _build_sr(hd, headers: list, result: dict, model: dict, *, series_number: int):
    from highdicom.coding_schemes import CodingSchemeIdentificationItem  # noqa: PLC0415
    from pydicom.sr.codedict import codes  # noqa: PLC0415
    from pydicom.uid import generate_uid  # noqa: PLC0415

    stage = result["stage"]
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=__version__,
        parameters=[f"model sha256 {model['sha256']}", f"model file {Path(str(model.get('path', ''))).name}",
                    f"backend {model.get('backend', '')}", f"precision {model.get('precision', '')}"])
    evaluations = [
        hd.sr.QualitativeEvaluation(name=codes.SCT.Stage,
                                    value=_local(f"STAGE-{stage}", f"Fibrosis stage {stage} ({STAGE_NAMES[stage]})")),
        hd.sr.QualitativeEvaluation(name=_local("UNCERTAIN", "Result uncertain"),
                                    value=codes.SCT.Yes if result["uncertain"] else codes.SCT.No),
    ]
    measurements = [
        hd.sr.Measurement(name=_local(f"P-{s}", f"Probability of fibrosis stage {s}"),
                          value=float(result["probabilities"][s]), unit=codes.UCUM.NoUnits)
        for s in STAGES
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="liver fibrosis stage"),
        finding_type=codes.SCT.Fibrosis,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Liver)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in headers],
    )
    texts = []
    reason = _uncertain_reason(result) if result["uncertain"] else None
    if reason:
        texts.append((_local("UNCERTAIN-WHY", "Reason the result is uncertain"), reason))
    texts += [(codes.DCM.Comment, str(w)) for w in result.get("warnings", []) if str(w) != reason]
    texts += [(codes.DCM.Comment, f"{k}: {v}") for k, v in _extra_scalars(result) if v != reason]
    for name, value in texts:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[ALGORITHM_NAME, model["sha256"]]), name=ALGORITHM_NAME,
        manufacturer_name=ALGORITHM_NAME, model_name=f"liverstage {__version__}")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=headers, content=report[0],
        series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=ALGORITHM_NAME, is_complete=True, is_final=False, is_verified=False,
        series_description=_description("SR", headers[0]),
        software_versions=__version__,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=CODING_SCHEME, name="liverstage fibrosis stage codes",
            responsible_organization="liverstage (research software)")],
    )


def _description(kind: str, source) -> str:
    what = {"SR": "fibrosis stage report", "SC": "fibrosis stage picture"}[kind]
    origin = source.get("SeriesNumber")
    text = f"liverstage {what}, series {origin}" if origin not in (None, "") else f"liverstage {what}"
    return (text + " (RESEARCH USE ONLY)")[:64]


# -- the secondary capture ----------------------------------------------------------------------
def burn_in(picture_rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """`picture_rgb` below a black banner holding `lines` (the first in yellow, the others in white):
    uint8 [banner + H, W, 3]."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    line_height = 26
    width = picture_rgb.shape[1]
    banner = Image.new("RGB", (width, 8 + line_height * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(banner)
    for i, line in enumerate(lines):
        colour = (255, 215, 0) if i == 0 else (255, 255, 255)
        draw.text((10, 4 + i * line_height), line, fill=colour, font=font)
    return np.concatenate([np.asarray(banner, dtype=np.uint8), picture_rgb], axis=0)


def banner_lines(result: dict, model: dict) -> list[str]:
    """What the secondary capture says in its pixels, in reading order."""
    return [RESEARCH_ONLY,
            f"liverstage {__version__}: {_verdict_text(result)}",
            f"model sha256 {str(model['sha256'])[:16]}..., {model.get('backend', '')} {model.get('precision', '')}"]


def _build_sc(hd, source, result: dict, model: dict, picture_rgb: np.ndarray, *, series_number: int):
    from pydicom.uid import ExplicitVRLittleEndian  # noqa: PLC0415

    pixels = burn_in(picture_rgb, banner_lines(result, model))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT",
        # The anatomical panel is an axial slice in radiological view: rows run to the patient's
        # left, columns to posterior.
        patient_orientation=("L", "P"),
        series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=ALGORITHM_NAME, transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_description("SC", source), software_versions=__version__,
    )
    sc.copy_patient_and_study_information(source)
    # Laterality (General Series, 2C) is for paired body parts; naming the unpaired one pictured
    # lets it be absent, as the standard wants.
    sc.BodyPartExamined = source.get("BodyPartExamined") or "ABDOMEN"
    if source.get("Laterality"):
        sc.Laterality = source.Laterality
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # made on a workstation, not digitised from film
    sc.DerivationDescription = f"{RESEARCH_ONLY}. liverstage {__version__}: {_verdict_text(result)}"[:1024]
    return sc


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
