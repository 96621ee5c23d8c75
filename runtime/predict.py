"""Stage volumes with an exported model: inputs -> crops -> backend -> one stage per volume.

Inputs: `.nii`/`.nii.gz` files, folders of them (not recursive), or DICOM study folders: a
folder with no NIfTI file is scanned recursively for DICOM (`dicom_study.find_studies`), each
study found is one input, and its series to stage is chosen by `dicom_study.select_series` (the
rules, or `series=` / `--series`). The preprocessing comes only from the model's metadata
(`backend.metadata.preprocess`).

Masks for several inputs (`mask_dir`), looked up in this order for an input named `case1.nii.gz`
(stem `case1`; a DICOM study's stem is its folder's name, or its StudyInstanceUID when the folder
holds several studies):
  1. `D/case1.nii.gz`             same file name (e.g. `TotalSegmentator ... -o D/case1.nii.gz --ml`)
  2. `D/case1/liver.nii.gz`       TotalSegmentator's one-file-per-structure output folder
  3. `D/case1*.nii[.gz]`          exactly one file starting with the stem (e.g. `case1_seg.nii.gz`)
With a multi-label mask, `mask_label` picks the liver (TotalSegmentator `total_mr`: liver = 5).

Overlap: loading and cropping the next volume runs in one background thread while the current
volume's crops go through the model (nibabel's gzip and numpy release the GIL enough for this;
inference itself runs in onnxruntime's own threads). At most two volumes are in memory at once,
and a volume's voxels are dropped as soon as its crops are cut.

Each bad input becomes an entry in `errors`; the others are still staged.

Every staged volume also gets the verdict of the model's out-of-distribution gate
(runtime/ood.py, from `backend.metadata.ood`): crops that do not look like the training crops
make the volume `uncertain`. A model without a gate makes every volume uncertain. So does a liver
region on the patient's left of the body's midline (runtime/laterality.py), which no crop shows,
and a volume whose raw intensities hold CT air in Hounsfield units (runtime/intensity.py), which
normalised crops no longer show. None of these ever changes a stage or a probability.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .aggregate import VolumeStage, aggregate
from .errors import InputError, LiverstageError
from .intensity import air_reason, air_share
from .io import NIFTI_SUFFIXES, load_volume
from .model_meta import OUTPUT_NAMES
from .laterality import side_reason
from .ood import NO_GATE, CropScores, OodGate, OodVerdict

MASK_AND_BOX = "--mask/--mask-dir, --bbox and --roi are alternatives; give one of them"


@dataclasses.dataclass(frozen=True)
class Preview:
    """What --png draws: one axial slice (canonical [x, y]) with the crop box cut from it."""

    image: np.ndarray
    slice: int
    box: tuple[int, int, int, int]


@dataclasses.dataclass
class VolumeResult:
    input: str
    verdict: VolumeStage
    slices: np.ndarray          # int [N] canonical axial index per crop
    boxes: np.ndarray           # int [N, 4] x0, y0, x1, y1 (canonical, half-open)
    probs: np.ndarray           # float [N, C]
    cosine: np.ndarray          # float [N, C]
    timing: dict[str, float]    # load, preprocess, inference, ood, total (s)
    warnings: list[str]
    preview: Preview | None = None
    dicom_files: tuple[Path, ...] = ()   # the staged series' instance files in slice order (DICOM only)
    series: dict | None = None           # the staged series (dicom_study.series_record); None for NIfTI
    ood_scores: CropScores | None = None  # per crop; None when the model has no gate
    region_side: float | None = None     # the region's side of the body's midline (runtime/laterality.py)
    region: str = "mask"                 # how the liver region was given: mask, bbox or auto (runtime/ood.py REGIONS)
    air_share: float | None = None       # share of voxels at or below -500, CT air (runtime/intensity.py)


@dataclasses.dataclass
class PredictRun:
    model: dict                                 # path, sha256, backend, precision
    results: list[VolumeResult]
    errors: list[tuple[str, str]]               # (input, one-line error)


@dataclasses.dataclass
class _Prepared:
    input: str
    images: np.ndarray
    slices: np.ndarray
    boxes: np.ndarray
    timing: dict[str, float]
    warnings: list[str]
    preview: Preview | None
    dicom_files: tuple[Path, ...] = ()
    series: dict | None = None
    region_side: float | None = None
    region: str = "mask"
    air_share: float | None = None


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_inputs(paths: Iterable) -> list:
    """Expand folders: their NIfTI files, else the DICOM studies found under them (`Study` items).

    A folder with neither stays one input, refused when it is loaded. Study items pass through,
    so resolving twice is harmless.
    """
    from .dicom_study import Study, find_studies  # noqa: PLC0415

    out: list = []
    for raw in paths:
        if isinstance(raw, Study):
            out.append(raw)
            continue
        path = Path(raw)
        if path.is_dir():
            niftis = sorted(p for p in path.iterdir() if p.is_file() and _is_nifti(p) and not p.name.startswith("."))
            out.extend(niftis or find_studies(path) or [path])
        else:
            out.append(path)
    if not out:
        raise InputError("no input given")
    return out


def find_mask(input_path, mask_dir: Path) -> Path:
    """The mask for `input_path` in `mask_dir` (rule in the module docstring); InputError if none or several."""
    input_path = Path(getattr(input_path, "mask_stem", input_path))  # a DICOM study: dicom_study.Study.mask_stem
    stem = _stem(input_path)
    same = mask_dir / input_path.name
    if _is_nifti(input_path) and same.is_file():
        return same
    for name in ("liver.nii.gz", "liver.nii"):
        if (mask_dir / stem / name).is_file():
            return mask_dir / stem / name
    hits = sorted(p for p in mask_dir.glob(f"{stem}*") if p.is_file() and _is_nifti(p))
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise InputError(f"no mask for {input_path.name} in {mask_dir} (looked for {input_path.name if _is_nifti(input_path) else stem + '.nii.gz'}, "
                         f"{stem}/liver.nii.gz, {stem}*.nii[.gz])")
    raise InputError(f"several masks for {input_path.name} in {mask_dir}: {', '.join(p.name for p in hits)}")


def load_input(item, *, series: str | None = None):
    """A NIfTI file or a DICOM study -> (Volume, staged instance files, series record or None)."""
    from .dicom_study import Study, chosen_because, load_series, select_series, series_record  # noqa: PLC0415

    if isinstance(item, Study):
        info = select_series(list(item.series), choice=series)
        return load_series(info), info.files, series_record(info, chosen_because(item.series, info, series))
    if Path(item).is_dir():
        raise InputError(f"folder {item} holds neither NIfTI files nor DICOM images")
    return load_volume(item), (), None


def one_line(exc: BaseException) -> str:
    """An error as the one line a report or a job keeps (the type named where it is not ours)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, LiverstageError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def with_side(verdict: OodVerdict, side: float | None) -> OodVerdict:
    """The gate's verdict, made uncertain where the liver region lies on the patient's left
    (runtime/laterality.py: a check no crop can make); its reason comes first."""
    return with_reason(verdict, side_reason(side))


