"""Fuzz `liverstage predict` with mutated NIfTI files, gzip streams and DICOM series.

    python benchmarks/fuzz_inputs.py --model liverstage-demo/model.onnx --cases 10000 --out fuzz-run/
    python benchmarks/fuzz_inputs.py --model liverstage-demo/model.onnx --cases 10000 --out fuzz-run/   # again: resumes

Each case is drawn from (--seed, case number) alone, so a run can stop anywhere and resume
(finished cases are read back from OUT/results.jsonl and skipped) and any case can be replayed
with --only N (its files are kept in OUT/replay/). The bases are one phantom volume (synthetic,
not a patient) as .nii.gz and .nii with its liver mask, and the same volume written as a DICOM
MR series (one file per slice). A case mutates one of them:

  nifti header   a header field set to a hostile value (dims, datatype, bitpix, vox_offset,
                 pixdim, scl_slope/inter, qform/sform codes and parameters, magic), in .nii or .nii.gz
  nifti voxels   bytes or bits flipped, a run of NaN / Inf written, the file truncated, bytes appended
  gzip stream    bytes flipped in the gzip header, the deflate data or the CRC/length trailer; the
                 stream truncated; garbage or a second member appended
  mask           any of the above, applied to the mask instead of the volume
  dicom          a slice file's bytes flipped or truncated, a geometry tag (position, orientation,
                 spacing, rows / columns, bits) set to a hostile value, a slice removed or duplicated

and runs `liverstage predict INPUT --model M (--mask | --bbox) --report R --csv C --strict` in
a worker process (in-process `main()`, at most --workers of them), with --timeout seconds per
case. Outcomes:

  refused            exit 2 with one line on stderr and no file written (a clean refusal)
  refused_untyped    the same, but the line names a Python exception type: predict caught an
                     error that no check turned into a clear message (not a crash, but a gap)
  staged / uncertain exit 0 / exit 3 (--strict): a report was written
  traceback          a traceback on stderr, an exception out of main(), or any other exit code
  hang               the case ran past --timeout (its worker is killed and replaced)
  harness_error      this script could not write the mutation (counted, never run)
and failures against the known truth of a mutation:
  corrupt_staged     a file whose corruption is certain (the gzip stream fails a full decode,
                     the data end before the header says, a DICOM slice file is cut short) was
                     staged: corrupt staged as intact
  trailing_unreported bytes appended after the image data were staged without a warning
  partial_output     a refused case left any file in its output folder, or a staged one left a
                     temporary file or an unparsable report
  extra_stderr       stderr held more than the one error line (a refusal) or anything (a staging),
                     e.g. a library warning
Targets: 0 tracebacks, 0 hangs, 0 corrupt staged as intact, 0 partial outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

FAILURES = ("traceback", "hang", "corrupt_staged", "trailing_unreported", "partial_output", "extra_stderr")
OUTCOMES = ("refused", "refused_untyped", "staged", "uncertain", "traceback", "hang", "harness_error")
TARGETS = ("nifti_gz", "nifti", "mask", "dicom")
TARGET_WEIGHTS = (0.4, 0.2, 0.1, 0.3)

# NIfTI-1 header fields: name -> (byte offset, struct format, count)
HEADER_FIELDS = {
    "dim": (40, "h", 8), "datatype": (70, "h", 1), "bitpix": (72, "h", 1), "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1), "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1),
    "qform_code": (252, "h", 1), "sform_code": (254, "h", 1), "quatern": (256, "f", 6),
    "srow": (280, "f", 12), "magic": (344, "4s", 1), "sizeof_hdr": (0, "i", 1),
}
HOSTILE_INTS = (0, -1, 1, 2, 3, 4, 7, 8, 16, 64, 255, 256, 512, 1024, 2048, 32767, -32768)
HOSTILE_FLOATS = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-30, 1e30, 3.4e38, 0.5, 351.0,
                  353.0, 2.0**31)
DATATYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 255, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 7, 99)
DICOM_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
              "BitsAllocated", "PixelRepresentation", "RescaleSlope", "SliceThickness", "SamplesPerPixel")


# -- the bases ------------------------------------------------------------------------------------
def make_bases(folder: Path, seed: int) -> dict:
    """One phantom as .nii.gz, .nii, mask, and a DICOM series; returns paths and the liver box."""
    import nibabel as nib  # noqa: PLC0415
    from nibabel import orientations  # noqa: PLC0415

    from liverstage.phantoms.synth import synth_patient  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    ph = synth_patient(0, seed=seed, in_plane=64, slices=16)
    img = nib.Nifti1Image(ph.data, ph.affine)
    nib.save(img, folder / "volume.nii.gz")
    nib.save(img, folder / "volume.nii")
    nib.save(nib.Nifti1Image(ph.mask, ph.affine), folder / "mask.nii.gz")
    # The DICOM series holds the canonical (RAS) array: columns = x, rows = y, slices = z.
    ornt = orientations.io_orientation(ph.affine)
    data = np.ascontiguousarray(orientations.apply_orientation(ph.data, ornt))
    mask = np.ascontiguousarray(orientations.apply_orientation(ph.mask, ornt)) > 0
    spacing = [float(v) for v in ph.params["spacing_mm"]]
    write_dicom_series(folder / "dicom", data, spacing)
    xs, ys, zs = (np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3))
    bbox = (int(xs[0]), int(ys[0]), int(zs[0]), int(xs[-1]) + 1, int(ys[-1]) + 1, int(zs[-1]) + 1)
    return {"folder": str(folder), "bbox": bbox, "slices": int(data.shape[2])}


def write_dicom_series(folder: Path, data: np.ndarray, spacing: list[float]) -> None:
    """An MR series, one Explicit VR Little Endian file per slice (pydicom)."""
    from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(entropy_srcs=["s"]), generate_uid(entropy_srcs=["t"]), generate_uid(entropy_srcs=["f"])
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"i{k}"])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality = "PHANTOM", "Phantom^NotAPatient", "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # a series the rules stage: mutations reach the reader
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        # Columns run to the patient's right and rows to the anterior (LPS -x, -y): the canonical
        # array as stored, the liver where a scanner puts it (with 1\0\0\0\1\0 it was mirrored).
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, round(k * spacing[2], 4)]
        ds.PixelSpacing = [round(spacing[1], 4), round(spacing[0], 4)]
        ds.SliceThickness = round(spacing[2], 4)
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T.astype("<i2")).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)


# -- mutations ------------------------------------------------------------------------------------
def _hostile(rng, fmt: str):
    if fmt == "h":
        return int(rng.choice(HOSTILE_INTS)) if rng.uniform() < 0.8 else int(rng.integers(-32768, 32768))
    if fmt == "i":
        return int(rng.choice([0, 1, 348, 540, -1, 2**31 - 1, int(rng.integers(-2**31, 2**31))]))
    if fmt == "f":
        return float(rng.choice(HOSTILE_FLOATS)) if rng.uniform() < 0.8 else float(rng.normal(0, 10.0 ** rng.integers(-3, 8)))
    return bytes(rng.choice([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"xyz\x00"]))


def mutate_header(raw: bytes, rng) -> tuple[bytes, str]:
    name = str(rng.choice(list(HEADER_FIELDS)))
    offset, fmt, count = HEADER_FIELDS[name]
    size = struct.calcsize("<" + fmt)
    index = int(rng.integers(count))
    if name == "datatype":
        value = int(rng.choice(DATATYPES))
    elif name == "dim" and rng.uniform() < 0.5:
        value = int(rng.integers(-2, 600))
    else:
        value = _hostile(rng, fmt)
    out = bytearray(raw)
    out[offset + index * size: offset + (index + 1) * size] = struct.pack("<" + fmt, value)
    return bytes(out), f"header {name}[{index}] = {value!r}"


def mutate_voxels(raw: bytes, rng, data_start: int, data_end: int) -> tuple[bytes, str, str]:
    """(bytes, description, truth): truth 'corrupt' (too short), 'trailing' or 'unknown'."""
    kind = str(rng.choice(["flip_bytes", "flip_bits", "nan_run", "truncate", "append"]))
    out = bytearray(raw)
    if kind == "flip_bytes":
        for pos in rng.integers(data_start, data_end, size=int(rng.integers(1, 50))):
            out[pos] = int(rng.integers(256))
        return bytes(out), f"voxels: {kind}", "unknown"
    if kind == "flip_bits":
        for pos in rng.integers(data_start, data_end, size=int(rng.integers(1, 20))):
            out[pos] ^= 1 << int(rng.integers(8))
        return bytes(out), f"voxels: {kind}", "unknown"
    if kind == "nan_run":
        value = struct.pack("<f", float(rng.choice([np.nan, np.inf, -np.inf])))
        start = int(rng.integers(data_start, max(data_start + 1, data_end - 400)))
        for pos in range(start, min(data_end, start + 4 * int(rng.integers(1, 100))), 4):
            out[pos:pos + 4] = value
        return bytes(out), f"voxels: {kind} (float32 pattern over int16 data)", "unknown"
    if kind == "truncate":
        cut = int(rng.integers(0, data_end))
        return bytes(out[:cut]), f"voxels: truncated at {cut} of {data_end}", "corrupt"
    extra = bytes(rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8))
    return bytes(out) + extra, f"voxels: {len(extra)} bytes appended", "trailing"


def mutate_gzip(packed: bytes, rng) -> tuple[bytes, str]:
    kind = str(rng.choice(["header", "body", "trailer", "truncate", "garbage", "member"]))
    out = bytearray(packed)
    if kind == "header":
        pos = int(rng.integers(0, 10))
        out[pos] = (out[pos] + int(rng.integers(1, 256))) % 256
    elif kind == "body":
        for pos in rng.integers(10, len(out) - 8, size=int(rng.integers(1, 4))):
            out[pos] = (out[pos] + int(rng.integers(1, 256))) % 256
    elif kind == "trailer":
        pos = len(out) - 1 - int(rng.integers(0, 8))
        out[pos] = (out[pos] + int(rng.integers(1, 256))) % 256
    elif kind == "truncate":
        out = out[: int(rng.integers(0, len(out)))]
    elif kind == "garbage":
        out += bytes(rng.integers(1, 256, size=int(rng.integers(1, 100)), dtype=np.uint8))
    else:
        out += gzip.compress(bytes(rng.integers(0, 256, size=int(rng.integers(1, 3000)), dtype=np.uint8)))
    return bytes(out), f"gzip {kind}"


def gzip_truth(packed: bytes, content: bytes, declared_end: int) -> str:
    """What a full decode (CRC and length checked) says of a mutated gzip file."""
    try:
        decoded = gzip.decompress(packed)
    except (OSError, EOFError, zlib.error):
        return "corrupt"
    if decoded == content:
        return "intact"
    if len(decoded) < declared_end:
        return "corrupt"
    return "trailing" if decoded[: len(content)] == content else "unknown"


def _nifti_case(rng, base: Path, *, compressed: bool) -> tuple[bytes, str, str]:
    """Mutated bytes of a (compressed) NIfTI file, its description and truth."""
    packed = base.read_bytes()
    content = gzip.decompress(packed)
    offset = int(struct.unpack("<f", content[108:112])[0])
    data_end = len(content)
    what = str(rng.choice(["header", "voxels", "gzip"] if compressed else ["header", "voxels"]))
    if what == "header":
        content, desc = mutate_header(content, rng)
        truth = "unknown"
    elif what == "voxels":
        content, desc, truth = mutate_voxels(content, rng, offset, data_end)
    if not compressed:
        return content, desc, truth
    if what == "gzip":
        mutated, desc = mutate_gzip(packed, rng)
        return mutated, desc, gzip_truth(mutated, content, data_end)
    return gzip.compress(content, compresslevel=1, mtime=0), desc, truth


def _dicom_case(rng, base: Path, folder: Path) -> tuple[str, str]:
    """Mutate a copy of the DICOM series in `folder`; (description, truth)."""
    import pydicom  # noqa: PLC0415

    shutil.copytree(base, folder)
    files = sorted(folder.iterdir())
    victim = files[int(rng.integers(len(files)))]
    kind = str(rng.choice(["flip_bytes", "truncate", "tag", "remove", "duplicate"]))
    if kind == "flip_bytes":
        raw = bytearray(victim.read_bytes())
        for pos in rng.integers(0, len(raw), size=int(rng.integers(1, 30))):
            raw[pos] = int(rng.integers(256))
        victim.write_bytes(bytes(raw))
        return f"dicom {victim.name}: bytes flipped", "unknown"
    if kind == "truncate":
        raw = victim.read_bytes()
        cut = int(rng.integers(0, len(raw)))
        victim.write_bytes(raw[:cut])
        return f"dicom {victim.name}: truncated at {cut} of {len(raw)}", "corrupt"
    if kind == "remove":
        victim.unlink()
        where = "an end slice" if victim in (files[0], files[-1]) else "a middle slice"
        return f"dicom {victim.name} ({where}) removed", "unknown"
    if kind == "duplicate":
        shutil.copy(victim, folder / f"copy_{victim.name}")
        return f"dicom {victim.name} duplicated", "unknown"
    from pydicom.dataelem import RawDataElement  # noqa: PLC0415
    from pydicom.datadict import tag_for_keyword  # noqa: PLC0415
    from pydicom.tag import Tag  # noqa: PLC0415

    ds = pydicom.dcmread(victim)
    keyword = str(rng.choice(DICOM_TAGS))
    tag = Tag(tag_for_keyword(keyword))
    choice = rng.uniform()
    if choice < 0.2:
        if tag in ds:
            del ds[tag]
        value = "(deleted)"
    elif keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "SliceThickness"):
        n = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}.get(keyword, 1)
        vals = [str(rng.choice(["nan", "inf", "-inf", "0", "1e38", "-5", "abc", "1", ""])) for _ in range(n)]
        value = "\\".join(vals if choice < 0.9 else vals[: int(rng.integers(0, n))])
        raw = value.encode("ascii") + (b" " if len(value) % 2 else b"")
        # Written raw, as a broken writer would: pydicom refuses to hold such a DS value itself.
        ds._dict[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)
    else:
        value = int(rng.choice([0, 1, 2, 7, 8, 12, 16, 32, 64, 65535]))
        ds[tag].value = value
    ds.save_as(victim)
    return f"dicom {victim.name}: {keyword} = {value}", "unknown"


def build_case(case: int, seed: int, bases: dict, folder: Path) -> dict:
    """Write case `case`'s input under `folder`; returns its argv tail, description and truth."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, case, 0xF0225]))
    base = Path(bases["folder"])
    target = str(rng.choice(TARGETS, p=TARGET_WEIGHTS))
    folder.mkdir(parents=True, exist_ok=True)
    if target == "dicom":
        desc, truth = _dicom_case(rng, base / "dicom", folder / "series")
        bbox = ",".join(str(v) for v in bases["bbox"])
        return {"target": target, "desc": desc, "truth": truth, "argv": [str(folder / "series"), "--bbox", bbox]}
    if target == "mask":
        compressed = True
        data, desc, truth = _nifti_case(rng, base / "mask.nii.gz", compressed=compressed)
        (folder / "mask.nii.gz").write_bytes(data)
        return {"target": target, "desc": "mask " + desc, "truth": "corrupt" if truth == "corrupt" else "unknown",
                "argv": [str(base / "volume.nii.gz"), "--mask", str(folder / "mask.nii.gz")]}
    compressed = target == "nifti_gz"
    source = base / "volume.nii.gz"
    data, desc, truth = _nifti_case(rng, source, compressed=compressed)
    name = "volume.nii.gz" if compressed else "volume.nii"
    (folder / name).write_bytes(data)
    return {"target": target, "desc": desc, "truth": truth,
            "argv": [str(folder / name), "--mask", str(base / "mask.nii.gz")]}


