"""Loading NIfTI volumes and masks: canonical orientation, 4D policy, and every bad input."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from liverstage.runtime.errors import InputError
from liverstage.runtime.io import load_mask, load_volume


def _save(path, data, affine=None):
    affine = np.diag([1.5, 1.5, 4.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _save_with_raw_sform(path, data, sform):
    """Write a file whose sform is exactly `sform` (nibabel refuses to build one from a zero affine)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(sform, code=1)
    hdr.set_qform(None, code=0)
    nib.Nifti1Image(data, None, header=hdr).to_filename(str(path))
    return path


@pytest.fixture
def vol3d(tmp_path):
    rng = np.random.default_rng(1)
    return _save(tmp_path / "v.nii.gz", rng.normal(100, 20, (12, 10, 8)).astype(np.float32))


# --- nibabel's real files -----------------------------------------------------------------


def test_anatomical_big_endian_loads_canonical():
    path = os.path.join(data_path, "anatomical.nii")
    img = nib.load(path)
    assert img.get_data_dtype().byteorder == ">"  # the point of this file: big-endian int16
    vol = load_volume(path)
    expected = nib.as_closest_canonical(img)
    assert vol.data.dtype == np.float32 and vol.data.flags.f_contiguous  # axial slices contiguous (io._canonical)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(vol.data, expected.get_fdata().astype(np.float32))
    np.testing.assert_allclose(vol.affine, expected.affine)
    np.testing.assert_allclose(vol.spacing, expected.header.get_zooms()[:3], rtol=1e-6)
    assert vol.original_shape == img.shape and vol.warnings == ()


@pytest.mark.parametrize("name", ["functional.nii", "example4d.nii.gz"])
def test_real_4d_files_follow_the_policy(name):
    path = os.path.join(data_path, name)
    img = nib.load(path)
    with pytest.raises(InputError) as err:
        load_volume(path)
    assert str(img.shape) in str(err.value) and "--frame" in str(err.value)
    last = img.shape[3] - 1
    vol = load_volume(path, frame=last)
    assert any(f"frame {last}" in w for w in vol.warnings)
    frame_img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., last], img.affine)
    expected = nib.as_closest_canonical(frame_img).get_fdata().astype(np.float32)
    np.testing.assert_array_equal(vol.data, expected)
    with pytest.raises(InputError, match="outside"):
        load_volume(path, frame=img.shape[3])


def test_scaling_is_applied(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "scaled.nii"))
    vol = load_volume(tmp_path / "scaled.nii")
    np.testing.assert_allclose(vol.data, data.astype(np.float32) * 0.5 + 10.0)


def test_4d_with_one_frame_loads_with_a_warning(tmp_path):
    data = np.random.default_rng(0).random((6, 7, 5, 1)).astype(np.float32)
    vol = load_volume(_save(tmp_path / "one.nii.gz", data))
    assert vol.shape == (6, 7, 5)
    assert vol.warnings and "4D" in vol.warnings[0]


# --- bad inputs ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz")


def test_not_nifti(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InputError, match="not a NIfTI"):
        load_volume(txt)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(InputError, match="fake.nii.gz"):
        load_volume(fake)
    plain = tmp_path / "fake.nii"
    plain.write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="fake.nii"):
        load_volume(plain)


def test_truncated_gz(tmp_path, vol3d):
    blob = vol3d.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="cut.nii.gz"):
        load_volume(cut)


def test_2d_image(tmp_path):
    path = _save(tmp_path / "flat.nii.gz", np.random.default_rng(0).random((20, 20)).astype(np.float32))
    with pytest.raises(InputError, match="2D"):
        load_volume(path)


def test_4d_refused_naming_the_shape(tmp_path):
    path = _save(tmp_path / "four.nii.gz", np.random.default_rng(0).random((6, 7, 5, 3)).astype(np.float32))
    with pytest.raises(InputError, match=r"\(6, 7, 5, 3\)"):
        load_volume(path)
    assert load_volume(path, frame=2).shape == (6, 7, 5)


def test_frame_on_3d_file(vol3d):
    with pytest.raises(InputError, match="3D"):
        load_volume(vol3d, frame=1)


def test_constant_volume(tmp_path):
    path = _save(tmp_path / "const.nii.gz", np.full((8, 8, 8), 7, dtype=np.int16))
    with pytest.raises(InputError, match="constant"):
        load_volume(path)


def test_all_nan_volume(tmp_path):
    path = _save(tmp_path / "nan.nii.gz", np.full((8, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="finite"):
        load_volume(path)


@pytest.mark.parametrize(
    "sform",
    [np.zeros((4, 4)), np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]])],
    ids=["zero", "singular"],
)
def test_zero_or_singular_affine(tmp_path, sform):
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    path = _save_with_raw_sform(tmp_path / "bad_affine.nii.gz", data, sform)
    with pytest.raises(InputError, match="singular or zero affine"):
        load_volume(path)


# --- masks --------------------------------------------------------------------------------


def test_mask_label_and_reorientation(tmp_path):
    rng = np.random.default_rng(2)
    affine = np.array([[-2.0, 0, 0, 10], [0, -2.0, 0, 5], [0, 0, 3.0, 0], [0, 0, 0, 1]])  # LPS
    data = rng.random((9, 8, 7)).astype(np.float32)
    labels = np.zeros((9, 8, 7), np.uint8)
    labels[1:4, 2:5, 1:3] = 5
    labels[6:8, 1:3, 4:6] = 2
    vol = load_volume(_save(tmp_path / "v.nii.gz", data, affine))
    mpath = _save(tmp_path / "m.nii.gz", labels, affine)
    liver = load_mask(mpath, like=vol, label=5)
    expected = nib.as_closest_canonical(nib.Nifti1Image(labels, affine)).get_fdata() == 5
    assert liver.dtype == bool and liver.shape == vol.shape
    np.testing.assert_array_equal(liver, expected)
    assert load_mask(mpath, like=vol).sum() == np.count_nonzero(labels)


def test_mask_shape_mismatch(tmp_path, vol3d):
    vol = load_volume(vol3d)
    mpath = _save(tmp_path / "m.nii.gz", np.ones((12, 10, 9), np.uint8))
    with pytest.raises(InputError, match="shape"):
        load_mask(mpath, like=vol)


def test_mask_affine_mismatch(tmp_path, vol3d):
    vol = load_volume(vol3d)
    shifted = np.diag([1.5, 1.5, 4.0, 1.0])
    shifted[0, 3] = 12.0
    mpath = _save(tmp_path / "m.nii.gz", np.ones((12, 10, 8), np.uint8), shifted)
    with pytest.raises(InputError, match="affine"):
        load_mask(mpath, like=vol)


def test_mask_without_the_label(tmp_path, vol3d):
    vol = load_volume(vol3d)
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    mpath = _save(tmp_path / "m.nii.gz", labels)
    with pytest.raises(InputError, match="label 3"):
        load_mask(mpath, like=vol, label=3)
    empty = _save(tmp_path / "empty.nii.gz", np.zeros((12, 10, 8), np.uint8))
    with pytest.raises(InputError, match="no non-zero"):
        load_mask(empty, like=vol)
