"""The one preprocessing path: orientation invariance, slice choice, normalisation, resampling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from liverstage.runtime.crops import crops_for_volume, make_crops, normalise_image2d, resize2d
from liverstage.runtime.errors import InputError
from liverstage.runtime.io import load_mask, load_volume
from liverstage.runtime.spec import PreprocessSpec

SPEC = PreprocessSpec(crop_size=48)

# canonical -> stored: axis orders and flips (the identity plus five others)
ORIENTATIONS = {
    "RAS": [[0, 1], [1, 1], [2, 1]],
    "LPS": [[0, -1], [1, -1], [2, 1]],
    "LAS": [[0, -1], [1, 1], [2, 1]],
    "swap_xy": [[1, 1], [0, -1], [2, 1]],
    "RPI": [[0, 1], [1, -1], [2, -1]],
    "z_first": [[2, -1], [0, 1], [1, 1]],
}


def _store(tmp_path, name, canon_data, canon_mask, canon_affine, ornt):
    """Write the same anatomy stored with `ornt`, affine to match; return (image, mask) paths."""
    ornt = np.array(ornt, dtype=float)
    data = orientations.apply_orientation(canon_data, ornt)
    mask = orientations.apply_orientation(canon_mask, ornt)
    affine = canon_affine @ orientations.inv_ornt_aff(ornt, canon_data.shape)
    img, msk = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(img))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mask), affine), str(msk))
    return img, msk


@pytest.fixture(scope="module")
def canonical_phantom(small_volume_path):
    """A phantom's canonical array, mask and affine, taken through the loader once."""
    image, mask = small_volume_path
    vol = load_volume(image)
    region = load_mask(mask, like=vol)
    return vol.data.astype(np.int16), region.astype(np.uint8), vol.affine


def test_same_anatomy_any_orientation_gives_identical_crops(tmp_path, canonical_phantom):
    data, mask, affine = canonical_phantom
    results = {}
    for name, ornt in ORIENTATIONS.items():
        img, msk = _store(tmp_path, name, data, mask, affine, ornt)
        stored_codes = nib.aff2axcodes(nib.load(str(img)).affine)
        results[name] = (stored_codes, crops_for_volume(img, spec=SPEC, mask=msk))
    assert len({codes for codes, _ in results.values()}) == len(ORIENTATIONS)  # really different
    _, ref = results["RAS"]
    assert len(ref) > 3
    for name, (_, cs) in results.items():
        assert cs.images.tobytes() == ref.images.tobytes(), name
        np.testing.assert_array_equal(cs.slices, ref.slices)
        np.testing.assert_array_equal(cs.boxes, ref.boxes)
        np.testing.assert_allclose(cs.spacing, ref.spacing, rtol=1e-6)


def test_bbox_in_stored_coordinates_gives_identical_crops(tmp_path, canonical_phantom):
    data, mask, affine = canonical_phantom
    xs, ys, zs = (np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))[0] for k in range(3))
    box_c = np.zeros(mask.shape, np.uint8)
    box_c[xs[0] : xs[-1] + 1, ys[0] : ys[-1] + 1, zs[0] : zs[-1] + 1] = 1
    results = []
    for name in ("RAS", "LPS", "swap_xy", "z_first"):
        img, msk = _store(tmp_path, name, data, box_c, affine, ORIENTATIONS[name])
        stored = np.asanyarray(nib.load(str(msk)).dataobj)
        lo = [int(np.nonzero(stored.any(axis=tuple(a for a in range(3) if a != k)))[0][0]) for k in range(3)]
        hi = [int(np.nonzero(stored.any(axis=tuple(a for a in range(3) if a != k)))[0][-1]) + 1 for k in range(3)]
        results.append(crops_for_volume(img, spec=SPEC, bbox=tuple(lo + hi)))
        by_mask = crops_for_volume(img, spec=SPEC, mask=msk)
        assert by_mask.images.tobytes() == results[-1].images.tobytes()
    for cs in results[1:]:
        assert cs.images.tobytes() == results[0].images.tobytes()


