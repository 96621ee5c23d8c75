"""NIfTI integrity checks (runtime/nifti_check.py), through io.load_volume / load_mask and predict."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverstage.runtime import nifti_check
from liverstage.runtime.errors import InputError
from liverstage.runtime.io import load_mask, load_volume

SHAPE = (20, 18, 6)
AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def volume_bytes(**header) -> bytes:
    """The uncompressed bytes of a small int16 NIfTI-1 volume (random voxels), header fields patched."""
    data = np.random.default_rng(0).integers(0, 1000, SHAPE).astype(np.int16)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(1.0, 0.0)
    raw = bytearray(img.to_bytes())
    offsets = {"datatype": (70, "h"), "bitpix": (72, "h"), "vox_offset": (108, "f"), "scl_slope": (112, "f"),
               "scl_inter": (116, "f"), "qform_code": (252, "h"), "sform_code": (254, "h"), "magic": (344, "4s")}
    for name, value in header.items():
        if name.startswith("pixdim") or name.startswith("dim") or name.startswith("srow"):
            field, index = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):])
            start, fmt = {"pixdim": (76, "f"), "dim": (40, "h"), "srow": (280, "f")}[field]
            offset = start + index * struct.calcsize(fmt)
        else:
            offset, fmt = offsets[name]
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
    return bytes(raw)


def write(tmp_path: Path, content: bytes, name: str = "v.nii.gz", *, compress: bool | None = None) -> Path:
    path = tmp_path / name
    packed = compress if compress is not None else name.endswith(".gz")
    path.write_bytes(gzip.compress(content, mtime=0) if packed else content)
    return path


def raw_voxels() -> np.ndarray:
    return np.asanyarray(nib.Nifti1Image.from_bytes(volume_bytes()).dataobj).astype(np.float32)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_intact_file_reads_as_nibabel_reads_it(tmp_path, name):
    path = write(tmp_path, volume_bytes(), name)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.data, raw_voxels())  # RAS affine: canonical = stored
    assert volume.warnings == ()


def test_real_files_shipped_with_nibabel():
    from nibabel.testing import data_path

    anatomical = load_volume(Path(data_path) / "anatomical.nii")  # big-endian int16
    np.testing.assert_array_equal(np.sort(anatomical.data.ravel()),
                                  np.sort(np.asanyarray(nib.load(Path(data_path) / "anatomical.nii").dataobj).ravel().astype(np.float32)))
    frame = load_volume(Path(data_path) / "example4d.nii.gz", frame=1)  # gzip, 4D, one frame read
    assert frame.shape == (128, 96, 24)
    two = load_volume(Path(data_path) / "example_nifti2.nii.gz", frame=0)  # NIfTI-2
    assert two.shape == (32, 20, 12)


def _corrupt_crc(packed: bytes) -> bytes:
    out = bytearray(packed)
    out[-6] ^= 0x5A  # inside the CRC-32 of the trailer
    return bytes(out)


@pytest.mark.parametrize("how,needle", [
    ("crc", "fails its integrity check"),
    ("length", "fails its integrity check"),
    ("garbage", "fails its integrity check"),
    ("truncated", "truncated or corrupt|fails its integrity check"),  # where it is noticed depends on the gzip module
])
def test_corrupt_gzip_stream_is_refused(tmp_path, how, needle):
    packed = gzip.compress(volume_bytes(), mtime=0)
    if how == "crc":
        packed = _corrupt_crc(packed)
    elif how == "length":
        packed = packed[:-1] + bytes([packed[-1] ^ 0x01])  # ISIZE, the stream's length mod 2**32
    elif how == "garbage":
        packed = packed + b"not gzip at all"
    else:
        packed = packed[: len(packed) - 40]
    path = tmp_path / "v.nii.gz"
    path.write_bytes(packed)
    with pytest.raises(InputError, match=needle) as info:
        load_volume(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_nibabel_alone_stages_a_corrupt_stream():
    """Why the check exists: nibabel reads the voxels without ever reaching the CRC."""
    import io

    packed = _corrupt_crc(gzip.compress(volume_bytes(), mtime=0))
    with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
        img = nib.Nifti1Image.from_stream(stream)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), raw_voxels())


def test_too_short_is_an_error(tmp_path):
    content = volume_bytes()
    for name in ("v.nii", "v.nii.gz"):
        path = write(tmp_path, content[:-100], name)
        with pytest.raises(InputError, match="truncated"):
            load_volume(path)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_trailing_bytes_are_a_warning(tmp_path, name):
    path = write(tmp_path, volume_bytes() + b"\x01" * 333, name)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.data, raw_voxels())
    assert any("333 byte(s) after the image data" in w for w in volume.warnings)


def test_second_gzip_member_is_trailing_data(tmp_path):
    path = tmp_path / "v.nii.gz"
    path.write_bytes(gzip.compress(volume_bytes(), mtime=0) + gzip.compress(b"x" * 50, mtime=0))
    assert any("50 byte(s) after the image data" in w for w in load_volume(path).warnings)


def test_endless_tail_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(nifti_check, "TAIL_LIMIT", 1000)
    path = write(tmp_path, volume_bytes() + bytes(5000), "v.nii.gz")
    with pytest.raises(InputError, match="after its image data"):
        load_volume(path)


@pytest.mark.parametrize("fields,needle", [
    ({"pixdim1": float("nan")}, "invalid voxel sizes"),
    ({"pixdim3": 0.0}, "invalid voxel sizes"),
    ({"pixdim2": float("inf")}, "invalid voxel sizes"),
    ({"srow0": float("nan")}, "non-finite affine"),
    ({"dim2": 0}, "dimensions"),
    ({"dim0": 9}, "dim[0]"),
    ({"datatype": 16}, "bitpix 16"),             # float32 claimed over int16 bytes: bitpix disagrees
    ({"datatype": 32, "bitpix": 64}, "complex64"),
    ({"datatype": 128, "bitpix": 24}, "RGB"),
    ({"datatype": 99}, "unknown voxel datatype"),
    ({"vox_offset": float("nan")}, "vox_offset"),
    ({"vox_offset": 100.0}, "vox_offset"),
    ({"scl_slope": 2.0, "scl_inter": float("nan")}, "undefined"),
    ({"magic": b"ni1\x00"}, "NIfTI pair"),
    ({"magic": b"abc\x00"}, "magic"),
])
def test_invalid_header_is_refused(tmp_path, fields, needle):
    path = write(tmp_path, volume_bytes(**fields))
    with pytest.raises(InputError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_voxel_budget_is_checked_before_reading(tmp_path, monkeypatch):
    # A 100-byte file claiming 30000^3 voxels: refused from its header alone.
    path = write(tmp_path, volume_bytes(dim1=30000, dim2=30000, dim3=30000)[:400], "huge.nii")
    with pytest.raises(InputError, match="more than the budget"):
        load_volume(path)
    monkeypatch.setenv(nifti_check.MAX_VOXELS_ENV, str(int(np.prod(SHAPE)) - 1))
    with pytest.raises(InputError, match="LIVERSTAGE_MAX_VOXELS"):
        load_volume(write(tmp_path, volume_bytes()))
    monkeypatch.setenv(nifti_check.MAX_VOXELS_ENV, "many")
    with pytest.raises(InputError, match="positive integer"):
        load_volume(write(tmp_path, volume_bytes()))


@pytest.mark.parametrize("slope,inter,expect,warns", [
    (0.0, 5.0, "raw", False),                  # slope 0: unscaled, inter ignored
    (float("nan"), 5.0, "raw", False),         # NaN slope (nibabel's "no scaling"): unscaled
    (float("inf"), 0.0, "raw", True),          # infinite slope: unscaled, with a warning
    (2.0, 10.0, "scaled", False),
    (-1.0, 0.0, "scaled", False),
])
def test_scaling_follows_the_nifti_rules(tmp_path, slope, inter, expect, warns):
    volume = load_volume(write(tmp_path, volume_bytes(scl_slope=slope, scl_inter=inter)))
    raw = raw_voxels()
    np.testing.assert_allclose(volume.data, raw if expect == "raw" else raw * slope + inter)
    assert any("scl_slope" in w for w in volume.warnings) is warns


def test_content_decides_not_the_name(tmp_path):
    plain_named_gz = write(tmp_path, volume_bytes(), "a.nii.gz", compress=False)
    gz_named_plain = write(tmp_path, volume_bytes(), "b.nii", compress=True)
    for path in (plain_named_gz, gz_named_plain):
        np.testing.assert_array_equal(load_volume(path).data, raw_voxels())


def test_mask_goes_through_the_same_checks(tmp_path):
    volume = load_volume(write(tmp_path, volume_bytes(), "v.nii.gz"))
    mask = nib.Nifti1Image((raw_voxels() > 500).astype(np.uint8), AFFINE)
    good = tmp_path / "m.nii.gz"
    nib.save(mask, good)
    assert load_mask(good, like=volume).any()
    bad = tmp_path / "bad_m.nii.gz"
    bad.write_bytes(_corrupt_crc(good.read_bytes()))
    with pytest.raises(InputError, match="mask .*fails its integrity check"):
        load_mask(bad, like=volume)


def test_predict_refuses_a_corrupt_stream_and_writes_nothing(tmp_path, tiny_model, run_cli):
    path = tmp_path / "v.nii.gz"
    path.write_bytes(_corrupt_crc(gzip.compress(volume_bytes(), mtime=0)))
    report = tmp_path / "out" / "r.json"
    code, out, err = run_cli(["predict", path, "--model", tiny_model, "--bbox", "2,2,0,18,16,6", "--report", report])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fails its integrity check" in err
    assert not report.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no temporary left either


def test_trailing_warning_reaches_the_report(tmp_path, tiny_model, run_cli):
    path = write(tmp_path, volume_bytes() + b"\x00" * 64, "v.nii")
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", path, "--model", tiny_model, "--bbox", "2,2,0,18,16,6", "--report", report,
                            "--quiet"])
    assert code == 0, err
    warnings = json.loads(report.read_text())["results"][0]["warnings"]
    assert any("64 byte(s) after the image data" in w for w in warnings)


@pytest.mark.parametrize("field", ["qform_code", "sform_code"])
def test_a_field_nibabel_repairs_is_a_report_warning_not_stderr(tmp_path, tiny_model, run_cli, field):
    """nibabel logs "qform_code -1 not valid; setting to 0" through a handler of its own that
    writes to stderr (found by the 10,000-case fuzz run); predict must put it in the report."""
    import logging  # noqa: PLC0415

    logger = logging.getLogger(nifti_check.NIBABEL_LOGGER)
    watcher = nifti_check._Collector()
    logger.addHandler(watcher)  # beside nibabel's stderr handler: sees what would reach stderr
    try:
        path = write(tmp_path, volume_bytes(**{field: -1}), "v.nii.gz")
        report = tmp_path / "r.json"
        code, _, err = run_cli(["predict", path, "--model", tiny_model, "--bbox", "2,2,0,18,16,6",
                                "--report", report, "--quiet"])
        assert code == 0 and err == "", err
        assert watcher.records == []
        assert logger.handlers[-1] is watcher and logger.propagate  # put back as it was
    finally:
        logger.removeHandler(watcher)
    warnings = json.loads(report.read_text())["results"][0]["warnings"]
    assert f"v.nii.gz: nibabel: {field} -1 not valid; setting to 0" in warnings
    # outside predict nibabel's own handler still has the message
    logger.addHandler(watcher)
    try:
        nib.Nifti1Image.from_bytes(volume_bytes(**{field: -1}))
    finally:
        logger.removeHandler(watcher)
    assert [r.getMessage() for r in watcher.records] == [f"{field} -1 not valid; setting to 0"]