# -- running one case -------------------------------------------------------------------------------
@contextlib.contextmanager
def _fd2_captured():
    """What is written to file descriptor 2 inside, as [text] once the block ends: C libraries'
    messages, and a logging handler that keeps the stderr of its import (nibabel's does; the
    libraries are imported before any redirect, see run_case, so such a handler writes here)."""
    written: list[str] = []
    sys.__stderr__.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield written
        finally:
            sys.__stderr__.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            written.append(sink.read().decode("utf-8", "replace"))


def run_case(case: int, seed: int, bases: dict, model: str, work: Path) -> dict:
    """Build and run one case in this process; classify what happened."""
    import liverstage.runtime.io  # noqa: F401, PLC0415  (nibabel's log handler binds the real stderr, not a case's)
    from liverstage.runtime.cli import main  # noqa: PLC0415

    folder = work / f"case{case}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        spec = build_case(case, seed, bases, folder / "input")
    except Exception as exc:  # noqa: BLE001  (a mutation this harness could not write: not predict's failure)
        shutil.rmtree(folder, ignore_errors=True)
        return {"case": case, "target": "", "desc": f"could not build the case: {type(exc).__name__}: {exc}",
                "truth": "", "code": None, "stderr": "", "outcome": "harness_error", "failures": []}
    out = folder / "out"
    out.mkdir()
    report, csv_path = out / "report.json", out / "crops.csv"
    argv = ["predict", *spec["argv"], "--model", model, "--report", str(report), "--csv", str(csv_path),
            "--strict", "--quiet"]
    stdout, stderr = io.StringIO(), io.StringIO()
    code, escaped = 0, None
    with _fd2_captured() as written_to_fd2, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001  (an exception out of main() is what we look for)
            escaped = f"{type(exc).__name__}: {exc}"
    err = stderr.getvalue() + written_to_fd2[0]
    left = sorted(p.name for p in out.iterdir())
    result = {"case": case, "target": spec["target"], "desc": spec["desc"], "truth": spec["truth"], "code": code,
              "stderr": " ".join(err.split())[:300]}
    if escaped or "Traceback" in err or code not in (0, 2, 3):
        result["outcome"] = "traceback"
        result["stderr"] = (escaped or "") + " " + result["stderr"]
    elif code == 2:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        untyped = last.startswith("liverstage: error: ") and _names_exception(last)
        result["outcome"] = "refused_untyped" if untyped else "refused"
    else:
        result["outcome"] = "staged" if code == 0 else "uncertain"
    failures = []
    expected_lines = 1 if code == 2 else 0
    if result["outcome"] != "traceback" and len(err.strip().splitlines()) != expected_lines:
        failures.append("extra_stderr")  # a warning or more on stderr: a refusal must be one line, a staging none
    if result["outcome"] == "traceback":
        failures.append("traceback")
    if result["outcome"].startswith("refused") and left:
        failures.append("partial_output")
    if result["outcome"] in ("staged", "uncertain"):
        if sorted(left) != ["crops.csv", "report.json"] or not _valid_json(report):
            failures.append("partial_output")
        if spec["truth"] == "corrupt":
            failures.append("corrupt_staged")
        if spec["truth"] == "trailing" and "after the image data" not in report.read_text(errors="replace"):
            failures.append("trailing_unreported")
    result["failures"] = failures
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _names_exception(err: str) -> bool:
    message = err.split("liverstage: error: ", 1)[1]
    tail = message.split(": ", 1)
    for part in [message] + tail[1:]:
        head = part.split(":", 1)[0].strip().split(" ")[-1]
        if head.endswith(("Error", "Exception")) and head[:1].isupper():
            return True
    return False


