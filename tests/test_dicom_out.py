"""`predict --dicom-out`: a TID 1500 Comprehensive 3D SR and an RGB secondary capture in the source study.

The source is a classic MR series written from a phantom (not a patient) with pydicom's real
MR_small.dcm header; it is staged with the tiny ONNX model. dciodvfy (dicom3tools) and dsrdump
(dcmtk) validate the files where they are installed.
"""

import json
import shutil
import subprocess

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from liverstage.runtime import dicom_out  # noqa: E402
from liverstage.runtime.cli import main  # noqa: E402
from liverstage.runtime.predict import load_input, resolve_inputs  # noqa: E402
from liverstage.runtime.dicom_out import CODING_SCHEME, RESEARCH_ONLY, write_dicom_results  # noqa: E402
from liverstage.runtime.errors import InputError  # noqa: E402
from liverstage.runtime.io import load_mask, load_volume  # noqa: E402
from liverstage.runtime.report import file_sha256  # noqa: E402

MR_SMALL = get_testdata_file("MR_small.dcm")
SCT_YES, SCT_NO = "373066001", "373067005"
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber")


def write_phantom_series(folder, data):
    """One axial MR slice per z of `data` [x, y, z], MR_small's header, new series and instance UIDs.

    The series' voxel grid [column, row, slice] is `data`'s own index grid. Files are named in
    reverse slice order, so file-name order is not slice order.
    """
    folder.mkdir(parents=True)
    series_uid, frame_uid = generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        ds = pydicom.dcmread(MR_SMALL)
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series_uid, frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber, ds.InstanceNumber = 7, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]  # a series the rules stage (MR_small itself is DERIVED)
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        ds.PixelSpacing = [1.5, 1.5]
        ds.SliceThickness = 3.0
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / f"im{999 - k:03d}.dcm")
    return folder


def content_items(node):
    """Every SR content item below `node` as (value type, concept code value, value), depth first."""
    out = []
    for item in node.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
        kind = item.ValueType
        value = {"CODE": lambda: item.ConceptCodeSequence[0].CodeValue,
                 "NUM": lambda: float(item.MeasuredValueSequence[0].NumericValue),
                 "TEXT": lambda: str(item.TextValue),
                 "IMAGE": lambda: str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)}.get(kind, lambda: None)()
        out.append((kind, name, value))
        out.extend(content_items(item))
    return out


