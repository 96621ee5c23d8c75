"""The liver region's side of the body's midline (runtime/laterality.py) on phantoms and on
their mirrored copies, to show the check's margins.

    python benchmarks/laterality_eval.py [--in-plane 96] [--slices 20] [--n 100] [--seed 9000001]

Each phantom (synthetic, not a patient) is put on the canonical grid with its liver mask, then
mirrored left-right (canonical x flipped, the affine kept: the liver on the patient's left, as
benchmarks/ood_heldout.py's `mirrored` kind). Prints the range of the side over each set, how
many were not judged (None: the body fills an edge of the field of view) and how many were
flagged (side below runtime/laterality.LEFT_OF_MIDLINE). Target: no phantom flagged, every
mirrored copy that is judged flagged.
"""

from __future__ import annotations

import argparse

import numpy as np
from nibabel import orientations

from liverstage.phantoms.synth import synth_patient
from liverstage.runtime.io import volume_from_array
from liverstage.runtime.laterality import region_side, side_reason


def sides(index: int, *, seed: int, in_plane: int, slices: int) -> tuple[float | None, float | None]:
    """(side of the phantom, side of its mirrored copy)."""
    phantom = synth_patient(index, seed=seed, in_plane=in_plane, slices=slices)
    volume = volume_from_array(phantom.data, phantom.affine, source=f"phantom {seed}/{index}")
    liver = np.asfortranarray(orientations.apply_orientation(phantom.mask, volume.ornt) > 0)
    mirrored = volume_from_array(np.ascontiguousarray(volume.data[::-1]), volume.affine, source="mirrored")
    return region_side(volume, liver), region_side(mirrored, np.asfortranarray(liver[::-1]))


def summary(name: str, values: list[float | None]) -> str:
    judged = [v for v in values if v is not None]
    flagged = sum(side_reason(v) is not None for v in judged)
    span = f"{min(judged):+.3f} to {max(judged):+.3f}" if judged else "-"
    return f"{name:9s} side {span}; not judged {len(values) - len(judged)}; flagged {flagged} of {len(values)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-plane", type=int, default=96)
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=9_000_001)
    args = parser.parse_args(argv)
    if args.n < 1 or args.in_plane < 32 or args.slices < 4:
        parser.error("--n must be >= 1, --in-plane >= 32 and --slices >= 4")
    pairs = [sides(i, seed=args.seed, in_plane=args.in_plane, slices=args.slices) for i in range(args.n)]
    print(f"{args.n} phantoms of seed {args.seed}, {args.in_plane} px, about {args.slices} slices")
    print(summary("phantoms", [a for a, _ in pairs]))
    print(summary("mirrored", [b for _, b in pairs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
