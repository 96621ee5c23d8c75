"""What the NIfTI integrity checks cost: loading a 512 x 512 x 200 int16 .nii.gz phantom.

    python benchmarks/nifti_check_cost.py [--repeats 5]

Three ways to load the same file, interleaved so that all see the same machine load, median of
`--repeats` each; printed as ratios to nibabel's own unchecked read:
  checked     io.load_volume: header checks, the voxels read from the stream, then the stream
              read to its end (gzip checks CRC and length) -- one decompression in all
  unchecked   nib.load + np.asanyarray(dataobj) + the same canonical float32 conversion: what
              the runtime did before (the gzip trailer is never read)
  two_pass    a separate full gzip pass, as a check done before nibabel's read would add
The phantom is synthetic, not a patient.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverstage.runtime.io import load_volume, volume_from_array


def make_volume(path: Path) -> None:
    from liverstage.phantoms.synth import synth_patient  # noqa: PLC0415

    ph = synth_patient(0, seed=3, in_plane=512, slices=260)  # at least 221 slices; cut to 200 below
    data = nib.Nifti1Image(ph.data, ph.affine).as_reoriented(nib.orientations.io_orientation(ph.affine))
    arr = np.asanyarray(data.dataobj)[:, :, :200]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), data.affine), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.nii.gz"
        make_volume(path)
        shape = nib.load(path).shape

        def checked():
            load_volume(path)

        def unchecked():
            img = nib.load(path)
            volume_from_array(np.asanyarray(img.dataobj), img.affine, source=str(path))

        def two_pass():
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 20):
                    pass

        times: dict[str, list[float]] = {"checked": [], "unchecked": [], "two_pass": []}
        for _ in range(args.repeats):
            for name, fn in (("checked", checked), ("unchecked", unchecked), ("two_pass", two_pass)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        size = path.stat().st_size
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{shape} int16, {size / 1e6:.1f} MB compressed; median of {args.repeats} (phantom, not a patient)")
    print(f"  checked load_volume  {med['checked']:.3f} s  ({med['checked'] / med['unchecked']:.2f}x the unchecked read)")
    print(f"  unchecked nibabel    {med['unchecked']:.3f} s")
    print(f"  a separate gzip pass {med['two_pass']:.3f} s  (+{med['two_pass'] / med['unchecked']:.0%} if done apart)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