def test_slice_choice_boxes_and_range(small_volume_path):
    image, mask = small_volume_path
    vol = load_volume(image)
    region = load_mask(mask, like=vol)
    spec = PreprocessSpec(crop_size=40, min_area_fraction=0.5, box_margin=0.25)
    cs = make_crops(vol, region, spec)
    areas = region.sum(axis=(0, 1))
    np.testing.assert_array_equal(cs.slices, np.nonzero(areas >= 0.5 * areas.max())[0])
    assert cs.images.shape == (len(cs.slices), 1, 40, 40) and cs.images.dtype == np.float32
    assert cs.images.min() >= spec.clip_low and cs.images.max() <= spec.clip_high
    assert cs.region_voxels == int(region.sum())
    for z, (x0, y0, x1, y1) in zip(cs.slices, cs.boxes):
        assert x1 - x0 == y1 - y0  # square
        xs = np.nonzero(region[:, :, z].any(axis=1))[0]
        ys = np.nonzero(region[:, :, z].any(axis=0))[0]
        side = max(xs[-1] + 1 - xs[0], ys[-1] + 1 - ys[0])
        assert x0 <= xs[0] and xs[-1] < x1 and y0 <= ys[0] and ys[-1] < y1  # region inside
        assert x1 - x0 >= side * 1.5  # grown by the margin on both sides
    # the liver's own intensities land around 0..1: its median between the percentiles
    lo, hi = cs.intensity_range
    assert lo < float(np.median(vol.data[region])) < hi


def test_affine_intensity_change_does_not_change_crops(tmp_path, canonical_phantom):
    data, mask, affine = canonical_phantom
    a = tmp_path / "a.nii.gz"
    b = tmp_path / "b.nii.gz"
    m = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(a))
    nib.save(nib.Nifti1Image(data.astype(np.float32) * 4.0 + 256.0, affine), str(b))
    nib.save(nib.Nifti1Image(mask, affine), str(m))
    ca, cb = crops_for_volume(a, spec=SPEC, mask=m), crops_for_volume(b, spec=SPEC, mask=m)
    np.testing.assert_allclose(ca.images, cb.images, atol=1e-5)


