"""Liver region from a box in stored voxel coordinates, and the `auto` heuristic on phantoms."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from liverstage.runtime.errors import InputError
from liverstage.runtime.io import load_mask, load_volume
from liverstage.runtime.manifest import read_manifest
from liverstage.runtime.roi import largest_component, parse_bbox, region_auto, region_from_bbox, resolve_region


@pytest.fixture
def lps_volume(tmp_path):
    affine = np.array([[-1.2, 0, 0, 30], [0, 0, 3.0, -10], [0, -1.2, 0, 20], [0, 0, 0, 1]])  # L, S?, P
    data = np.random.default_rng(0).random((20, 9, 16)).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, affine, data.shape


def test_bbox_maps_through_the_orientation(lps_volume):
    path, affine, shape = lps_volume
    vol = load_volume(path)
    assert vol.shape != shape  # the stored order really differs from canonical
    box = (2, 1, 3, 9, 5, 12)
    stored = np.zeros(shape, np.uint8)
    stored[2:9, 1:5, 3:12] = 1
    expected = nib.as_closest_canonical(nib.Nifti1Image(stored, affine)).get_fdata() > 0
    np.testing.assert_array_equal(region_from_bbox(vol, box), expected)
    np.testing.assert_array_equal(region_from_bbox(vol, "2,1,3,9,5,12"), expected)


@pytest.mark.parametrize("box", [(0, 0, 0, 21, 9, 16), (-1, 0, 0, 5, 5, 5), (5, 5, 5, 5, 6, 6), (0, 0, 16, 4, 4, 17)])
def test_bbox_outside_the_volume(lps_volume, box):
    vol = load_volume(lps_volume[0])
    with pytest.raises(InputError, match="outside the volume"):
        region_from_bbox(vol, box)


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d,e,f", "1,2,3,4,5,6.5", "1,2,3,4,5,6,7"])
def test_bbox_must_be_six_integers(text):
    with pytest.raises(InputError, match="six integers"):
        parse_bbox(text)


def test_largest_component():
    mask = np.zeros((10, 10, 4), bool)
    mask[1:3, 1:3, 0:2] = True  # 8 voxels
    mask[5:9, 5:9, 1:3] = True  # 32 voxels
    mask[0, 9, 3] = True
    out = largest_component(mask)
    assert out.sum() == 32 and out[5:9, 5:9, 1:3].all()
    snake = np.zeros((7, 7, 1), bool)  # one long U-shaped component beats a blob of 9
    snake[0, :, 0] = snake[:, 6, 0] = snake[6, :, 0] = True
    snake[2:5, 1:4, 0] = False
    blob = snake.copy()
    blob[2:5, 2:5, 0] = True
    assert largest_component(blob).sum() == snake.sum()


def test_auto_finds_the_liver_on_phantoms(small_cohort):
    """Rough, not a segmentation: most phantoms' auto region overlaps the true liver well."""
    ious = []
    for row in read_manifest(small_cohort):
        vol = load_volume(row.image)
        truth = load_mask(row.mask, like=vol)
        auto = region_auto(vol)
        ious.append((auto & truth).sum() / (auto | truth).sum())
        # the region sits on the patient's right, like the liver (high x in RAS+)
        assert np.nonzero(auto)[0].mean() > vol.shape[0] / 2
    assert np.median(ious) > 0.45, ious
    assert np.mean(np.array(ious) > 0.3) >= 0.75, ious


def test_resolve_region_checks_its_options(small_volume_path):
    vol = load_volume(small_volume_path[0])
    with pytest.raises(InputError, match="exactly one"):
        resolve_region(vol)
    with pytest.raises(InputError, match="needs --mask"):
        resolve_region(vol, roi="auto", mask_label=1)
    with pytest.raises(InputError, match="'auto'"):
        resolve_region(vol, roi="magic")
