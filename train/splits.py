"""Patient-level splits: crops of one patient never straddle train, validation and test.

Slice-level splits inflate accuracy badly (neighbouring slices of one liver are near copies), so
every split here is over unique patients, stratified by stage (scikit-learn train_test_split).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from liverstage.runtime.errors import InputError
from liverstage.runtime.stages import STAGES


def _patients(patient_ids: Sequence[str], stages: Sequence[str]) -> dict[str, str]:
    if len(patient_ids) != len(stages):
        raise ValueError(f"{len(patient_ids)} patient ids but {len(stages)} stages")
    stage_of: dict[str, str] = {}
    for pid, stage in zip(patient_ids, stages):
        pid = str(pid)
        if pid in stage_of and stage_of[pid] != stage:
            raise InputError(f"patient {pid} has two stages ({stage_of[pid]} and {stage})")
        stage_of[pid] = stage
    return stage_of


def _stratified(ids: list[str], labels: list[str], fraction: float, seed: int, what: str) -> tuple[list[str], list[str]]:
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    counts = Counter(labels)
    n_take = math.ceil(fraction * len(ids))
    too_few = sorted(s for s, n in counts.items() if n < 2)
    if too_few or n_take < len(counts) or len(ids) - n_take < len(counts):
        detail = ", ".join(f"{s}: {counts.get(s, 0)}" for s in STAGES if s in counts)
        raise InputError(
            f"too few patients per stage for a {what} split of {fraction:g} ({detail}); every stage "
            f"needs at least 2 patients and the {what} set needs at least one patient per stage"
        )
    keep, take = train_test_split(ids, test_size=n_take, stratify=labels, random_state=seed)
    return sorted(keep), sorted(take)


def patient_split(
    patient_ids: Sequence[str],
    stages: Sequence[str],
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) lists of unique patient ids, stratified by stage, deterministic in `seed`.

    `patient_ids` / `stages` may have one entry per crop or per patient. `val_fraction` is a
    fraction of all patients taken from the non-test ones (0 -> empty validation set).
    InputError if a stage has too few patients to appear on both sides of a split.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise InputError(f"test fraction must be in (0, 1), got {test_fraction!r}")
    if not 0.0 <= float(val_fraction) < 1.0 - float(test_fraction):
        raise InputError(f"validation fraction must be in [0, 1 - test fraction), got {val_fraction!r}")
    stage_of = _patients(patient_ids, stages)
    ids = sorted(stage_of)
    rest, test = _stratified(ids, [stage_of[i] for i in ids], float(test_fraction), seed, "test")
    val: list[str] = []
    if val_fraction > 0:
        share = float(val_fraction) / (1.0 - float(test_fraction))
        rest, val = _stratified(rest, [stage_of[i] for i in rest], share, seed + 1, "validation")
    return rest, val, test


def split_with_test(
    patient_ids: Sequence[str],
    stages: Sequence[str],
    test_patients: Sequence[str],
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[str], list[str], list[str]]:
    """Like patient_split, but the test patients are imposed (an experiment's own split)."""
    stage_of = _patients(patient_ids, stages)
    test = sorted({str(t) for t in test_patients})
    unknown = [t for t in test if t not in stage_of]
    if unknown:
        raise InputError(f"test patient(s) not in the manifest: {', '.join(unknown[:5])}")
    rest = sorted(set(stage_of) - set(test))
    if not rest or not test:
        raise InputError("the imposed test set leaves no training patients (or is empty)")
    val: list[str] = []
    if val_fraction > 0:
        share = float(val_fraction) * len(stage_of) / len(rest)
        if not 0 < share < 1:
            raise InputError(f"validation fraction {val_fraction!r} leaves no training patients")
        rest, val = _stratified(rest, [stage_of[i] for i in rest], share, seed + 1, "validation")
    return rest, val, test
