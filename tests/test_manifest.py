"""Manifest reading: relative paths, volume vs crop rows, and each problem as one InputError."""

from __future__ import annotations

import pytest

from liverstage.runtime.errors import InputError
from liverstage.runtime.manifest import read_manifest


def _files(root, *names):
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def _manifest(root, text):
    path = root / "manifest.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_volumes_and_crops(tmp_path):
    _files(tmp_path, "img/p1.nii.gz", "msk/p1.nii.gz", "img/p2.nii", "crops/p3_0.png", "crops/p3_1.npy")
    path = _manifest(tmp_path, "patient_id,image,mask,stage,notes\n"
                     "p1,img/p1.nii.gz,msk/p1.nii.gz,A,x\n"
                     "p2,img/p2.nii,,c,\n"
                     "p3,crops/p3_0.png,,B,\n"
                     "p3,crops/p3_1.npy,,B,\n")
    rows = read_manifest(path)
    assert [(r.patient_id, r.stage, r.kind) for r in rows] == [
        ("p1", "A", "volume"), ("p2", "C", "volume"), ("p3", "B", "crop"), ("p3", "B", "crop")]
    assert rows[0].image == (tmp_path / "img/p1.nii.gz").resolve()
    assert rows[0].mask == (tmp_path / "msk/p1.nii.gz").resolve()
    assert rows[1].mask is None and rows[1].image.is_absolute()


def test_synth_manifest_reads(small_cohort):
    rows = read_manifest(small_cohort)
    assert len(rows) == 12 and all(r.kind == "volume" and r.mask is not None for r in rows)


@pytest.mark.parametrize(
    "text, message",
    [
        ("patient_id,image,stage\np1,img/p1.nii.gz,A\n", "lacks column"),
        ("patient_id,image,mask,stage\np1,img/p1.nii.gz,,D\n", "unknown stage"),
        ("patient_id,image,mask,stage\np1,img/p1.nii.gz,,A\np1,img/p2.nii.gz,,A\n", "more than one volume"),
        ("patient_id,image,mask,stage\np1,img/p1.nii.gz,,A\np1,crops/a.png,,A\n", "mixes volume"),
        ("patient_id,image,mask,stage\np1,crops/a.png,,A\np1,crops/b.png,,B\n", "stage A and B"),
        ("patient_id,image,mask,stage\np1,img/missing.nii.gz,,A\n", "image not found"),
        ("patient_id,image,mask,stage\np1,img/p1.nii.gz,msk/none.nii.gz,A\n", "mask not found"),
        ("patient_id,image,mask,stage\np1,img/p1.mha,,A\n", "neither NIfTI"),
        ("patient_id,image,mask,stage\n,img/p1.nii.gz,,A\n", "empty patient_id"),
        ("patient_id,image,mask,stage\n", "no rows"),
    ],
)
def test_bad_manifests(tmp_path, text, message):
    _files(tmp_path, "img/p1.nii.gz", "img/p2.nii.gz", "crops/a.png", "crops/b.png", "img/p1.mha")
    with pytest.raises(InputError, match=message):
        read_manifest(_manifest(tmp_path, text))


def test_missing_manifest(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_manifest(tmp_path / "none.csv")