def _valid_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


# -- workers ----------------------------------------------------------------------------------------
# Each worker has a pipe of its own, not a share of two queues: a worker killed for a hang could
# die holding a shared queue's lock (its feeder thread between writing a message and releasing
# the lock), and every later worker would then block on that lock for ever. A pipe has no lock
# to leave behind; killing a worker loses only its own pipe.
WORKER_START_TIMEOUT = 180.0  # seconds for a fresh worker to import liverstage and say it is ready


def _worker(conn, seed: int, bases: dict, model: str, work: str) -> None:
    from liverstage.runtime.cli import main  # noqa: F401, PLC0415  (imported before "ready": a case's time is its own)

    conn.send(("ready", None))
    while True:
        case = conn.recv()
        if case is None:
            return
        start = time.time()
        row = run_case(case, seed, bases, model, Path(work))
        row["seconds"] = round(time.time() - start, 3)
        conn.send(("done", row))


class _WorkerSlot:
    """One worker process, its end of the pipe, and the case it runs (None when idle)."""

    def __init__(self, ctx, args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.born = time.time()
        self.ready = False
        self.case: int | None = None
        self.since = 0.0

    def stop(self, *, kill: bool) -> None:
        if kill:
            self.proc.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=10)
        self.conn.close()


def run(model: Path, out: Path, *, cases: int, seed: int, workers: int, timeout: float,
        log=print) -> dict:
    """Run cases 0..cases-1 (skipping those already in OUT/results.jsonl); returns the summary.

    A case past `timeout` is a hang: only its worker is killed and replaced. A worker that dies
    during a case (a crash of the interpreter itself) makes that case a traceback. Every wait is
    bounded: a case by `timeout`, a worker's start by WORKER_START_TIMEOUT, so the loop ends.
    """
    if workers not in (1, 2):
        raise ValueError("--workers must be 1 or 2 (the machine is shared)")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done: dict[int, dict] = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                row = json.loads(line)
                done[int(row["case"])] = row
    todo = [c for c in range(cases) if c not in done]
    todo.reverse()  # popped from the end: cases run in order
    bases = make_bases(out / "bases", seed)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    ctx = mp.get_context("spawn")
    worker_args = (seed, bases, str(model.resolve()), str(work))
    slots = [_WorkerSlot(ctx, worker_args) for _ in range(min(workers, len(todo)))]
    started = time.time()
    try:
        with results_path.open("a", encoding="utf-8") as sink:

            def record(row: dict) -> None:
                done[row["case"]] = row
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                if len(done) % 100 == 0:
                    log(f"{len(done)} of {cases} cases ({time.time() - started:.0f} s)")

            while len(done) < cases:
                for slot in slots:
                    if slot.ready and slot.case is None and todo:
                        slot.case, slot.since = todo.pop(), time.time()
                        slot.conn.send(slot.case)
                for conn in mp_connection.wait([s.conn for s in slots], timeout=0.5):
                    slot = next(s for s in slots if s.conn is conn)
                    try:
                        kind, value = conn.recv()
                    except (EOFError, OSError):
                        continue  # the worker died: seen below as not alive
                    if kind == "ready":
                        slot.ready = True
                    elif kind == "done" and slot.case is not None:
                        if value["seconds"] > timeout:  # finished, but past the limit: a hang all the same
                            value["outcome"], value["failures"] = "hang", value["failures"] + ["hang"]
                        record(value)
                        slot.case = None
                for slot in list(slots):
                    alive = slot.proc.is_alive()
                    if slot.case is not None:
                        if alive and time.time() - slot.since <= timeout:
                            continue
                        outcome = "hang" if alive else "traceback"
                        record({"case": slot.case, "outcome": outcome, "failures": [outcome], "target": "",
                                "truth": "", "stderr": "",
                                "desc": f"worker {'killed after the timeout' if alive else 'died'}"})
                    elif not slot.ready:
                        if not alive:
                            raise RuntimeError(f"a fuzz worker died while starting (exit code {slot.proc.exitcode})")
                        if time.time() - slot.born > WORKER_START_TIMEOUT:
                            raise RuntimeError(f"a fuzz worker did not start within {WORKER_START_TIMEOUT:.0f} s")
                        continue
                    elif alive:
                        continue  # idle and well
                    slot.case = None
                    slot.stop(kill=True)
                    slots.remove(slot)
                    if todo:
                        slots.append(_WorkerSlot(ctx, worker_args))
    finally:
        for slot in slots:
            slot.stop(kill=False)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise([done[c] for c in range(cases)])
    from liverstage.runtime.atomic import write_json  # noqa: PLC0415

    write_json(out / "summary.json", summary)
    return summary


