"""The same phantom as NIfTI, as classic series (explicit VR, RLE, JPEG-LS) and as one enhanced
(legacy converted, JPEG-LS frames) file: bit-identical crops, the same stage and probabilities. Its liver mask is
the NIfTI one, stored with the slice axis first, so every DICOM form needs the world-space match.
"""

import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless  # noqa: E402

from liverstage.runtime.crops import crops_for_volume  # noqa: E402
from liverstage.runtime.dicom_study import load_series, scan_dicom  # noqa: E402
from liverstage.runtime.io import load_volume  # noqa: E402

FORMS = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg-ls": JPEGLSLossless}
SYNTAX = {**FORMS, "enhanced": JPEGLSLossless}  # highdicom keeps the JPEG-LS frames it converts


@pytest.fixture(scope="module")
def forms(tmp_path_factory, small_cohort, dicom_series):
    """{form: input path}: the NIfTI file and one study folder per DICOM form of phantom 2."""
    image, mask, volume = dicom_series.phantom_case(small_cohort, 2)
    root = tmp_path_factory.mktemp("forms")
    out = {"nifti": image}
    for name, syntax in FORMS.items():
        files = dicom_series.volume_as_series(volume, root / name / "series", transfer_syntax=syntax)
        out[name] = root / name
    dicom_series.legacy_enhanced(files, root / "enhanced" / "series" / "lce.dcm")  # from the JPEG-LS files
    out["enhanced"] = root / "enhanced"
    return out, mask


def _volume(path):
    if path.is_dir():
        (info,) = scan_dicom(path)
        return load_series(info), info
    return load_volume(path), None


def test_every_form_gives_bit_identical_crops(forms, tiny_model):
    from liverstage.runtime.backends import open_backend  # noqa: PLC0415

    inputs, mask = forms
    spec = open_backend(tiny_model, device="cpu").metadata.preprocess
    reference = crops_for_volume(load_volume(inputs["nifti"]), spec=spec, mask=mask)
    assert len(reference) > 0
    for name, path in inputs.items():
        volume, info = _volume(path)
        if info is not None:
            assert info.stageable, (name, info.reason)
            assert (name == "enhanced") == (info.n_instances == 1 and info.n_frames == volume.shape[2])
        crops = crops_for_volume(volume, spec=spec, mask=mask)
        assert crops.images.tobytes() == reference.images.tobytes(), name
        np.testing.assert_array_equal(crops.slices, reference.slices)
        np.testing.assert_array_equal(crops.boxes, reference.boxes)
        np.testing.assert_allclose(volume.affine, load_volume(inputs["nifti"]).affine, atol=1e-3)


def test_every_form_gives_the_same_stage_and_probabilities(forms, tiny_model, run_cli, tmp_path):
    inputs, mask = forms
    results = {}
    for name, path in inputs.items():
        report = tmp_path / f"{name}.json"
        code, _, err = run_cli(["predict", path, "--model", tiny_model, "--mask", mask, "--report", report, "--quiet"])
        assert code == 0, (name, err)
        results[name] = json.loads(report.read_text())["results"][0]
    ref = results.pop("nifti")
    assert "series" not in ref
    for name, result in results.items():
        assert result["stage"] == ref["stage"], name
        assert result["probabilities"] == ref["probabilities"], name
        assert [c["probabilities"] for c in result["crops"]] == [c["probabilities"] for c in ref["crops"]], name
        assert result["series"]["transfer_syntax"] == [str(SYNTAX[name])]


def test_mask_on_another_grid_is_still_refused(forms, tmp_path, run_cli, tiny_model):
    import nibabel as nib  # noqa: PLC0415

    inputs, mask = forms
    img = nib.load(mask)
    shifted = img.affine.copy()
    shifted[:3, 3] += 3 * img.affine[:3, 0]  # three voxels off
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), tmp_path / "shifted.nii.gz")
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", inputs["rle"], "--model", tiny_model, "--mask", tmp_path / "shifted.nii.gz",
                            "--report", report])
    assert code == 2 and not report.exists()
    assert "different affine" in err and "even after reorienting" in err and len(err.strip().splitlines()) == 1