def test_nan_inside_region_refused_outside_tolerated(tmp_path, canonical_phantom):
    data, mask, affine = canonical_phantom
    data = data.astype(np.float32)
    m = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(mask, affine), str(m))
    outside = data.copy()
    outside[0, 0, :] = np.nan  # a corner, in every slice
    path = tmp_path / "out_nan.nii.gz"
    nib.save(nib.Nifti1Image(outside, affine), str(path))
    cs = crops_for_volume(path, spec=SPEC, mask=m)
    assert np.isfinite(cs.images).all()
    inside = data.copy()
    idx = np.argwhere(mask > 0)[len(np.argwhere(mask > 0)) // 2]
    inside[tuple(idx)] = np.inf
    path = tmp_path / "in_nan.nii.gz"
    nib.save(nib.Nifti1Image(inside, affine), str(path))
    with pytest.raises(InputError, match="non-finite"):
        crops_for_volume(path, spec=SPEC, mask=m)


def test_constant_region_refused(tmp_path):
    data = np.random.default_rng(0).random((20, 20, 6)).astype(np.float32)
    data[5:15, 5:15, :] = 3.0
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(InputError, match="constant"):
        crops_for_volume(path, spec=SPEC, bbox=(6, 6, 0, 14, 14, 6))


def test_region_must_match_volume(small_volume_path):
    vol = load_volume(small_volume_path[0])
    with pytest.raises(InputError, match="shape"):
        make_crops(vol, np.ones((3, 3, 3), bool), SPEC)
    with pytest.raises(InputError, match="empty"):
        make_crops(vol, np.zeros(vol.shape, bool), SPEC)


def test_exactly_one_region_source(small_volume_path):
    image, mask = small_volume_path
    with pytest.raises(InputError, match="exactly one"):
        crops_for_volume(image, spec=SPEC)
    with pytest.raises(InputError, match="exactly one"):
        crops_for_volume(image, spec=SPEC, mask=mask, roi="auto")


# --- resampling ---------------------------------------------------------------------------


def test_resize_same_size_is_identity():
    a = np.random.default_rng(3).random((17, 17))
    np.testing.assert_array_equal(resize2d(a, 17), a)


def axis0(a, n):
    """The plain resample along axis 0: 0 + w0*a0 + w1*a1 + ... in float64, every tap in order."""
    from liverstage.runtime.crops import _resample_taps

    idx, w = _resample_taps(a.shape[0], n)
    out = np.zeros((n,) + a.shape[1:])
    for k in range(idx.shape[1]):
        out = out + w[:, k, None] * a[idx[:, k]]
    return out


def test_resize_is_the_plain_per_tap_sum_bit_for_bit():
    """However resize2d is arranged for speed, every output is 0 + w0*a0 + w1*a1 + ... in float64,
    taps in order, so crops never change with its implementation."""
    rng = np.random.default_rng(5)
    for shape, (rows, cols) in (((37, 53), (224, 224)), ((150, 150), (64, 64)), ((9, 200), (31, 17))):
        image = np.clip(rng.standard_normal(shape), -0.5, 1.5)
        want = np.ascontiguousarray(axis0(np.ascontiguousarray(axis0(image, rows).T), cols).T)
        assert resize2d(image, (rows, cols)).tobytes() == want.tobytes()


@pytest.mark.parametrize("inset", [0, 2])
def test_make_crops_is_the_plain_computation_bit_for_bit(inset):
    """However make_crops is arranged for speed, each crop is: cut the box (raw values, the fill
    outside the image), normalise the whole box with the percentiles of the region less `inset`
    in-plane voxels along its edge (scipy's erosion), flip to display, the plain per-tap resize,
    and float32 at the end. Boxes leave the image, voxels outside the region are NaN, inf and -0.0."""
    from scipy.ndimage import binary_erosion

    from liverstage.runtime.crops import _square_box
    from liverstage.runtime.io import volume_from_array

    rng = np.random.default_rng(11)
    data = rng.normal(300.0, 80.0, (40, 36, 9)).astype(np.float32)
    region = np.zeros(data.shape, bool)
    region[2:30, 5:36, 1:8] = True
    data[~region & (rng.random(data.shape) < 0.05)] = np.nan
    data[0, 0, :] = np.inf
    data[1, 1, :] = -0.0
    spec = PreprocessSpec(crop_size=56, box_margin=0.3, percentile_inset=inset)
    volume = volume_from_array(data, np.eye(4), source="synthetic")
    got = make_crops(volume, region, spec)
    cross = np.zeros((3, 3, 3), bool)
    cross[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    core = binary_erosion(region, structure=cross, iterations=inset) if inset else region
    assert inset == 0 or 0.5 * region.sum() <= core.sum() < region.sum()  # the inset is used, not the fallback
    lo, hi = np.percentile(volume.data[core].astype(np.float64), [spec.percentile_low, spec.percentile_high])
    assert got.intensity_range == (lo, hi)
    assert len(got) == 7
    for image, z in zip(got.images, got.slices):
        xs, ys = np.nonzero(region[:, :, z].any(axis=1))[0], np.nonzero(region[:, :, z].any(axis=0))[0]
        x0, y0, x1, y1 = _square_box(xs[0], xs[-1] + 1, ys[0], ys[-1] + 1, spec.box_margin)
        assert x0 < 0 or y0 < 0 or x1 > data.shape[0] or y1 > data.shape[1]  # the box leaves the image
        box = np.full((x1 - x0, y1 - y0), lo + spec.clip_low * (hi - lo))
        sx, sy = slice(max(x0, 0), min(x1, data.shape[0])), slice(max(y0, 0), min(y1, data.shape[1]))
        box[sx.start - x0 : sx.stop - x0, sy.start - y0 : sy.stop - y0] = volume.data[sx, sy, z]
        box = (box - lo) / (hi - lo)
        box[~np.isfinite(box)] = spec.clip_low
        display = np.clip(box, spec.clip_low, spec.clip_high)[::-1, ::-1].T
        want = axis0(np.ascontiguousarray(axis0(np.ascontiguousarray(display), 56).T), 56).T.astype(np.float32)
        assert image[0].tobytes() == np.ascontiguousarray(want).tobytes()


def test_shrinking_is_anti_aliased():
    checker = (np.indices((96, 96)).sum(axis=0) % 2).astype(np.float64)  # highest frequency
    small = resize2d(checker, 24)
    assert abs(small.mean() - 0.5) < 1e-9
    assert small.std() < 0.02  # nearest/point sampling would give all 0 or all 1 here
    naive = checker[::4, ::4]
    assert naive.std() == 0.0 and naive.mean() in (0.0, 1.0)


def test_enlarging_interpolates_between_pixels():
    ramp = np.tile(np.arange(8, dtype=np.float64), (8, 1))
    big = resize2d(ramp, 32)
    assert np.all(np.diff(big, axis=1) >= -1e-12) and np.all(np.diff(big, axis=0) == 0)
    assert big.min() >= 0 and big.max() <= 7


def test_normalise_image2d():
    spec = PreprocessSpec(crop_size=32)
    img = np.random.default_rng(4).normal(100, 10, (50, 70))
    out = normalise_image2d(img, spec)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    assert spec.clip_low <= out.min() and out.max() <= spec.clip_high
    rgb = np.stack([img, img, img], axis=-1)
    np.testing.assert_allclose(normalise_image2d(rgb, spec), out, atol=1e-6)
    with pytest.raises(InputError, match="constant"):
        normalise_image2d(np.ones((10, 10)), spec)
    with pytest.raises(InputError, match="2D"):
        normalise_image2d(np.ones((4, 10, 10, 2)), spec)


def test_erosion_in_plane_is_scipys():
    """eroded_in_plane: scipy.ndimage.binary_erosion with a 4-neighbour cross in each slice
    (outside the array counts as outside), on random regions of every density."""
    from scipy.ndimage import binary_erosion

    from liverstage.runtime.crops import eroded_in_plane

    rng = np.random.default_rng(21)
    cross = np.zeros((3, 3, 3), bool)
    cross[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 18, size=3))
        region = np.asfortranarray(rng.random(shape) < rng.uniform(0.3, 1.0))
        for steps in (0, 1, 2, 3):
            want = binary_erosion(region, structure=cross, iterations=steps) if steps else region
            assert np.array_equal(eroded_in_plane(region, steps), want), (shape, steps)
    assert not eroded_in_plane(np.zeros((5, 5, 2), bool), 2).any()


def _liver_phantom_with_dark_rim():
    """A bright ellipse of liver (values ~ 700 +- 60) inside a darker rim of fat (200) and a
    dark background, over 10 slices, and its exact mask."""
    rng = np.random.default_rng(3)
    x, y = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    liver2d = ((x - 48) / 30.0) ** 2 + ((y - 44) / 22.0) ** 2 <= 1.0
    body2d = ((x - 48) / 44.0) ** 2 + ((y - 46) / 40.0) ** 2 <= 1.0
    data = np.where(body2d, 200.0, 20.0)[:, :, None] + rng.normal(0, 15, (96, 96, 10))
    liver = np.repeat(liver2d[:, :, None], 10, axis=2)
    data[liver] = rng.normal(700, 60, int(liver.sum()))
    from liverstage.runtime.io import volume_from_array

    return volume_from_array(data.astype(np.float32), np.diag([1.5, 1.5, 5.0, 1.0]), source="rim phantom"), liver


def test_a_mask_one_voxel_too_wide_keeps_the_normalisation():
    """Why percentile_inset exists: a mask one in-plane voxel wider than the liver takes in a
    ring of fat (here 7 % of its voxels). With the inset the percentiles come from the liver's
    interior either way and the crops hardly change; without it the 0.5th percentile falls into
    the fat and every crop changes by a large share of its range."""
    from scipy.ndimage import binary_dilation

    volume, liver = _liver_phantom_with_dark_rim()
    cross = np.zeros((3, 3, 3), bool)
    cross[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    ring = binary_dilation(liver, structure=cross) & ~liver  # the voxels just outside the liver
    wide = liver | ring
    assert 0.05 < ring.sum() / wide.sum() < 0.15
    for inset, most in ((PreprocessSpec().percentile_inset, 0.02), (2, 0.02), (0, None)):
        spec = PreprocessSpec(crop_size=48, percentile_inset=inset)
        exact, loose = make_crops(volume, liver, spec), make_crops(volume, wide, spec)
        (lo, hi), (lo_w, hi_w) = exact.intensity_range, loose.intensity_range
        shift = abs(lo_w - lo) / (hi - lo)
        if most is None:
            assert shift > 0.3, shift
        else:
            assert shift < most, shift


def test_a_region_too_thin_for_the_inset_uses_all_of_it():
    """A region three voxels wide would keep a third of itself after a 2-voxel inset (less than
    half): its percentiles come from the whole region, as with no inset."""
    from liverstage.runtime.crops import percentile_region

    region = np.zeros((20, 20, 4), bool)
    region[5:8, 2:18, :] = True
    assert percentile_region(region, 2) is region
    wide = np.zeros((20, 20, 4), bool)
    wide[2:18, 2:18, :] = True
    core = percentile_region(wide, 2)
    assert core.sum() == 12 * 12 * 4
