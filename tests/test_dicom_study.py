"""DICOM study folders: listing every series, the series rules, choosing one, staging a study.

The distractor study is one real study of pydicom's test data (a localizer, a 3-plane pilot and
a derived projection, each in its own subfolder) with a phantom axial series written into it.
"""

import json
import math

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from liverstage.runtime.dicom_study import (  # noqa: E402
    MIN_SLICES, Study, dicom_headers, find_studies, scan_dicom, select_series, series_verdict)
from liverstage.runtime.errors import InputError  # noqa: E402
from liverstage.runtime.predict import Predictor, resolve_inputs  # noqa: E402


@pytest.fixture(scope="module")
def phantom(small_cohort, dicom_series):
    """Phantom 2 of the small cohort (stored slice axis first): (volume path, mask path, Volume)."""
    return dicom_series.phantom_case(small_cohort, 2)


@pytest.fixture(scope="module")
def study(tmp_path_factory, phantom, dicom_series):
    """The real study with the phantom's axial series (number 5) added, plus a non-DICOM file."""
    root = tmp_path_factory.mktemp("study") / "exam"
    dicom_series.real_distractors(root)
    dicom_series.volume_as_series(phantom[2], root / "ax", study_uid=dicom_series.REAL_STUDY_UID)
    (root / "notes.txt").write_text("not DICOM")
    return root


@pytest.fixture(scope="module")
def two_candidates(tmp_path_factory, phantom, dicom_series):
    """A study with two series that pass the rules: 5 'AX T1 LIVER' and 6 'AX T2 LIVER'."""
    root = tmp_path_factory.mktemp("two") / "exam"
    dicom_series.real_distractors(root)
    for number, description in ((5, "AX T1 LIVER"), (6, "AX T2 LIVER")):
        dicom_series.volume_as_series(phantom[2], root / f"s{number}", study_uid=dicom_series.REAL_STUDY_UID,
                                      series_number=number, description=description)
    return root


def test_scan_lists_every_series_with_why(study):
    series = scan_dicom(study)
    assert [s.series_number for s in series] == [1, 2, 5, 700]
    by_number = {s.series_number: s for s in series}
    assert {s.study_instance_uid for s in series} == {"1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.1"}
    assert [n for n, s in by_number.items() if s.stageable] == [5]
    assert by_number[1].orientation == "sagittal" and "localizer" in by_number[1].reason
    assert by_number[2].orientation == "mixed" and "localizer" in by_number[2].reason
    assert by_number[700].image_type[:2] == ("DERIVED", "SECONDARY") and "not ORIGINAL\\PRIMARY" in by_number[700].reason
    ax = by_number[5]
    assert (ax.orientation, ax.n_instances, ax.n_frames, ax.modality) == ("axial", 16, 16, "MR")
    assert ax.transfer_syntaxes == ("1.2.840.10008.1.2.1",) and not ax.lossy
    assert "axial" in ax.reason and "16 slices" in ax.reason
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in ax.files]
    assert z == sorted(z) and len(set(z)) == 16  # slice order, not file-name order
    assert sorted(f.name for f in ax.files) != [f.name for f in ax.files]


