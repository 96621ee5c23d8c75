"""Synthetic phantoms: determinism, stage mix, stage signs, anatomy side, files and notes."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from liverstage.runtime.io import load_mask, load_volume
from liverstage.runtime.manifest import read_manifest
from liverstage.phantoms.synth import STAGE_FRACTIONS, stage_plan, synth_cohort, synth_patient

TINY = {"in_plane": 32, "slices": 6}


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = synth_patient(4, seed=7, stage="B", in_plane=48, slices=10)
    b = synth_patient(4, seed=7, stage="B", in_plane=48, slices=10)
    c = synth_patient(4, seed=8, stage="B", in_plane=48, slices=10)
    assert a.data.tobytes() == b.data.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.data.shape != c.data.shape or not np.array_equal(a.data, c.data)


def test_stage_mix_of_the_default_cohort_follows_the_paper(tmp_path):
    manifest = synth_cohort(tmp_path / "c117", patients=117, seed=0, **TINY)
    with open(manifest, newline="") as fh:
        stages = [r["stage"] for r in csv.DictReader(fh)]
    assert len(stages) == 117
    for s, frac in zip("ABC", STAGE_FRACTIONS):
        assert abs(stages.count(s) / 117 - frac) < 0.01
    assert stages == stage_plan(117, 0)
    assert stage_plan(117, 1) != stages and sorted(stage_plan(117, 1)) == sorted(stages)


def test_cohort_is_deterministic(tmp_path):
    m1 = synth_cohort(tmp_path / "one", patients=3, seed=5, **TINY)
    m2 = synth_cohort(tmp_path / "two", patients=3, seed=5, **TINY)
    assert m1.read_text() == m2.read_text()
    for r1, r2 in zip(read_manifest(m1), read_manifest(m2)):
        i1, i2 = nib.load(str(r1.image)), nib.load(str(r2.image))
        np.testing.assert_array_equal(np.asanyarray(i1.dataobj), np.asanyarray(i2.dataobj))
        np.testing.assert_array_equal(i1.affine, i2.affine)


def test_stage_signs_grow_from_a_to_c_with_overlap():
    params = {s: [synth_patient(i, seed=0, stage=s, **TINY).params for i in range(24)] for s in "ABC"}
    for key in ("nodularity_mm", "septa", "caudate_factor", "spleen_factor"):
        means = [np.mean([p[key] for p in params[s]]) for s in "ABC"]
        assert means[0] < means[1] < means[2], key
        a_max = max(p[key] for p in params["A"])
        c_min = min(p[key] for p in params["C"])
        b_vals = [p[key] for p in params["B"]]
        # overlap: no single sign separates neighbouring stages
        assert min(b_vals) < a_max or max(b_vals) > c_min, key


def test_small_cohort_files_anatomy_and_notes(small_cohort):
    root = small_cohort.parent
    assert "not patients" in (root / "README.txt").read_text()
    assert "not patients" in (root / "PHANTOMS_NOT_PATIENTS.txt").read_text()
    rows = read_manifest(small_cohort)
    codes = set()
    for row in rows:
        img = nib.load(str(row.image))
        codes.add(nib.aff2axcodes(img.affine))
        assert img.get_data_dtype() == np.int16
        vol = load_volume(row.image)
        liver = load_mask(row.mask, like=vol)
        xs, ys, zs = np.nonzero(liver)
        # right upper abdomen: the liver's centre is on the patient's right (high x in RAS+)
        # and in the upper part of the stack (high z)
        assert xs.mean() > vol.shape[0] / 2
        assert zs.mean() > vol.shape[2] / 3
        assert np.median(vol.data[liver]) > np.median(vol.data)  # liver brighter than air/background
    assert len(codes) >= 3  # several stored orientations


@pytest.mark.parametrize("bad", [{"in_plane": 8}, {"slices": 2}, {"stage": "D"}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        synth_patient(0, **{**TINY, "stage": "A", **bad})
