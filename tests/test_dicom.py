"""DICOM series -> Volume, built from pydicom's real MR_small.dcm (64x64 MR slice)."""

import json
import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402

from liverstage.runtime.cli import main  # noqa: E402
from liverstage.runtime.dicom import load_dicom_series, read_dicom_series  # noqa: E402
from liverstage.runtime.errors import InputError  # noqa: E402

MR_SMALL = get_testdata_file("MR_small.dcm")
GAP = 2.0


def write_series(folder, n=5, *, orientation=None, uid=None, gap=GAP, start=0):
    """n copies of MR_small with increasing ImagePositionPatient along the slice normal.

    Slice k's pixels get +1000*k so the order can be checked. Files are named in REVERSE order
    so sorting by file name would be wrong.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(MR_SMALL)
    iop = np.asarray(orientation if orientation is not None else [float(v) for v in base.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    paths = []
    for k in range(start, start + n):
        ds = pydicom.dcmread(MR_SMALL)
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in origin + k * gap * normal]
        ds.InstanceNumber = k + 1
        if uid is not None:
            ds.SeriesInstanceUID = uid
        ds.PixelData = (ds.pixel_array.astype(np.int16) + 1000 * k).astype(np.int16).tobytes()
        path = folder / f"img{100 - k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_series_shape_order_and_affine(tmp_path):
    write_series(tmp_path / "s", n=5)
    (tmp_path / "s" / "notes.txt").write_text("not dicom")  # ignored
    data, affine, warns = read_dicom_series(tmp_path / "s")
    base = pydicom.dcmread(MR_SMALL)
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


def test_canonical_volume(tmp_path):
    write_series(tmp_path / "s", n=4)
    vol = load_dicom_series(tmp_path / "s")
    assert vol.shape == (64, 64, 4)
    np.testing.assert_allclose(vol.spacing, (0.3125, 0.3125, GAP), atol=1e-6)
    # Canonical RAS: the LPS x/y axes are flipped; slices stay inferior -> superior.
    raw, _, _ = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.data, raw[::-1, ::-1, :])
    assert np.all(np.diag(vol.affine)[:3] > 0)


def test_oblique_orientation_matches_nibabel(tmp_path):
    """A sagittal series: in-plane columns of the affine agree with nibabel's own DICOM wrapper."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns its DICOM readers are experimental
        from nibabel.nicom import dicomwrappers

    iop = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    write_series(tmp_path / "sag", n=3, orientation=iop)
    _, affine, _ = read_dicom_series(tmp_path / "sag")
    first = pydicom.dcmread(tmp_path / "sag" / "img100.dcm")  # k = 0 is the lowest along the normal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = dicomwrappers.wrapper_from_data(first).affine  # LPS, voxel order (row, column)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(lps[:3, 0], ref[:3, 1], atol=1e-6)  # our axis 0 = column index
    np.testing.assert_allclose(lps[:3, 1], ref[:3, 0], atol=1e-6)  # our axis 1 = row index
    np.testing.assert_allclose(lps[:3, 3], ref[:3, 3], atol=1e-4)
    normal = np.cross(iop[:3], iop[3:])
    np.testing.assert_allclose(lps[:3, 2], GAP * normal, atol=1e-4)


def test_several_series_named(tmp_path):
    write_series(tmp_path / "s", n=2, uid="1.2.3.1")
    ds = pydicom.dcmread(MR_SMALL)
    ds.SeriesInstanceUID = "1.2.3.2"
    ds.save_as(tmp_path / "s" / "other.dcm")
    with pytest.raises(InputError, match=r"2 DICOM series.*1\.2\.3\.1.*1\.2\.3\.2"):
        read_dicom_series(tmp_path / "s")


@pytest.mark.parametrize("attr, value, message", [
    ("PixelSpacing", [0.5, 0.5], "PixelSpacing"),
    ("ImageOrientationPatient", [0.0, 1.0, 0.0, 0.0, 0.0, -1.0], "ImageOrientationPatient"),
    ("Rows", 32, "is 32x64"),
])
def test_inconsistent_slices_named(tmp_path, attr, value, message):
    paths = write_series(tmp_path / "s", n=3)
    ds = pydicom.dcmread(paths[1])
    setattr(ds, attr, value)
    ds.save_as(paths[1])
    with pytest.raises(InputError, match="inconsistent slices") as err:
        read_dicom_series(tmp_path / "s")
    assert paths[1].name in str(err.value) and message in str(err.value)


def test_uneven_gap_and_duplicate(tmp_path):
    paths = write_series(tmp_path / "gap", n=4)
    paths[2].unlink()  # a missing slice leaves a double gap
    with pytest.raises(InputError, match="uneven gap"):
        read_dicom_series(tmp_path / "gap")
    write_series(tmp_path / "dup", n=2)
    write_series(tmp_path / "dup2", n=1)
    (tmp_path / "dup" / "copy.dcm").write_bytes((tmp_path / "dup2" / "img100.dcm").read_bytes())
    with pytest.raises(InputError, match="same position"):
        read_dicom_series(tmp_path / "dup")


def test_predict_dicom_series(tmp_path, tiny_model, capsys):
    write_series(tmp_path / "series", n=6)
    report = tmp_path / "r.json"
    # Box in the series' own voxel grid [column, row, slice]: the bright middle of MR_small.
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "series"), "--model", str(tiny_model), "--bbox", "16,16,0,48,48,6",
              "--report", str(report), "--quiet"])
    assert exc.value.code == 0
    result = json.loads(report.read_text())["results"][0]
    assert result["input"] == str(tmp_path / "series")
    assert result["stage"] in ("A", "B", "C")
    assert len(result["crops"]) == 6
    assert sorted(c["slice"] for c in result["crops"]) == list(range(6))


def test_folder_without_images_is_one_line(tmp_path, tiny_model, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "empty"), "--model", str(tiny_model), "--roi", "auto",
              "--report", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "neither NIfTI files nor a DICOM series" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