def test_series_command_table_and_json(run_cli, study, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich folds long cells on a narrow console
    code, out, err = run_cli(["series", study])
    assert code == 0, err
    assert "AX T1 LIVER" in out and "FAST LOCALIZER" in out and "ANGIO" in out
    assert "no: localizer" in out and "yes" in out
    code, out, _ = run_cli(["series", study, "--json"])
    assert code == 0
    assert json.loads(out) == [s.to_dict() for s in scan_dicom(study)]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    for folder, message in ((tmp_path / "empty", "no DICOM images found"), (tmp_path / "absent", "not found")):
        code, out, err = run_cli(["series", folder])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def _rotated_x(affine, degrees):
    t = math.radians(degrees)
    rot = np.array([[1, 0, 0, 0], [0, math.cos(t), -math.sin(t), 0], [0, math.sin(t), math.cos(t), 0], [0, 0, 0, 1]])
    return rot @ affine


@pytest.mark.parametrize("layout, expected, stageable", [
    ("axial tilted 10 degrees", "axial (tilt 10.0 degrees)", True),
    ("tilted 30 degrees", "oblique slices (normal 30 degrees", False),
    ("coronal", "coronal slices", False),
    ("5 slices", f"5 slices; at least {MIN_SLICES} are needed", False),
])
def test_verdict_orientation_and_slices(tmp_path, phantom, dicom_series, layout, expected, stageable):
    vol = phantom[2]
    data, affine = np.rint(vol.data).astype(np.int16), vol.affine
    if layout.startswith("axial tilted"):
        affine = _rotated_x(affine, 10)
    elif layout.startswith("tilted"):
        affine = _rotated_x(affine, 30)
    elif layout == "coronal":
        data, affine = data.transpose(0, 2, 1), affine[:, [0, 2, 1, 3]]
    else:
        data = data[:, :, :5]
    dicom_series.write_series(tmp_path / "s", data, affine)
    verdict = series_verdict(dicom_headers(tmp_path / "s"))
    assert verdict[0] is stageable and expected in verdict[1], verdict


def _set(attr, value):
    def change(headers):
        for ds in headers:
            setattr(ds, attr, value)
    return change


def _one(attr, value):
    def change(headers):
        setattr(headers[3], attr, value)
    return change


def _drop(attr):
    def change(headers):
        delattr(headers[3], attr)
    return change


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("change, expected", [
    (_set("Modality", "CT"), "modality CT, not MR"),
    (_set("ImageType", ["DERIVED", "PRIMARY", "MPR"]), "image type DERIVED\\PRIMARY\\MPR: not ORIGINAL\\PRIMARY"),
    (_set("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]), "localizer by image type (LOCALIZER)"),
    (_set("SeriesDescription", "3-Plane Loc SSFSE"), "localizer or scout by its description"),
    (_set("SeriesDescription", "Survey_32ch"), "localizer or scout by its description"),
    (_one("ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), "mixed orientations: 2 planes (axial, sagittal)"),
    (_one("ImagePositionPatient", ["nan", 0, 0]), "non-finite ImagePositionPatient"),
    (_drop("PixelSpacing"), "no valid PixelSpacing (missing geometry)"),
    (_drop("ImageOrientationPatient"), "no valid ImageOrientationPatient (missing geometry)"),
    (_one("PixelSpacing", [0, 1]), "non-positive PixelSpacing"),
    (_drop("FrameOfReferenceUID"), "no FrameOfReferenceUID"),
])
def test_verdict_rules_on_headers(study, change, expected):
    headers = dicom_headers(study / "ax")
    assert series_verdict(headers)[0] is True
    change(headers)
    stageable, reason = series_verdict(headers)
    assert not stageable and expected in reason, reason
    if "geometry" in expected or "non-" in expected:
        assert headers[3].filename.endswith(".dcm") and headers[3].filename.rsplit("/", 1)[1] in reason


def test_select_series_rules_and_choice(study, two_candidates):
    assert select_series(scan_dicom(study)).series_number == 5
    series = scan_dicom(two_candidates)
    with pytest.raises(InputError, match=r"2 series could be staged: 5 'AX T1 LIVER' \(1\.2.*\); 6 'AX T2 LIVER'.*pick one with --series"):
        select_series(series)
    six = select_series(series, choice="6")
    assert six.description == "AX T2 LIVER"
    assert select_series(series, choice=six.series_instance_uid) == six
    assert select_series(series, choice="t2") == six  # a description pattern, case-insensitive
    with pytest.raises(InputError, match="'LIVER' in study .*: 2 series could be staged.*give its number"):
        select_series(series, choice="LIVER")
    with pytest.raises(InputError, match=r"'LOCALIZER' in study .*: none of its 1 series can be staged: 1 'FAST LOCALIZER' \(localizer"):
        select_series(series, choice="LOCALIZER")
    with pytest.raises(InputError, match="'99' matches none of the 5 series"):
        select_series(series, choice="99")
    with pytest.raises(InputError, match="not a SeriesInstanceUID, a series number or a valid description pattern"):
        select_series(series, choice="T1(")
    real_only = [s for s in series if s.series_number not in (5, 6)]
    with pytest.raises(InputError, match=r"none of its 3 series can be staged: 1 'FAST LOCALIZER' \(localizer.*; 700 "):
        select_series(real_only)


def test_predict_stages_the_axial_series_and_says_why(run_cli, tiny_model, study, phantom, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", study, "--model", tiny_model, "--mask", phantom[1], "--report", report, "--quiet"])
    assert code == 0, err
    result = json.loads(report.read_text())["results"][0]
    assert result["input"] == str(study)
    ax = next(s for s in scan_dicom(study) if s.series_number == 5)
    assert result["series"] == {
        "study_instance_uid": ax.study_instance_uid, "series_instance_uid": ax.series_instance_uid,
        "series_number": 5, "description": "AX T1 LIVER", "modality": "MR",
        "reason": f"the only one of the study's 4 series that passes the rules: {ax.reason}",
        "transfer_syntax": ["1.2.840.10008.1.2.1"], "lossy": False}
    assert not any("lossy" in w for w in result["warnings"])


def test_predict_series_option(run_cli, tiny_model, two_candidates, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", two_candidates, "--model", tiny_model, "--report", report, "--quiet"])
    assert code == 2 and not report.exists()
    assert "2 series could be staged" in err and str(two_candidates) in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["predict", two_candidates, "--model", tiny_model, "--series", "6", "--report", report, "--quiet"])
    assert code == 0, err
    series = json.loads(report.read_text())["results"][0]["series"]
    assert series["series_number"] == 6 and series["reason"].startswith("named by --series '6': MR ORIGINAL")


def test_each_study_is_one_input(tmp_path, small_cohort, dicom_series, tiny_model):
    import shutil  # noqa: PLC0415

    root, masks = tmp_path / "export", tmp_path / "masks"
    masks.mkdir()
    for i, uid in ((2, "1.2.826.0.1.3680043.10.2"), (3, "1.2.826.0.1.3680043.10.3")):
        _, mask, volume = dicom_series.phantom_case(small_cohort, i)
        dicom_series.volume_as_series(volume, root / f"p{i}", study_uid=uid)
        shutil.copy(mask, masks / f"{uid}.nii.gz")  # several studies in one folder: masks by study UID
    inputs = resolve_inputs([root])
    assert [type(s) for s in inputs] == [Study, Study]
    assert [str(s) for s in inputs] == [f"{root} [study 1.2.826.0.1.3680043.10.2]", f"{root} [study 1.2.826.0.1.3680043.10.3]"]
    from liverstage.runtime.backends import open_backend  # noqa: PLC0415

    run = Predictor(open_backend(tiny_model, device="cpu"), mask_dir=masks).run(inputs)
    assert not run.errors and len(run.results) == 2
    for result, study_item in zip(run.results, inputs):
        assert result.series["study_instance_uid"] == study_item.study_instance_uid
        assert result.dicom_files == study_item.series[0].files and len(result.dicom_files) == study_item.series[0].n_instances
    assert find_studies(tmp_path / "export" / "p2")[0].label == str(tmp_path / "export" / "p2")


def test_series_option_needs_a_study(run_cli, tiny_model, small_volume_path):
    code, _, err = run_cli(["predict", small_volume_path[0], "--model", tiny_model, "--series", "5"])
    assert code == 2 and "--series applies to DICOM study folders" in err


def test_lossy_series_is_a_warning(run_cli, tiny_model, phantom, dicom_series, tmp_path):
    from pydicom.uid import JPEG2000  # noqa: PLC0415

    dicom_series.volume_as_series(phantom[2], tmp_path / "lossy", transfer_syntax=JPEG2000,
                                  encode_kwargs={"j2k_cr": [8]})
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", tmp_path / "lossy", "--model", tiny_model, "--mask", phantom[1],
                            "--report", report, "--quiet"])
    assert code == 0, err
    result = json.loads(report.read_text())["results"][0]
    assert result["series"]["lossy"] is True and result["series"]["transfer_syntax"] == [str(JPEG2000)]
    assert any(w.startswith("lossy compression: transfer syntax JPEG 2000 Image Compression may be lossy")
               for w in result["warnings"])