def summarise(rows: list[dict]) -> dict:
    summary = {"cases": len(rows), "outcomes": {k: 0 for k in OUTCOMES}, "failures": {k: 0 for k in FAILURES},
               "by_target": {}, "examples": {}}
    for row in rows:
        summary["outcomes"][row["outcome"]] += 1
        target = summary["by_target"].setdefault(row.get("target") or "?", {k: 0 for k in (*OUTCOMES, *FAILURES)})
        target[row["outcome"]] += 1
        for failure in row["failures"]:
            summary["failures"][failure] += 1
            target[failure] += 1
            summary["examples"].setdefault(failure, []).append(
                {k: row.get(k) for k in ("case", "target", "desc", "stderr")})
        if row["outcome"] in ("refused_untyped", "harness_error"):
            summary["examples"].setdefault("refused_untyped", []).append(
                {k: row.get(k) for k in ("case", "target", "desc", "stderr")})
    for key in summary["examples"]:
        summary["examples"][key] = summary["examples"][key][:10]
    return summary


def print_summary(summary: dict) -> None:
    print(f"{summary['cases']} cases: " + ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items()))
    for target, counts in summary["by_target"].items():
        print(f"  {target:<9} " + ", ".join(f"{k} {v}" for k, v in counts.items() if v and k in OUTCOMES)
              + "".join(f"; {k} {v}" for k, v in counts.items() if v and k in FAILURES))
    print("failures: " + ", ".join(f"{k} {v}" for k, v in summary["failures"].items())
          + "   (targets: all 0)")
    for key, examples in summary["examples"].items():
        for ex in examples[:3]:
            print(f"  {key}: case {ex['case']} ({ex['target']}: {ex['desc']}): {ex['stderr']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx (the demo's model.onnx, or any)")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1 or 2)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--out", type=Path, required=True, help="results.jsonl and summary.json go here (resumable)")
    parser.add_argument("--only", type=int, default=None, help="replay one case in this process; its files stay in OUT/replay/")
    args = parser.parse_args(argv)
    if args.only is not None:
        bases = make_bases(args.out / "bases", args.seed)
        spec = build_case(args.only, args.seed, bases, args.out / "replay" / f"case{args.only}")
        print(json.dumps(spec, indent=1))
        print(json.dumps(run_case(args.only, args.seed, bases, str(args.model.resolve()), args.out / "work-replay"), indent=1))
        return 0
    start = time.perf_counter()
    summary = run(args.model, args.out, cases=args.cases, seed=args.seed, workers=args.workers, timeout=args.timeout)
    print_summary(summary)
    print(f"({time.perf_counter() - start:.0f} s; every case's row is in {args.out / 'results.jsonl'})")
    return 0 if not any(summary["failures"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
