"""Bad DICOM input: one line naming the problem (and the file), exit 2, nothing written.

Each case is the phantom's axial series with one thing broken, or a real broken file.
"""

import shutil

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from pydicom.uid import JPEGLSLossless  # noqa: E402

from liverstage.runtime.dicom import read_dicom_series  # noqa: E402
from liverstage.runtime.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def series_dirs(tmp_path_factory, small_cohort, dicom_series):
    """Pristine phantom series to copy: {"explicit": folder, "jpeg-ls": folder}."""
    volume = dicom_series.phantom_case(small_cohort, 3)[2]
    root = tmp_path_factory.mktemp("pristine")
    dicom_series.volume_as_series(volume, root / "explicit")
    dicom_series.volume_as_series(volume, root / "jpeg-ls", transfer_syntax=JPEGLSLossless)
    return {"explicit": root / "explicit", "jpeg-ls": root / "jpeg-ls"}


def _edit(path, **attrs):
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def remove_middle(files):
    files[8].unlink()
    return "slice gap", files[9].name


def duplicate_position(files):
    ds = pydicom.dcmread(files[5])
    ds.SOPInstanceUID += ".9"
    ds.save_as(files[5].with_name("copy.dcm"))
    return "duplicate positions", "copy.dcm"


def tilt_one(files):
    _edit(files[4], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    return "mixed orientations: 2 planes (axial, coronal)", files[4].name


def nan_position(files):
    _edit(files[2], ImagePositionPatient=["nan", "0", "0"])
    return "non-finite ImagePositionPatient", files[2].name


def no_spacing(files):
    _edit(files[0], PixelSpacing=None)
    return "no valid PixelSpacing (missing geometry)", files[0].name


def inf_orientation(files):
    _edit(files[6], ImageOrientationPatient=["inf", 0, 0, 0, 1, 0])
    return "non-finite ImageOrientationPatient", files[6].name


def truncate_pixels(files):
    data = files[7].read_bytes()
    files[7].write_bytes(data[:-500])
    return "truncated pixel data", files[7].name


def cut_codestream(files):
    ds = pydicom.dcmread(files[3])
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 2]])
    ds.save_as(files[3])
    return "frame 1 of the JPEG-LS Lossless Image Compression pixel data is cut short", files[3].name


def garbage_codestream(files):
    ds = pydicom.dcmread(files[3])
    ds.PixelData = pydicom.encaps.encapsulate([np.random.default_rng(1).bytes(3000) + b"\xff\xd9"])
    ds.save_as(files[3])
    return "cannot decode the pixel data (JPEG-LS Lossless", files[3].name


def truncate_compressed_file(files):
    data = files[9].read_bytes()
    files[9].write_bytes(data[:-300])
    return "repair or remove it", files[9].name  # refused as damaged when the study is scanned


CASES = [("explicit", remove_middle), ("explicit", duplicate_position), ("explicit", tilt_one),
         ("explicit", nan_position), ("explicit", no_spacing), ("explicit", inf_orientation),
         ("explicit", truncate_pixels), ("jpeg-ls", cut_codestream), ("jpeg-ls", garbage_codestream),
         ("jpeg-ls", truncate_compressed_file)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS", "ignore:End of file reached before delimiter",
                            "ignore:The value length")
@pytest.mark.parametrize("form, breaker", CASES, ids=[b.__name__ for _, b in CASES])
def test_broken_series_is_one_line_exit_2_nothing_written(series_dirs, tmp_path, run_cli, tiny_model, form, breaker):
    study = tmp_path / "study"
    shutil.copytree(series_dirs[form], study / "series")
    files = sorted((study / "series").iterdir(), key=lambda p: -int(p.stem[2:]))  # slice order (names reversed)
    message, culprit = breaker(files)
    report, csv = tmp_path / "r.json", tmp_path / "c.csv"
    code, out, err = run_cli(["predict", study, "--model", tiny_model, "--roi", "auto", "--report", report,
                              "--csv", csv])
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and message in lines[0] and culprit in lines[0] and str(study) in lines[0], lines
    assert "Traceback" not in err and not report.exists() and not csv.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]  # no temporary left behind either


