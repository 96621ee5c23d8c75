"""Real crops for export-time checks: parity, INT8 calibration, temperature, cosine threshold.

Where they come from, in order:
1. `--calibration-manifest M`: every crop of M (parity, calibration, temperature).
2. The checkpoint's own manifest, when it is still reachable: training patients for INT8
   calibration and the cosine threshold, validation patients for the temperature, validation
   and test patients for parity.
3. Otherwise a few freshly generated synthetic phantoms (labelled; not patients).
Crops are made with the checkpoint's PreprocessSpec through the training data path
(train.data.load_crops, i.e. the runtime's one crop pipeline), each patient read once, and each
set capped at MAX_CROPS evenly spaced crops to keep an export quick on a laptop.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from liverstage.runtime.errors import InputError
from liverstage.runtime.spec import PreprocessSpec

MAX_CROPS = 192  # per set: enough for stable figures, small enough for a 2-core laptop
MAX_BANK_CROPS = 1024  # training crops for the out-of-distribution gate (export/ood_fit.py)


@dataclasses.dataclass
class Crops:
    """Labelled crops from one source (images float32 [N, 1, S, S], labels int [N])."""

    images: np.ndarray
    labels: np.ndarray
    patients: list[str]
    source: str
    regions: str  # how the rows' liver regions were given: "mask", "auto" (--roi auto: no mask) or "mixed"

    def __len__(self) -> int:
        return int(len(self.images))

    def subsample(self, limit: int) -> "Crops":
        """At most `limit` crops, evenly spaced (deterministic, keeps every patient represented)."""
        if len(self) <= limit:
            return self
        index = np.linspace(0, len(self) - 1, limit).round().astype(int)
        return Crops(self.images[index], self.labels[index], [self.patients[i] for i in index], self.source,
                     self.regions)

    def select(self, patients: set[str], source: str) -> "Crops":
        """The crops of `patients` (in their original order)."""
        keep = [i for i, p in enumerate(self.patients) if p in patients]
        return Crops(self.images[keep], self.labels[keep], [self.patients[i] for i in keep], source, self.regions)

    @property
    def n_patients(self) -> int:
        return len(set(self.patients))


@dataclasses.dataclass
class ExportCrops:
    """The crop sets one export uses; any may be None where nothing is reachable."""

    parity: Crops
    calibration: Crops  # INT8 activation ranges
    temperature: Crops | None  # labelled validation crops
    threshold: Crops | None  # training crops (at most max_crops)
    phantoms: bool = False  # parity crops are synthetic phantoms (not patients)
    bank: Crops | None = None  # training crops for the out-of-distribution gate's bank (at most MAX_BANK_CROPS)
    held_out: Crops | None = None  # every validation/test crop: the gate's thresholds


def region_kind(rows) -> str:
    """How manifest rows give their liver regions: "mask", "auto" (no mask: train.data cuts
    them with --roi auto) or "mixed". It travels into the gate's metadata (export/ood_fit.py),
    so that `predict` can say when a volume's crops were cut differently from the training
    crops (a box or --roi auto against masks), which alone makes the gate flag most of them."""
    kinds = {"auto" if row.mask is None else "mask" for row in rows}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def crops_from_rows(rows, spec: PreprocessSpec, *, source: str) -> Crops:
    """Crops of manifest rows through the training data path (train.data.load_crops, which uses
    the runtime's one crop pipeline), so export checks see exactly what training saw."""
    from liverstage.train.data import load_crops  # noqa: PLC0415

    if not rows:
        raise InputError(f"no manifest rows for {source}")
    data = load_crops(rows, spec)
    return Crops(data.images, data.labels.astype(np.int64), [str(p) for p in data.patient_ids], source,
                 region_kind(rows))


def _rows_for(manifest: Path, patients: set[str]) -> list:
    from liverstage.runtime.manifest import read_manifest  # noqa: PLC0415

    return [row for row in read_manifest(manifest) if row.patient_id in patients]


def phantom_crops(spec: PreprocessSpec, *, patients: int = 6, seed: int = 20240611) -> Crops:
    """Crops from a few freshly generated synthetic phantoms (labelled; THEY ARE NOT PATIENTS)."""
    from liverstage.runtime.manifest import read_manifest  # noqa: PLC0415
    from liverstage.phantoms.synth import synth_cohort  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="liverstage-phantoms-") as tmp:
        manifest = synth_cohort(Path(tmp) / "phantoms", patients=patients, seed=seed, in_plane=96, slices=20)
        return crops_from_rows(read_manifest(manifest), spec, source="freshly generated phantoms (not patients)")


def is_phantom_manifest(path: str | Path | None) -> bool:
    """True for a cohort written by liverstage's phantom generator (it leaves this file beside it)."""
    return path is not None and (Path(path).parent / "PHANTOMS_NOT_PATIENTS.txt").exists()


def export_crops(ckpt, spec: PreprocessSpec, *, calibration_manifest: str | Path | None = None,
                 max_crops: int = MAX_CROPS) -> ExportCrops:
    """Pick the crop sets for one export (see the module docstring for the order)."""
    from liverstage.runtime.manifest import read_manifest  # noqa: PLC0415

    own = ckpt.manifest_path()
    splits = ckpt.splits
    everyone = None
    if own is not None and splits.train:
        try:  # every crop of the checkpoint's patients, read once
            everyone = crops_from_rows(_rows_for(own, splits.everyone()), spec, source=str(own))
        except InputError:
            everyone = None  # moved or changed files: fall back below
    threshold = (everyone.select(set(splits.train), f"training patients of {own}").subsample(max_crops)
                 if everyone is not None else None)
    if threshold is not None and not len(threshold):
        threshold = None
    gate = {}
    if threshold is not None:
        held_out = everyone.select(set(splits.val) | set(splits.test), f"validation/test patients of {own}")
        gate = {"bank": everyone.select(set(splits.train), f"training patients of {own}").subsample(MAX_BANK_CROPS),
                "held_out": held_out if len(held_out) else None}
    if calibration_manifest is not None:
        path = Path(calibration_manifest)
        crops = crops_from_rows(read_manifest(path), spec, source=str(path)).subsample(max_crops)
        return ExportCrops(parity=crops, calibration=crops, temperature=crops, threshold=threshold,
                           phantoms=is_phantom_manifest(path), **gate)
    if threshold is not None:
        val = everyone.select(set(splits.val), f"validation patients of {own}")
        return ExportCrops(parity=(held_out if len(held_out) else threshold).subsample(max_crops),
                           calibration=threshold,
                           temperature=val.subsample(max_crops) if len(val) else None,
                           threshold=threshold, phantoms=is_phantom_manifest(own), **gate)
    crops = phantom_crops(spec).subsample(max_crops)
    return ExportCrops(parity=crops, calibration=crops, temperature=None, threshold=None, phantoms=True)