def with_reason(verdict: OodVerdict, reason: str | None) -> OodVerdict:
    """The verdict, made uncertain by a volume-level check's `reason` (None: unchanged), which
    comes first in its reason; the gate's figures are kept."""
    if reason is None:
        return verdict
    return dataclasses.replace(verdict, uncertain=True,
                               reason=reason if verdict.reason is None else f"{reason}; and {verdict.reason}")


class Predictor:
    """Holds the backend and the ROI options; `run(inputs)` stages them all."""

    def __init__(self, backend, *, mask: str | Path | None = None, mask_dir: str | Path | None = None,
                 mask_label: int | None = None, bbox: tuple[int, ...] | None = None, roi: str | None = None,
                 batch_size: int = 32, keep_preview: bool = False, model_info: dict | None = None,
                 series: str | None = None) -> None:
        if mask is not None and mask_dir is not None:
            raise InputError("--mask and --mask-dir are alternatives; give one of them")
        if sum(x is not None for x in (mask or mask_dir, bbox, roi)) > 1:
            raise InputError(MASK_AND_BOX)
        if mask_label is not None and mask is None and mask_dir is None:
            raise InputError("--mask-label needs --mask or --mask-dir")
        if roi is not None and roi != "auto":
            raise InputError(f"--roi must be 'auto', got {roi!r}")
        if bbox is not None and len(bbox) != 6:
            raise InputError(f"--bbox needs 6 integers x0,y0,z0,x1,y1,z1, got {len(bbox)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"--batch-size must be a positive integer, got {batch_size!r}")
        if mask_dir is not None and not Path(mask_dir).is_dir():
            raise InputError(f"--mask-dir is not a folder: {mask_dir}")
        if series is not None and (not isinstance(series, str) or not series.strip()):
            raise InputError(f"--series must be a SeriesInstanceUID, a series number or a description pattern, got {series!r}")
        self.series = series
        self.backend = backend
        self.spec = backend.metadata.preprocess
        self.gate = OodGate.from_metadata(backend.metadata, source=str(getattr(backend, "path", "model")))
        self.gate_warning = self.gate.detection_warning() if self.gate is not None else None
        self.mask = Path(mask) if mask is not None else None
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self.mask_label = mask_label
        self.bbox = tuple(int(v) for v in bbox) if bbox is not None else None
        self.roi = roi
        self.batch_size = batch_size
        self.keep_preview = keep_preview
        self.model_info = model_info or {"path": str(getattr(backend, "path", "")), "sha256": "",
                                         "backend": backend.name, "precision": backend.precision}

    # -- stage 1 (background thread): load + crop ---------------------------------------------
    def prepare(self, path) -> _Prepared:
        from .crops import crops_for_volume  # noqa: PLC0415

        t0 = time.perf_counter()
        volume, dicom_files, series = load_input(path, series=self.series)
        t1 = time.perf_counter()
        warnings = list(volume.warnings)
        if self.gate_warning is not None:
            warnings.append(self.gate_warning)
        kwargs: dict = {}
        region = "mask"
        if self.mask is not None:
            kwargs.update(mask=self.mask, mask_label=self.mask_label)
        elif self.mask_dir is not None:
            kwargs.update(mask=find_mask(path, self.mask_dir), mask_label=self.mask_label)
        elif self.bbox is not None:
            kwargs.update(bbox=self.bbox)
            region = "bbox"
        else:
            kwargs.update(roi="auto")
            region = "auto"
            if self.roi is None:
                warnings.append("no mask or box given: used --roi auto (a rough heuristic; a liver mask is better)")
        crops = crops_for_volume(volume, spec=self.spec, **kwargs)
        if len(crops.slices) == 0:
            raise InputError(f"{path}: no liver region left after cropping (no slice reaches the minimum area)")
        preview = None
        if self.keep_preview:
            order = np.argsort(crops.slices, kind="stable")
            mid = int(order[len(order) // 2])
            z = int(crops.slices[mid])
            preview = Preview(image=np.array(volume.data[:, :, z], copy=True), slice=z,
                              box=tuple(int(v) for v in crops.boxes[mid]))
        air = air_share(volume)
        del volume
        t2 = time.perf_counter()
        for w in crops.warnings:
            if w not in warnings:
                warnings.append(w)
        return _Prepared(input=str(path), images=crops.images, slices=np.asarray(crops.slices),
                         boxes=np.asarray(crops.boxes), timing={"load": t1 - t0, "preprocess": t2 - t1},
                         warnings=warnings, preview=preview, dicom_files=tuple(dicom_files), series=series,
                         region_side=crops.region_side, region=region, air_share=air)

    # -- stage 2 (caller's thread): inference + aggregation -------------------------------------
    def infer(self, prepared: _Prepared) -> VolumeResult:
        t0 = time.perf_counter()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
        for start in range(0, len(prepared.images), self.batch_size):
            out = self.backend.run(prepared.images[start:start + self.batch_size])
            for name in OUTPUT_NAMES:
                parts[name].append(out[name])
        outputs = {name: np.concatenate(values) for name, values in parts.items()}
        probs_arr = outputs["probs"].astype(np.float64)
        cos_arr = outputs["cosine"].astype(np.float64)
        if not all(np.all(np.isfinite(a)) for a in outputs.values()):
            raise InputError(f"{prepared.input}: the model returned NaN or Inf")
        t1 = time.perf_counter()
        scores = self.gate.scores(outputs, prepared.images) if self.gate is not None else None
        judged = self.gate.judge(scores, region=prepared.region) if scores is not None else NO_GATE
        ood = with_reason(with_side(judged, prepared.region_side), air_reason(prepared.air_share))
        verdict = aggregate(probs_arr, ood=ood)
        t2 = time.perf_counter()
        timing = dict(prepared.timing)
        timing["inference"] = t1 - t0
        timing["ood"] = t2 - t1
        timing["total"] = timing["load"] + timing["preprocess"] + timing["inference"] + timing["ood"]
        return VolumeResult(input=prepared.input, verdict=verdict, slices=prepared.slices, boxes=prepared.boxes,
                            probs=probs_arr, cosine=cos_arr, timing=timing, warnings=list(prepared.warnings),
                            preview=prepared.preview, dicom_files=prepared.dicom_files, series=prepared.series,
                            ood_scores=scores, region_side=prepared.region_side, region=prepared.region,
                            air_share=prepared.air_share)

    def run(self, inputs: Iterable[str | Path], *,
            on_result: Callable[[VolumeResult | None, str, str | None], None] | None = None) -> PredictRun:
        """Stage every input, prefetching the next one while the current one runs the model.

        `timing_s.total` of a volume is the time spent on it (load + preprocess + inference), not
        counting time spent waiting for the other volume's stage.
        """
        paths = resolve_inputs(inputs)
        if self.mask is not None and len(paths) > 1:
            raise InputError(f"--mask applies to one input but {len(paths)} were given; use --mask-dir")
        if self.series is not None and all(isinstance(p, Path) for p in paths):
            raise InputError("--series applies to DICOM study folders; none of the inputs is one")
        results: list[VolumeResult] = []
        errors: list[tuple[str, str]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="liverstage-prefetch") as pool:
            pending = pool.submit(self.prepare, paths[0])
            for i, path in enumerate(paths):
                current = pending
                if i + 1 < len(paths):
                    pending = pool.submit(self.prepare, paths[i + 1])
                try:
                    result = self.infer(current.result())
                except Exception as exc:  # noqa: BLE001  (one bad input must not stop the others)
                    errors.append((str(path), one_line(exc)))
                    if on_result:
                        on_result(None, str(path), errors[-1][1])
                    continue
                results.append(result)
                if on_result:
                    on_result(result, str(path), None)
        return PredictRun(model=dict(self.model_info), results=results, errors=errors)
