"""Patient-level stratified splits."""

import pytest

from liverstage.runtime.errors import InputError
from liverstage.train.splits import patient_split, split_with_test


def _cohort(n_a=10, n_b=14, n_c=6, crops=4):
    pids, stages = [], []
    for stage, n in (("A", n_a), ("B", n_b), ("C", n_c)):
        for i in range(n):
            pids += [f"{stage}{i}"] * crops
            stages += [stage] * crops
    return pids, stages


def test_split_is_by_patient_stratified_and_seeded():
    pids, stages = _cohort()
    train, val, test = patient_split(pids, stages, test_fraction=0.2, seed=3)
    assert val == []
    assert len(test) == 6 and len(train) == 24
    assert not set(train) & set(test) and set(train) | set(test) == set(pids)
    assert sorted(p[0] for p in test) == ["A", "A", "B", "B", "B", "C"]
    assert (train, test) == patient_split(pids, stages, test_fraction=0.2, seed=3)[::2]
    assert test != patient_split(pids, stages, test_fraction=0.2, seed=4)[2]


def test_validation_comes_from_training_side():
    pids, stages = _cohort()
    train, val, test = patient_split(pids, stages, test_fraction=0.2, val_fraction=0.2, seed=0)
    assert len(val) == 6 and len(train) == 18
    assert not (set(val) & set(test)) and not (set(val) & set(train))
    # The test set does not depend on whether a validation set is asked for.
    assert test == patient_split(pids, stages, test_fraction=0.2, seed=0)[2]


def test_too_few_patients_per_stage():
    pids, stages = _cohort(n_c=1)
    with pytest.raises(InputError, match="too few patients"):
        patient_split(pids, stages, seed=0)
    pids, stages = _cohort(n_a=2, n_b=2, n_c=2)
    with pytest.raises(InputError, match="too few patients"):
        patient_split(pids, stages, test_fraction=0.2, seed=0)  # 2 test patients < 3 stages


def test_imposed_test_patients():
    pids, stages = _cohort()
    train, val, test = split_with_test(pids, stages, ["A1", "B2", "C3"], val_fraction=0.1, seed=0)
    assert test == ["A1", "B2", "C3"] and len(val) == 3
    assert not set(train) & set(test)
    with pytest.raises(InputError, match="not in the manifest"):
        split_with_test(pids, stages, ["Z9"])
