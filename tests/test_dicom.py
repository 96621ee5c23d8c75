"""One DICOM series -> Volume: geometry, pixel order, enhanced multi-frame, transfer syntaxes."""

import gzip
import io
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from liverstage.runtime.dicom import load_dicom_series, read_dicom_series  # noqa: E402
from liverstage.runtime.errors import InputError  # noqa: E402

GAP = 2.0


@pytest.fixture(scope="module")
def mr_small(dicom_series):
    return dicom_series.testdata("MR_small.dcm")


def write_copies(folder, mr_small, n=5, *, orientation=None, uid=None, gap=GAP):
    """n copies of MR_small with increasing ImagePositionPatient along the slice normal.

    Slice k's pixels get +1000*k so the order can be checked. Files are named in REVERSE order
    so sorting by file name would be wrong.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(mr_small)
    iop = np.asarray(orientation if orientation is not None else [float(v) for v in base.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(mr_small)
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in origin + k * gap * normal]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"
        if uid is not None:
            ds.SeriesInstanceUID = uid
        ds.PixelData = (ds.pixel_array.astype(np.int16) + 1000 * k).astype(np.int16).tobytes()
        path = folder / f"img{100 - k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_series_shape_order_and_affine(tmp_path, mr_small):
    write_copies(tmp_path / "s", mr_small, n=5)
    (tmp_path / "s" / "notes.txt").write_text("not dicom")  # ignored
    data, affine, warns = read_dicom_series(tmp_path / "s")
    base = pydicom.dcmread(mr_small)
    pixels = base.pixel_array.astype(np.float32)
    assert data.shape == (64, 64, 5)
    for k in range(5):  # sorted by position, not by file name; [i = column, j = row]
        np.testing.assert_array_equal(data[:, :, k], pixels.T + 1000 * k)
    # Axial slices, IOP = identity: RAS affine from MR_small's header values, derived by hand.
    x, y, z = (float(v) for v in base.ImagePositionPatient)
    dr, dc = (float(v) for v in base.PixelSpacing)
    expected = np.array([[-dc, 0, 0, -x], [0, -dr, 0, -y], [0, 0, GAP, z], [0, 0, 0, 1]])
    np.testing.assert_allclose(affine, expected, atol=1e-6)
    assert warns == []


def test_canonical_volume(tmp_path, mr_small):
    write_copies(tmp_path / "s", mr_small, n=4)
    vol = load_dicom_series(tmp_path / "s")
    assert vol.shape == (64, 64, 4)
    np.testing.assert_allclose(vol.spacing, (0.3125, 0.3125, GAP), atol=1e-6)
    # Canonical RAS: the LPS x/y axes are flipped; slices stay inferior -> superior.
    raw, _, _ = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.data, raw[::-1, ::-1, :])
    assert np.all(np.diag(vol.affine)[:3] > 0)


def test_rescale_slope_and_intercept_are_applied(tmp_path, mr_small):
    paths = write_copies(tmp_path / "s", mr_small, n=3)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-10"
        ds.save_as(path)
    data, _, _ = read_dicom_series(tmp_path / "s")
    stored = pydicom.dcmread(mr_small).pixel_array.astype(np.float32).T
    np.testing.assert_allclose(data[:, :, 1], (stored + 1000) * 2.5 - 10)


def _nibabel_affine(ds):
    """nibabel's own DICOM wrapper affine (LPS, voxel order row, column, slice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns its DICOM readers are experimental
        from nibabel.nicom import dicomwrappers

        return dicomwrappers.wrapper_from_data(ds).affine


def test_sagittal_orientation_matches_nibabel(tmp_path, mr_small):
    """A sagittal series: in-plane columns of the affine agree with nibabel's own DICOM wrapper."""
    iop = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    write_copies(tmp_path / "sag", mr_small, n=3, orientation=iop)
    _, affine, _ = read_dicom_series(tmp_path / "sag")
    ref = _nibabel_affine(pydicom.dcmread(tmp_path / "sag" / "img100.dcm"))  # k = 0 is the lowest along n
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(lps[:3, 0], ref[:3, 1], atol=1e-6)  # our axis 0 = column index
    np.testing.assert_allclose(lps[:3, 1], ref[:3, 0], atol=1e-6)  # our axis 1 = row index
    np.testing.assert_allclose(lps[:3, 3], ref[:3, 3], atol=1e-4)
    np.testing.assert_allclose(lps[:3, 2], GAP * np.cross(iop[:3], iop[3:]), atol=1e-4)


