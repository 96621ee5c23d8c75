"""The manifest: which image belongs to which patient and stage.

CSV with columns `patient_id, image, mask, stage` (extra columns are ignored). Paths are
relative to the manifest's folder (absolute paths are kept). `mask` may be empty. A row whose
image is `.png` / `.npy` is a pre-cut 2D crop (several rows per patient allowed, no mask); a
NIfTI row is a volume (one per patient_id). Every problem is an InputError naming the file and
line, because a silently skipped row would change a study's numbers.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Literal

from .errors import InputError
from .stages import STAGES, stage_index

REQUIRED_COLUMNS = ("patient_id", "image", "mask", "stage")
CROP_SUFFIXES = (".png", ".npy")
VOLUME_SUFFIXES = (".nii", ".nii.gz")


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    patient_id: str
    stage: str  # "A" | "B" | "C"
    image: Path  # absolute
    mask: Path | None  # absolute, or None
    kind: Literal["volume", "crop"]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(CROP_SUFFIXES):
        return "crop"
    return None


def read_manifest(path: str | Path, *, check_files: bool = True) -> list[ManifestRow]:
    """Read and validate a manifest; rows in file order.

    InputError for: a missing manifest, a missing column, an empty manifest, an empty
    patient_id or image, an unknown stage, an image that is neither NIfTI nor .png/.npy, a mask
    on a crop row, a patient with two volume rows, a patient with both volume and crop rows,
    a patient listed with two stages, and (with check_files) a missing image or mask file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"manifest not found: {p}")
    root = p.resolve().parent
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(
                    f"manifest {p} lacks column(s) {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)})"
                )
            reader.fieldnames = header
            raw = list(reader)
    except UnicodeDecodeError:
        raise InputError(f"manifest {p} is not a UTF-8 CSV file") from None
    except csv.Error as exc:
        raise InputError(f"manifest {p} is not a valid CSV file ({exc})") from None
    rows: list[ManifestRow] = []
    stage_of: dict[str, str] = {}
    kinds_of: dict[str, set[str]] = {}
    for lineno, rec in enumerate(raw, start=2):
        where = f"manifest {p} line {lineno}"
        pid = (rec.get("patient_id") or "").strip()
        image = (rec.get("image") or "").strip()
        mask = (rec.get("mask") or "").strip()
        stage_raw = (rec.get("stage") or "").strip()
        if not pid and not image and not stage_raw:
            continue  # blank line
        if not pid:
            raise InputError(f"{where}: empty patient_id")
        if not image:
            raise InputError(f"{where}: empty image path")
        try:
            stage = STAGES[stage_index(stage_raw)]
        except ValueError:
            raise InputError(f"{where}: unknown stage {stage_raw!r} (expected one of {', '.join(STAGES)})") from None
        image_path = (root / image) if not Path(image).is_absolute() else Path(image)
        kind = _kind(image_path)
        if kind is None:
            raise InputError(f"{where}: image {image} is neither NIfTI (.nii/.nii.gz) nor a 2D crop (.png/.npy)")
        mask_path = None
        if mask:
            if kind == "crop":
                raise InputError(f"{where}: a 2D crop row ({image}) cannot have a mask")
            mask_path = (root / mask) if not Path(mask).is_absolute() else Path(mask)
        if check_files:
            if not image_path.is_file():
                raise InputError(f"{where}: image not found: {image_path}")
            if mask_path is not None and not mask_path.is_file():
                raise InputError(f"{where}: mask not found: {mask_path}")
        if pid in stage_of and stage_of[pid] != stage:
            raise InputError(f"{where}: patient {pid} is listed as stage {stage_of[pid]} and {stage}")
        kinds = kinds_of.setdefault(pid, set())
        if kind == "volume" and "volume" in kinds:
            raise InputError(f"{where}: patient {pid} has more than one volume row")
        kinds.add(kind)
        if len(kinds) > 1:
            raise InputError(f"{where}: patient {pid} mixes volume and 2D crop rows")
        stage_of[pid] = stage
        rows.append(ManifestRow(patient_id=pid, stage=stage, image=image_path, mask=mask_path, kind=kind))  # type: ignore[arg-type]
    if not rows:
        raise InputError(f"manifest {p} has no rows")
    return rows
