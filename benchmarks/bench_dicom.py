"""Reading a DICOM study against reading the same volume as NIfTI, as ratios from one run.

    python benchmarks/bench_dicom.py [--in-plane 256] [--slices 48] [--iters 5] [--warmup 1]

One phantom (synthetic, NOT a patient) is written as .nii.gz (the reference), as a classic
series in explicit VR little endian, RLE lossless and JPEG-LS lossless, and as one legacy
converted enhanced MR file (highdicom), each in a study folder beside a real localizer, 3-plane
pilot and projection series from pydicom's test data. Timed per form: `scan_dicom` (headers of
the whole study), `select_series` + `load_series` (pixels -> canonical Volume), and both, against
`load_volume` of the .nii.gz. Also checks that every form gives the NIfTI's voxels bit for bit.
Needs the `dicom` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _writer():
    spec = importlib.util.spec_from_file_location("liverstage_bench_dicom_series", ROOT / "tests" / "_dicom_series.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-plane", type=int, default=256)
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)

    import nibabel as nib
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

    from liverstage.phantoms.synth import synth_patient
    from liverstage.runtime.bench import time_calls
    from liverstage.runtime.dicom import quiet_pydicom_warnings
    from liverstage.runtime.dicom_study import load_series, scan_dicom, select_series
    from liverstage.runtime.io import load_volume

    quiet_pydicom_warnings()
    writer = _writer()
    with tempfile.TemporaryDirectory(prefix="bench_dicom_") as tmp:
        tmp = Path(tmp)
        ph = synth_patient(0, seed=0, in_plane=args.in_plane, slices=args.slices)
        nifti = tmp / "phantom.nii.gz"
        nib.save(nib.Nifti1Image(ph.data, ph.affine), nifti)
        volume = load_volume(nifti)
        studies = {}
        for name, syntax in (("explicit VR", ExplicitVRLittleEndian), ("RLE", RLELossless), ("JPEG-LS", JPEGLSLossless)):
            study = tmp / name.replace(" ", "_")
            writer.real_distractors(study)
            files = writer.volume_as_series(volume, study / "ax", transfer_syntax=syntax, study_uid=writer.REAL_STUDY_UID)
            studies[name] = study
            if syntax == ExplicitVRLittleEndian:
                explicit_files = files
        study = tmp / "enhanced"
        writer.real_distractors(study)
        writer.legacy_enhanced(explicit_files, study / "ax" / "lce.dcm")
        studies["enhanced (1 file)"] = study

        def nifti_load():
            return load_volume(nifti)

        ref = float(np.median(time_calls(nifti_load, warmup=args.warmup, iters=args.iters)))
        print(f"phantom {volume.shape} (synthetic, not a patient); {args.iters} timed runs, median; "
              f"reference load_volume(.nii.gz) {ref * 1e3:.1f} ms")
        print(f"{'form':<20} {'scan ms':>9} {'load ms':>9} {'total ms':>9} {'total / NIfTI':>14}  identical")
        for name, study in studies.items():
            scan_s = time_calls(lambda: scan_dicom(study), warmup=args.warmup, iters=args.iters)
            info = select_series(scan_dicom(study))
            load_s = time_calls(lambda: load_series(info), warmup=args.warmup, iters=args.iters)
            same = load_series(info).data.tobytes() == volume.data.tobytes()
            scan, load = float(np.median(scan_s)), float(np.median(load_s))
            print(f"{name:<20} {scan * 1e3:9.1f} {load * 1e3:9.1f} {(scan + load) * 1e3:9.1f} "
                  f"{(scan + load) / ref:13.2f}x  {'yes' if same else 'NO'}")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
