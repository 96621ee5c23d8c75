"""Fresh in-distribution phantoms under the changes a real study brings: a mask that is not the
training masks' exact outline, other intensity units and storage, scanner effects. How many are
flagged uncertain, and how many staged right?

    python benchmarks/mask_robustness.py --model liverstage-demo/model.int8.onnx [--fresh 20] [--json out.json]

Each of `--fresh` phantoms (a new seed, the demo's geometry) is staged through `predict` from its
file as made by `liverstage synth`, and again after each change below, with its (changed) mask:

  same        the same anatomy and values, stored otherwise: intensities x1000 and x0.01, +200,
              as int16, the slice order reversed, the in-plane axes reversed with the affine
              saying so. predict must give the same verdict (the normalisation and the canonical
              orientation absorb them), so a flag here is a false alarm.
  mask        the mask drawn otherwise: one voxel wider in-plane on a quarter, half or all of its
              edge (a loose segmentation), one and two voxels wider in 3D (also one slice above and
              below), one and three voxels narrower, its box grown by 3 and 6 voxels per slice
              without new voxels. A tool's mask (TotalSegmentator total_mr) is rarely the training
              masks' exact outline; the first rows are what PreprocessSpec.percentile_inset is for.
  scanner     a smooth bias field (x0.74..1.35), Rician-like noise of 5 % and 15 % of the liver's
              median, a Gaussian blur (1 voxel), in-plane resampling to 1.5x and 0.6x the matrix,
              intensity gamma 0.7 and 1.5. The image changes; a flag can be right, and "right"
              (the stage against the phantom's) says whether staging held up.

Phantoms are synthetic, not patients: these figures say what the preprocessing and the gate do
with such changes, not how a real study would be staged.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from liverstage.phantoms.synth import synth_cohort
from liverstage.runtime.backends import open_backend
from liverstage.runtime.manifest import read_manifest
from liverstage.runtime.predict import Predictor

SEED = 5_550_001  # not the training seed, not ood_eval's
CROSS = np.zeros((3, 3, 3), bool)
CROSS[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # in-plane 4-neighbours


def _in_plane_ring(mask: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    ring = ndimage.binary_dilation(mask, structure=CROSS) & ~mask
    return mask | (ring & (rng.random(mask.shape) < share))


def _box_only(mask: np.ndarray, grow: int) -> np.ndarray:
    """The mask plus two corner voxels per slice at the box of its `grow`-voxel dilation."""
    big = ndimage.binary_dilation(mask, structure=CROSS, iterations=grow)
    out = mask.copy()
    for z in np.nonzero(mask.any(axis=(0, 1)))[0]:
        xs, ys = np.nonzero(big[:, :, z])
        out[xs.min(), ys.min(), z] = out[xs.max(), ys.max(), z] = True
    return out


def _bias(shape) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.exp(0.3 * x + 0.2 * y - 0.1 * z)


def _zoom(data, mask, affine, factor):
    scaled = affine.copy()
    scaled[:3, :2] /= factor
    return (ndimage.zoom(data, (factor, factor, 1), order=1),
            ndimage.zoom(mask.astype(np.float32), (factor, factor, 1), order=1) > 0.5, scaled)


def _noise(data, mask, share, rng):
    sigma = share * float(np.median(data[mask]))
    return np.hypot(data + rng.normal(0, sigma, data.shape), rng.normal(0, sigma, data.shape))


def _flip_xy(data, mask, affine):
    flip = np.array([[-1, 0, 0, data.shape[0] - 1], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return data[::-1, ::-1], mask[::-1, ::-1], affine @ flip


def _flip_z(data, mask, affine):
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = data.shape[2] - 1
    return data[:, :, ::-1], mask[:, :, ::-1], affine @ flip


# name -> (group, change of (data float64, mask bool, affine, rng) -> (data, mask, affine))
CHANGES = {
    "none": ("same", lambda d, m, a, r: (d, m, a)),
    "x1000": ("same", lambda d, m, a, r: (d * 1000, m, a)),
    "x0.01": ("same", lambda d, m, a, r: (d * 0.01, m, a)),
    "+200": ("same", lambda d, m, a, r: (d + 200, m, a)),
    "int16": ("same", lambda d, m, a, r: (np.round(d / d.max() * 4095).astype(np.int16), m, a)),
    "slices reversed": ("same", lambda d, m, a, r: _flip_z(d, m, a)),
    "x and y reversed": ("same", lambda d, m, a, r: _flip_xy(d, m, a)),
    "wider 1 in-plane on 1/4": ("mask", lambda d, m, a, r: (d, _in_plane_ring(m, 0.25, r), a)),
    "wider 1 in-plane on 1/2": ("mask", lambda d, m, a, r: (d, _in_plane_ring(m, 0.5, r), a)),
    "wider 1 in-plane": ("mask", lambda d, m, a, r: (d, _in_plane_ring(m, 1.0, r), a)),
    "wider 1 in 3D": ("mask", lambda d, m, a, r: (d, ndimage.binary_dilation(m), a)),
    "wider 2 in 3D": ("mask", lambda d, m, a, r: (d, ndimage.binary_dilation(m, iterations=2), a)),
    "narrower 1": ("mask", lambda d, m, a, r: (d, ndimage.binary_erosion(m, structure=CROSS), a)),
    "narrower 3": ("mask", lambda d, m, a, r: (d, ndimage.binary_erosion(m, structure=CROSS, iterations=3), a)),
    "box +3": ("mask", lambda d, m, a, r: (d, _box_only(m, 3), a)),
    "box +6": ("mask", lambda d, m, a, r: (d, _box_only(m, 6), a)),
    "bias field": ("scanner", lambda d, m, a, r: (d * _bias(d.shape), m, a)),
    "noise 5 %": ("scanner", lambda d, m, a, r: (_noise(d, m, 0.05, r), m, a)),
    "noise 15 %": ("scanner", lambda d, m, a, r: (_noise(d, m, 0.15, r), m, a)),
    "blur 1 voxel": ("scanner", lambda d, m, a, r: (ndimage.gaussian_filter(d, (1, 1, 0)), m, a)),
    "matrix x1.5": ("scanner", lambda d, m, a, r: _zoom(d, m, a, 1.5)),
    "matrix x0.6": ("scanner", lambda d, m, a, r: _zoom(d, m, a, 0.6)),
    "gamma 0.7": ("scanner", lambda d, m, a, r: ((d / d.max()) ** 0.7 * 1000, m, a)),
    "gamma 1.5": ("scanner", lambda d, m, a, r: ((d / d.max()) ** 1.5 * 1000, m, a)),
}


def measure(backend, rows, name: str, folder: Path, seed: int) -> dict:
    """Stage every phantom after change `name`: counts, and the volumes' gate scores."""
    rng = np.random.default_rng(seed)
    change = CHANGES[name][1]
    counts = {"volumes": 0, "refused": 0, "flagged": 0, "right": 0, "certain": 0, "certain_right": 0}
    scores = []
    for i, row in enumerate(rows):
        image, mask_image = nib.load(row.image), nib.load(row.mask)
        data, mask, affine = change(np.asarray(image.dataobj, dtype=np.float64),
                                    np.asarray(mask_image.dataobj) > 0, image.affine, rng)
        vol, msk = folder / f"{i}.nii.gz", folder / f"{i}_mask.nii.gz"
        nib.save(nib.Nifti1Image(data if data.dtype == np.int16 else data.astype(np.float32), affine), vol)
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), msk)
        run = Predictor(backend, mask=msk).run([vol])
        counts["volumes"] += 1
        if run.errors:
            counts["refused"] += 1
            continue
        verdict = run.results[0].verdict
        right = verdict.stage == row.stage
        scores.append(verdict.ood.score)
        counts["flagged"] += int(verdict.uncertain)
        counts["right"] += int(right)
        counts["certain"] += int(not verdict.uncertain)
        counts["certain_right"] += int(right and not verdict.uncertain)
    return {"group": CHANGES[name][0], **counts,
            "median_score": float(np.median(scores)) if scores else None,
            "max_score": float(np.max(scores)) if scores else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx carrying a gate")
    parser.add_argument("--fresh", type=int, default=20, help="fresh in-distribution phantoms")
    parser.add_argument("--in-plane", type=int, default=160, help="phantom matrix size (the demo's: 160)")
    parser.add_argument("--slices", type=int, default=32, help="phantom slice count (the demo's: 32)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--changes", default=",".join(CHANGES), help="changes to apply, comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.changes.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHANGES]
    if unknown or args.fresh < 1:
        parser.error(f"unknown change(s) {unknown} (known: {list(CHANGES)})" if unknown else "--fresh must be >= 1")
    backend = open_backend(args.model, device="cpu")
    spec = backend.metadata.preprocess
    start = time.perf_counter()
    print(f"model {args.model} (percentile_inset {spec.percentile_inset}; synthetic phantoms, not patients): "
          f"{args.fresh} fresh phantoms, seed {args.seed}")
    print(f"  {'change':<32}{'group':<9}{'flagged':>8}{'refused':>8}{'right':>7}{'right, not flagged':>20}"
          f"{'score median / max':>20}")
    figures = {}
    with tempfile.TemporaryDirectory(prefix="liverstage-mask-") as tmp:
        rows = list(read_manifest(synth_cohort(Path(tmp) / "fresh", patients=args.fresh, seed=args.seed,
                                               in_plane=args.in_plane, slices=args.slices)))
        for index, name in enumerate(names):
            folder = Path(tmp) / f"change{index}"
            folder.mkdir()
            f = figures[name] = measure(backend, rows, name, folder, args.seed + index)
            score = "-" if f["median_score"] is None else f"{f['median_score']:.2f} / {f['max_score']:.2f}"
            print(f"  {name:<32}{f['group']:<9}{f['flagged']:>5} of {f['volumes']:<3}{f['refused']:>5}"
                  f"{f['right']:>7}{f['certain_right']:>12} of {f['certain']:<5}{score:>20}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "fresh": args.fresh, "seed": args.seed,
                                         "percentile_inset": spec.percentile_inset, "changes": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