@pytest.mark.slow
def test_enhanced_philips_mr_geometry_matches_nibabel(tmp_path):
    """nibabel's real enhanced (multi-frame) Philips MPRAGE: geometry and voxels agree with nibabel."""
    import nibabel  # noqa: PLC0415

    path = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
    if not path.exists():
        pytest.skip(f"nibabel's test data is not installed here: {path}")
    ds = pydicom.dcmread(io.BytesIO(gzip.open(path).read()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns its DICOM readers are experimental
        from nibabel.nicom import dicomwrappers

        wrapper = dicomwrappers.wrapper_from_data(ds)
        ref_affine = wrapper.affine           # LPS, voxel order (row, column, slice)
        ref_data = wrapper.get_data()         # [row, column, slice], scaled
    file = tmp_path / "philips_mprage.dcm"
    ds.save_as(file)
    data, affine, warns = read_dicom_series([file])
    assert data.shape == (256, 256, 176) and warns == []
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(lps[:3, 0], ref_affine[:3, 1], atol=1e-4)
    np.testing.assert_allclose(lps[:3, 1], ref_affine[:3, 0], atol=1e-4)
    # nibabel orders frames by its own rule; compare the slice step up to its sign, and the voxels.
    if np.dot(lps[:3, 2], ref_affine[:3, 2]) < 0:
        ref_data = ref_data[:, :, ::-1]
        ref_affine = ref_affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, ref_data.shape[2] - 1], [0, 0, 0, 1]])
    np.testing.assert_allclose(lps[:3, 2], ref_affine[:3, 2], atol=1e-3)
    np.testing.assert_allclose(lps[:3, 3], ref_affine[:3, 3], atol=1e-2)
    np.testing.assert_allclose(data, ref_data.transpose(1, 0, 2), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_real_transfer_syntaxes_decode_like_the_uncompressed_file(dicom_series, mr_small, name):
    data, affine, warns = read_dicom_series([dicom_series.testdata(name)])
    ref, ref_affine, _ = read_dicom_series([mr_small])
    np.testing.assert_array_equal(data, ref)
    np.testing.assert_allclose(affine[:3, :2], ref_affine[:3, :2])
    assert warns == ["single-slice DICOM series"]


def test_lossy_real_file_is_a_warning(dicom_series):
    """pydicom-data's MR2_J2KI: JPEG 2000 lossy, LossyImageCompression 01."""
    _, _, warns = read_dicom_series([dicom_series.testdata("MR2_J2KI.dcm")])
    assert any(w.startswith("lossy compression: LossyImageCompression is 01") for w in warns)


def test_several_series_named(tmp_path, mr_small):
    write_copies(tmp_path / "s", mr_small, n=2, uid="1.2.3.1")
    ds = pydicom.dcmread(mr_small)
    ds.SeriesInstanceUID = "1.2.3.2"
    ds.save_as(tmp_path / "s" / "other.dcm")
    with pytest.raises(InputError, match=r"2 DICOM series.*1\.2\.3\.1.*1\.2\.3\.2"):
        read_dicom_series(tmp_path / "s")


@pytest.mark.parametrize("attr, value, message", [
    ("PixelSpacing", [0.5, 0.5], "another PixelSpacing"),
    ("ImageOrientationPatient", [0.0, 1.0, 0.0, 0.0, 0.0, -1.0], "mixed orientations"),
    ("Rows", 32, "is 32x64"),
    ("FrameOfReferenceUID", "1.2.3.4", "2 frames of reference"),
])
def test_inconsistent_slices_named(tmp_path, mr_small, attr, value, message):
    paths = write_copies(tmp_path / "s", mr_small, n=3)
    ds = pydicom.dcmread(paths[1])
    setattr(ds, attr, value)
    ds.save_as(paths[1])
    with pytest.raises(InputError, match=message) as err:
        read_dicom_series(tmp_path / "s")
    assert str(tmp_path / "s") in str(err.value)
    if attr != "FrameOfReferenceUID":
        assert paths[1].name in str(err.value)


def test_gap_and_duplicate_named(tmp_path, mr_small):
    paths = write_copies(tmp_path / "gap", mr_small, n=4)
    paths[2].unlink()  # a missing slice leaves a double gap
    with pytest.raises(InputError, match=r"slice gap: 4 mm between img099.dcm and img097.dcm.*missing slice"):
        read_dicom_series(tmp_path / "gap")
    paths = write_copies(tmp_path / "dup", mr_small, n=3)
    ds = pydicom.dcmread(paths[1])
    ds.ImagePositionPatient = pydicom.dcmread(paths[0]).ImagePositionPatient
    ds.save_as(paths[1])
    with pytest.raises(InputError, match="duplicate positions: img100.dcm and img099.dcm|duplicate positions: img099.dcm and img100.dcm"):
        read_dicom_series(tmp_path / "dup")
