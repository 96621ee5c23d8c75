"""`liverstage synth` and `liverstage crops`: outputs, and every bad input as one stderr line."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from liverstage.runtime.crops import crops_for_volume
from liverstage.runtime.spec import PreprocessSpec

LIVERSTAGE = Path(sys.executable).with_name("liverstage")


def test_synth_then_crops(tmp_path, run_cli):
    code, out, err = run_cli(["synth", tmp_path / "ph", "--patients", 2, "--seed", 3, "--in-plane", 48,
                              "--slices", 10, "--quiet"])
    assert code == 0, err
    assert "not patients" in out and "manifest.csv" in out
    manifest = tmp_path / "ph" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    assert [r["patient_id"] for r in rows] == ["phantom000", "phantom001"]
    image, mask = tmp_path / "ph" / rows[0]["image"], tmp_path / "ph" / rows[0]["mask"]

    code, out, err = run_cli(["crops", image, "--mask", mask, "--crop-size", 40, "--out", tmp_path / "cr"])
    assert code == 0, err
    expected = crops_for_volume(image, spec=PreprocessSpec(crop_size=40), mask=mask)
    table = list(csv.DictReader((tmp_path / "cr" / "crops.csv").open()))
    assert len(table) == len(expected) > 0
    assert [int(r["slice"]) for r in table] == expected.slices.tolist()
    assert [[int(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in table] == expected.boxes.tolist()
    assert PreprocessSpec.from_dict(json.loads((tmp_path / "cr" / "spec.json").read_text())) == PreprocessSpec(crop_size=40)
    png = np.asarray(Image.open(tmp_path / "cr" / table[0]["file"]))
    assert png.shape == (40, 40) and png.dtype == np.uint8
    # PNG grey = clip range mapped to 0..255
    spec = PreprocessSpec()
    back = png / 255.0 * (spec.clip_high - spec.clip_low) + spec.clip_low
    np.testing.assert_allclose(back, expected.images[0, 0], atol=(spec.clip_high - spec.clip_low) / 255)

    # box and auto work through the CLI too; a second run replaces the folder whole
    code, _, err = run_cli(["crops", image, "--roi", "auto", "--crop-size", 32, "--out", tmp_path / "cr"])
    assert code == 0, err
    assert json.loads((tmp_path / "cr" / "spec.json").read_text())["crop_size"] == 32
    shape = nib.load(str(image)).shape
    code, _, err = run_cli(["crops", image, "--bbox", f"0,0,0,{shape[0]},{shape[1]},{shape[2]}",
                            "--crop-size", 32, "--out", tmp_path / "cb"])
    assert code == 0, err


# --- bad inputs: one line on stderr, non-zero exit, no traceback, nothing written ---------


def _nii(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0]) if affine is None else affine), str(path))
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    good = rng.normal(500, 50, (24, 24, 10)).astype(np.float32)
    vol = _nii(d / "good.nii.gz", good)
    mask = np.zeros(good.shape, np.uint8)
    mask[6:18, 6:18, 2:8] = 1
    _nii(d / "mask.nii.gz", mask)
    (d / "notes.txt").write_text("not an image")
    (d / "fake.nii.gz").write_bytes(gzip.compress(b"garbage" * 100))
    blob = vol.read_bytes()
    (d / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    _nii(d / "flat.nii.gz", good[:, :, 0])
    _nii(d / "four.nii.gz", np.stack([good, good], axis=-1))
    nan = good.copy()
    nan[10, 10, 5] = np.nan
    _nii(d / "nan.nii.gz", nan)
    _nii(d / "const.nii.gz", np.full(good.shape, 3, np.int16))
    _nii(d / "mask_shape.nii.gz", mask[:, :, :9])
    shifted = np.diag([2.0, 2.0, 5.0, 1.0])
    shifted[1, 3] = 30.0
    _nii(d / "mask_affine.nii.gz", mask, shifted)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(good.shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.zeros((4, 4)), code=1)
    hdr.set_qform(None, code=0)
    nib.Nifti1Image(good, None, header=hdr).to_filename(str(d / "zero_affine.nii.gz"))
    return d


BAD_CASES = {
    "missing file": (["missing.nii.gz", "--mask", "mask.nii.gz"], "not found"),
    "not nifti": (["notes.txt", "--mask", "mask.nii.gz"], "not a NIfTI"),
    "garbage nifti": (["fake.nii.gz", "--mask", "mask.nii.gz"], "fake.nii.gz"),
    "truncated": (["truncated.nii.gz", "--mask", "mask.nii.gz"], "truncated.nii.gz"),
    "2D": (["flat.nii.gz", "--roi", "auto"], "2D"),
    "4D": (["four.nii.gz", "--mask", "mask.nii.gz"], "(24, 24, 10, 2)"),
    "4D bad frame": (["four.nii.gz", "--mask", "mask.nii.gz", "--frame", "2"], "outside"),
    "nan in region": (["nan.nii.gz", "--mask", "mask.nii.gz"], "non-finite"),
    "constant": (["const.nii.gz", "--roi", "auto"], "constant"),
    "mask shape": (["good.nii.gz", "--mask", "mask_shape.nii.gz"], "shape"),
    "mask affine": (["good.nii.gz", "--mask", "mask_affine.nii.gz"], "affine"),
    "mask label": (["good.nii.gz", "--mask", "mask.nii.gz", "--mask-label", "4"], "label 4"),
    "box outside": (["good.nii.gz", "--bbox", "0,0,0,25,24,10"], "outside the volume"),
    "box malformed": (["good.nii.gz", "--bbox", "1,2,3"], "six integers"),
    "zero affine": (["zero_affine.nii.gz", "--roi", "auto"], "singular or zero affine"),
    "no region": (["good.nii.gz"], "exactly one"),
    "bad crop size": (["good.nii.gz", "--roi", "auto", "--crop-size", "3"], "crop_size"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line(bad_inputs, tmp_path, run_cli, case):
    args, message = BAD_CASES[case]
    argv = ["crops", bad_inputs / args[0], *[bad_inputs / a if a.endswith(".nii.gz") else a for a in args[1:]]]
    out_dir = tmp_path / "out"
    code, _, err = run_cli(argv + ["--out", out_dir])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("liverstage: error:") and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []  # no partial output, no temp dirs


def test_good_4d_frame_and_warning(bad_inputs, tmp_path, run_cli):
    code, out, err = run_cli(["crops", bad_inputs / "four.nii.gz", "--mask", bad_inputs / "mask.nii.gz",
                              "--frame", 1, "--crop-size", 32, "--out", tmp_path / "o"])
    assert code == 0, err
    assert "frame 1" in err and (tmp_path / "o" / "crops.csv").exists()


def test_refuses_to_replace_a_foreign_folder(bad_inputs, tmp_path, run_cli):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    code, _, err = run_cli(["crops", bad_inputs / "good.nii.gz", "--mask", bad_inputs / "mask.nii.gz",
                            "--out", precious])
    assert code != 0 and "not empty" in err
    assert (precious / "thesis.tex").read_text() == "keep me"
    code, _, err = run_cli(["synth", precious, "--patients", 1])
    assert code != 0 and "not empty" in err


def test_console_script_in_a_subprocess(bad_inputs, tmp_path):
    """The installed script itself: a bad file gives one line and exit code 2, no traceback."""
    if not LIVERSTAGE.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(LIVERSTAGE), "crops", str(bad_inputs / "truncated.nii.gz"), "--roi", "auto",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