def test_study_without_a_usable_series(tmp_path, run_cli, tiny_model, dicom_series):
    dicom_series.real_distractors(tmp_path / "study")
    code, _, err = run_cli(["predict", tmp_path / "study", "--model", tiny_model, "--report", tmp_path / "r.json"])
    assert code == 2 and not (tmp_path / "r.json").exists()
    (line,) = err.strip().splitlines()
    assert "none of its 3 series can be staged" in line
    assert "1 'FAST LOCALIZER' (localizer" in line and "700 'ANGIO" in line and "2 'T/S/C RF FAST PILOT'" in line


def test_real_truncated_file(dicom_series):
    """pydicom's MR_truncated.dcm: the pixel data stops 62 bytes short."""
    with pytest.raises(InputError, match=r"MR_truncated.dcm: truncated pixel data \(8130 of 8192 bytes\)"):
        read_dicom_series([dicom_series.testdata("MR_truncated.dcm")])


def test_real_enhanced_file_without_frame_geometry(dicom_series, tmp_path, run_cli, tiny_model):
    """pydicom-data's emri_small.dcm: 10 frames, no functional groups, so no position per frame."""
    (tmp_path / "study").mkdir()
    shutil.copy(dicom_series.testdata("emri_small.dcm"), tmp_path / "study")
    code, _, err = run_cli(["series", tmp_path / "study", "--json"])
    assert code == 0
    code, _, err = run_cli(["predict", tmp_path / "study", "--model", tiny_model])
    assert code == 2
    assert "emri_small.dcm has 10 frames but no functional groups with their positions (missing geometry)" in err


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_real_truncated_jpeg2000_file(dicom_series):
    """pydicom-data's emri_small_jpeg_2k_lossless_too_short.dcm: the file ends inside its pixel data."""
    path = dicom_series.testdata("emri_small_jpeg_2k_lossless_too_short.dcm")
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == 10  # the header is whole
    with pytest.raises(InputError, match=r"too_short.dcm has no pixel data \(truncated file\?\)"):
        read_dicom_series([path])


def test_non_image_and_odd_files_are_ignored(tmp_path, series_dirs):
    from liverstage.runtime.dicom_study import scan_dicom  # noqa: PLC0415

    shutil.copytree(series_dirs["explicit"], tmp_path / "s")
    (tmp_path / "s" / "empty").write_bytes(b"")
    (tmp_path / "s" / "junk.bin").write_bytes(np.random.default_rng(0).bytes(600))
    (tmp_path / "s" / "notes.txt").write_text("not DICOM")
    (tmp_path / "s" / ".hidden.dcm").write_bytes((tmp_path / "s" / "IM0001.dcm").read_bytes())
    (series,) = scan_dicom(tmp_path)
    assert series.stageable and series.n_instances == 17


@pytest.mark.parametrize("name, content", [("empty.dcm", b""), ("junk.dcm", b"x" * 600), ("IM0099.IMA", b"\0" * 110)])
def test_unreadable_file_named_as_dicom_is_refused(tmp_path, series_dirs, name, content):
    """A .dcm / .ima file that does not parse may be a lost slice: the study is refused, naming it."""
    from liverstage.runtime.dicom_study import scan_dicom  # noqa: PLC0415

    shutil.copytree(series_dirs["explicit"], tmp_path / "s")
    (tmp_path / "s" / name).write_bytes(content)
    with pytest.raises(InputError, match=f"{name} is a damaged DICOM file"):
        scan_dicom(tmp_path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_one_line_on_the_real_stderr(series_dirs, tmp_path, tiny_model):
    """In a real process pydicom's own warnings (here about a 'nan' position) stay off stderr."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    shutil.copytree(series_dirs["explicit"], tmp_path / "study" / "series")
    files = sorted((tmp_path / "study" / "series").iterdir(), key=lambda p: -int(p.stem[2:]))
    message, culprit = nan_position(files)
    proc = subprocess.run([sys.executable, "-c", "from liverstage.runtime.cli import main; main()", "predict",
                           str(tmp_path / "study"), "--model", str(tiny_model), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert message in line and culprit in line and not (tmp_path / "r.json").exists()