def evidence_uids(sr):
    return {str(ref.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


@pytest.fixture(scope="module")
def staged(tmp_path_factory, small_volume_path, tiny_model):
    """`predict SERIES --dicom-out OUT --report --png` on a phantom series, run once for the module."""
    tmp = tmp_path_factory.mktemp("dicom_out")
    image, mask = small_volume_path
    volume = load_volume(image)
    liver = load_mask(mask, like=volume)
    series = write_phantom_series(tmp / "series", volume.data)
    xs, ys, zs = np.nonzero(liver)
    bbox = f"{xs.min()},{ys.min()},{zs.min()},{xs.max() + 1},{ys.max() + 1},{zs.max() + 1}"
    out, report, png = tmp / "out", tmp / "report.json", tmp / "summary.png"
    try:
        main(["predict", str(series), "--model", str(tiny_model), "--bbox", bbox, "--dicom-out", str(out),
              "--report", str(report), "--png", str(png), "--quiet"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series.iterdir())]
    folder = out / str(sources[0].SeriesInstanceUID)
    return {"series": series, "sources": sources, "folder": folder, "png": png, "model": tiny_model,
            "result": json.loads(report.read_text())["results"][0], "report": json.loads(report.read_text()),
            "sr": next(folder.glob("SR_*.dcm")), "sc": next(folder.glob("SC_*.dcm"))}


def _written(tmp_path_factory, staged, name, **changes):
    """The staged series written directly with the staged result changed by `changes`."""
    result = dict(staged["result"], **changes)
    picture = np.asarray(Image.open(staged["png"]).convert("RGB"))
    paths = write_dicom_results(tmp_path_factory.mktemp(name), series_files=sorted(staged["series"].iterdir()),
                                result=result, model=staged["report"]["model"], picture_rgb=picture)
    return {"result": result, "sr": paths[0], "sc": paths[1], "picture": picture}


@pytest.fixture(scope="module")
def uncertain(tmp_path_factory, staged):
    """An uncertain result that carries its reason and extra keys."""
    return _written(tmp_path_factory, staged, "uncertain", uncertain=True, ood_score=4.25,
                    uncertain_reason="kNN distance 4.25 above the threshold 2.1",
                    warnings=["uncertain: the crops look like none of the training stages", "no mask given"])


@pytest.fixture(scope="module")
def certain(tmp_path_factory, staged):
    """The same result, certain."""
    return _written(tmp_path_factory, staged, "certain", uncertain=False, uncertain_reason=None, warnings=[])


def test_predict_dicom_out_writes_an_sr_and_an_sc_per_series(staged):
    names = sorted(p.name for p in staged["folder"].iterdir())
    sr, sc = pydicom.dcmread(staged["sr"]), pydicom.dcmread(staged["sc"])
    assert names == sorted([f"SR_{sr.SOPInstanceUID}.dcm", f"SC_{sc.SOPInstanceUID}.dcm"])  # nothing else, no temporaries
    assert [p.name for p in staged["folder"].parent.iterdir()] == [staged["folder"].name]
    assert (sr.SOPClassUID, sc.SOPClassUID) == (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)
    source = staged["sources"][0]
    source_uids = {str(ds.SOPInstanceUID) for ds in staged["sources"]}
    for ds in (sr, sc):  # the same study and patient, as new series of new instances
        for keyword in PATIENT_KEYWORDS:
            assert ds.get(keyword) == source.get(keyword), keyword
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and str(ds.SOPInstanceUID) not in source_uids
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert (int(sr.SeriesNumber), int(sc.SeriesNumber)) == (9007, 10007)


def test_sr_holds_stage_probabilities_flag_algorithm_and_evidence(staged):
    sr = pydicom.dcmread(staged["sr"])
    result = staged["result"]
    items = content_items(sr)
    codes = {name: value for kind, name, value in items if kind == "CODE"}
    assert codes["258214002"] == f"STAGE-{result['stage']}"  # SCT "Stage"
    assert codes["UNCERTAIN"] == (SCT_YES if result["uncertain"] else SCT_NO)
    assert codes["121071"] == "112674009"  # Finding: SCT Fibrosis
    nums = {name: value for kind, name, value in items if kind == "NUM"}
    assert set(nums) == {"P-A", "P-B", "P-C"}
    for stage in "ABC":
        assert nums[f"P-{stage}"] == pytest.approx(result["probabilities"][stage], abs=1e-6)
    texts = [(name, value) for kind, name, value in items if kind == "TEXT"]
    assert ("111001", "liverstage") in texts  # TID 4019 Algorithm Name
    assert ("111003", "0.1.0") in texts  # Algorithm Version
    assert ("111002", f"model sha256 {file_sha256(staged['model'])}") in texts  # Algorithm Parameters
    for warning in result["warnings"]:  # e.g. the bbox-in-series-grid note
        assert ("121106", warning) in texts
    source_uids = {str(ds.SOPInstanceUID) for ds in staged["sources"]}
    assert evidence_uids(sr) == source_uids
    assert {value for kind, _, value in items if kind == "IMAGE"} == source_uids
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [CODING_SCHEME]
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")


def test_sc_is_the_summary_picture_with_the_result_burned_in(staged, uncertain, certain):
    sc = pydicom.dcmread(staged["sc"])
    assert (sc.PhotometricInterpretation, int(sc.SamplesPerPixel), sc.BurnedInAnnotation) == ("RGB", 3, "YES")
    assert sc.StudyInstanceUID == staged["sources"][0].StudyInstanceUID
    pixels = sc.pixel_array
    picture = np.asarray(Image.open(staged["png"]).convert("RGB"))  # --png draws the same picture
    banner = pixels.shape[0] - picture.shape[0]
    assert banner > 0 and pixels.shape[1:] == picture.shape[1:]
    np.testing.assert_array_equal(pixels[banner:], picture)
    top = pixels[:banner].astype(int)
    assert ((top[..., 0] > 200) & (top[..., 2] < 60)).any()  # the yellow research-use line
    assert (top.min(axis=2) > 200).any()  # white result lines
    assert RESEARCH_ONLY in sc.DerivationDescription and staged["result"]["stage"] in sc.DerivationDescription
    assert ("UNCERTAIN" in sc.DerivationDescription) == staged["result"]["uncertain"]
    # Another verdict burns other pixels into the banner, over the same picture.
    sure = pydicom.dcmread(certain["sc"]).pixel_array
    other = pydicom.dcmread(uncertain["sc"]).pixel_array
    assert other.shape == sure.shape == pixels.shape and not np.array_equal(other[:banner], sure[:banner])
    np.testing.assert_array_equal(other[banner:], picture)
    assert "UNCERTAIN" in pydicom.dcmread(uncertain["sc"]).DerivationDescription
    assert "UNCERTAIN" not in pydicom.dcmread(certain["sc"]).DerivationDescription


def test_uncertain_result_carries_its_reason_and_extra_keys(uncertain, staged):
    items = content_items(pydicom.dcmread(uncertain["sr"]))
    codes = {name: value for kind, name, value in items if kind == "CODE"}
    assert codes["UNCERTAIN"] == SCT_YES
    texts = [(name, value) for kind, name, value in items if kind == "TEXT"]
    assert ("UNCERTAIN-WHY", uncertain["result"]["uncertain_reason"]) in texts
    assert ("121106", "ood_score: 4.25") in texts
    assert ("121106", "uncertain: the crops look like none of the training stages") in texts
    assert ("121106", "no mask given") in texts


def test_staged_instance_files_are_in_slice_order(staged):
    (study,) = resolve_inputs([staged["series"]])
    _volume, files, _record = load_input(study)
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files]
    assert len(files) == len(staged["sources"]) and z == sorted(z)
    assert [p.name for p in files] != sorted(p.name for p in files)


def _dciodvfy_errors(path):
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], lines


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools)")
@pytest.mark.parametrize("which", ["staged", "uncertain"])
@pytest.mark.parametrize("kind", ["sr", "sc"])
def test_dciodvfy_finds_no_errors(which, kind, request):
    path = request.getfixturevalue(which)[kind]
    errors, lines = _dciodvfy_errors(path)
    assert errors == [], "\n".join(lines)
    assert ("Comprehensive3DSR" if kind == "sr" else "SCImage") in lines  # the IOD it checked against


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dsrdump not installed (Debian package dcmtk)")
def test_dsrdump_renders_the_sr(staged):
    proc = subprocess.run(["dsrdump", "+Pl", str(staged["sr"])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    text = proc.stdout
    stage = staged["result"]["stage"]
    assert "Comprehensive 3D SR Document" in text and '"Imaging Measurement Report"' in text
    assert f'(STAGE-{stage},{CODING_SCHEME},"Fibrosis stage {stage}' in text
    assert f'model sha256 {file_sha256(staged["model"])}' in text
    assert text.count('"Source of Measurement"') == len(staged["sources"])


def test_nifti_input_is_refused_before_any_work(tmp_path, small_volume_path, run_cli):
    image, _ = small_volume_path
    out, report = tmp_path / "out", tmp_path / "r.json"
    # The model does not exist: the refusal must come before the model is even opened.
    code, _, err = run_cli(["predict", image, "--model", tmp_path / "missing.onnx", "--dicom-out", out,
                            "--report", report])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--dicom-out" in err and str(image) in err
    assert not out.exists() and not report.exists()


def test_a_failure_leaves_no_file(tmp_path, staged, monkeypatch):
    files = sorted(staged["series"].iterdir())
    args = dict(result=staged["result"], model=staged["report"]["model"],
                picture_rgb=np.zeros((40, 60, 3), np.uint8))
    junk = tmp_path / "notes.dcm"
    junk.write_text("not DICOM")
    with pytest.raises(InputError, match="notes.dcm"):
        write_dicom_results(tmp_path / "a", series_files=[*files, junk], **args)
    real_encode = dicom_out._encode

    def encode_fails_on_sc(ds):
        if ds.SOPClassUID == SecondaryCaptureImageStorage:
            raise OSError("disk full")
        return real_encode(ds)

    monkeypatch.setattr(dicom_out, "_encode", encode_fails_on_sc)
    with pytest.raises(OSError):
        write_dicom_results(tmp_path / "b", series_files=files, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.dcm"]


@pytest.mark.parametrize("change, message", [
    ({"picture_rgb": np.zeros((40, 60), np.uint8)}, "picture_rgb"),
    ({"picture_rgb": np.zeros((40, 60, 3), np.float32)}, "picture_rgb"),
    ({"model": {"sha256": ""}}, "sha256"),
    ({"result": {"stage": "D"}}, "stage"),
    ({"series_files": []}, "series_files"),
])
def test_bad_arguments_are_named(tmp_path, staged, change, message):
    args = dict(series_files=sorted(staged["series"].iterdir()), result=staged["result"],
                model=staged["report"]["model"], picture_rgb=np.zeros((40, 60, 3), np.uint8))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        write_dicom_results(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_anonymised_source_without_patient_attributes(tmp_path, staged):
    """Type 2 attributes an anonymiser removed are written empty, and the files stay valid."""
    folder = tmp_path / "anon"
    folder.mkdir()
    for path in sorted(staged["series"].iterdir()):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
                        "AccessionNumber", "StudyID", "StudyTime"):
            delattr(ds, keyword)
        ds.save_as(folder / path.name)
    paths = write_dicom_results(tmp_path / "out", series_files=sorted(folder.iterdir()), result=staged["result"],
                                model=staged["report"]["model"], picture_rgb=np.zeros((40, 60, 3), np.uint8))
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.PatientName == "" and ds.StudyID == ""
        if shutil.which("dciodvfy"):
            errors, lines = _dciodvfy_errors(path)
            assert errors == [], "\n".join(lines)


def test_cli_failure_while_building_writes_nothing(tmp_path, staged, monkeypatch, run_cli):
    def broken(*args, **kwargs):
        raise InputError("cannot build the secondary capture")

    monkeypatch.setattr(dicom_out, "_build_sc", broken)
    out, report, png = tmp_path / "out", tmp_path / "r.json", tmp_path / "s.png"
    code, _, err = run_cli(["predict", staged["series"], "--model", staged["model"], "--roi", "auto",
                            "--dicom-out", out, "--report", report, "--png", png, "--quiet"])
    assert code == 2 and "cannot build the secondary capture" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_several_inputs_one_bad(tmp_path, staged, run_cli):
    """The staged series gets its results; the bad one is an error entry (exit 1), as for the report."""
    short = tmp_path / "short"  # a study whose only series has one slice: nothing the rules stage
    short.mkdir()
    shutil.copy(sorted(staged["series"].iterdir())[0], short / "one.dcm")
    out, report = tmp_path / "out", tmp_path / "r.json"
    code, _, _ = run_cli(["predict", staged["series"], short, "--model", staged["model"],
                          "--roi", "auto", "--dicom-out", out, "--report", report, "--quiet"])
    data = json.loads(report.read_text())
    assert code == 1 and len(data["results"]) == 1 and len(data["errors"]) == 1
    folder = out / str(staged["sources"][0].SeriesInstanceUID)
    assert [p.name for p in out.iterdir()] == [folder.name]
    assert sorted(p.name[:3] for p in folder.iterdir()) == ["SC_", "SR_"]
