"""load_mask compares voxel grids in world space: any stored axis order applies, any other grid is refused."""

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from liverstage.runtime.errors import InputError
from liverstage.runtime.io import load_mask, load_volume

AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, -1.25, 0, 30.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])  # LPS-like


@pytest.fixture
def volume_and_labels(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.normal(100, 10, (12, 10, 7)).astype(np.float32)
    labels = np.zeros((12, 10, 7), np.uint8)
    labels[2:7, 3:8, 1:5] = 1
    labels[8:10, 1:3, 5:7] = 2
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "v.nii.gz")
    return load_volume(tmp_path / "v.nii.gz"), labels


@pytest.mark.parametrize("ornt", [
    [[2, 1], [0, -1], [1, 1]],     # slice axis stored first (a TotalSegmentator mask of a dcm2niix conversion)
    [[0, -1], [1, -1], [2, -1]],   # every axis flipped
    [[1, 1], [0, 1], [2, 1]],      # in-plane axes swapped
])
def test_mask_in_another_axis_order_applies(tmp_path, volume_and_labels, ornt):
    volume, labels = volume_and_labels
    ornt = np.array(ornt, dtype=float)
    stored = orientations.apply_orientation(labels, ornt)
    affine = AFFINE @ orientations.inv_ornt_aff(ornt, labels.shape)
    nib.save(nib.Nifti1Image(stored, affine), tmp_path / "m.nii.gz")
    region = load_mask(tmp_path / "m.nii.gz", like=volume, label=1)
    expected = nib.as_closest_canonical(nib.Nifti1Image(labels, AFFINE)).get_fdata() == 1
    assert region.shape == volume.shape
    np.testing.assert_array_equal(region, expected)


@pytest.mark.parametrize("change, message", [
    (lambda a: a @ np.diag([2.0, 1.0, 1.0, 1.0]), "different affine"),        # other voxel size
    (lambda a: a + np.array([[0, 0, 0, 1.5]] * 3 + [[0, 0, 0, 0]]), "different affine"),  # shifted one voxel
])
def test_mask_on_another_grid_is_refused(tmp_path, volume_and_labels, change, message):
    volume, labels = volume_and_labels
    nib.save(nib.Nifti1Image(labels, change(AFFINE)), tmp_path / "m.nii.gz")
    with pytest.raises(InputError, match=message):
        load_mask(tmp_path / "m.nii.gz", like=volume)


def test_mask_of_another_shape_is_refused_in_canonical_terms(tmp_path, volume_and_labels):
    volume, _ = volume_and_labels
    nib.save(nib.Nifti1Image(np.ones((7, 12, 11), np.uint8), AFFINE[:, [2, 0, 1, 3]]), tmp_path / "m.nii.gz")
    with pytest.raises(InputError, match=r"has shape \(7, 12, 11\).*after reorienting both to RAS: \(12, 11, 7\) vs \(12, 10, 7\)"):
        load_mask(tmp_path / "m.nii.gz", like=volume)
