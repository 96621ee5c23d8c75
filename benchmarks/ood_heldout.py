"""A held-out check of the out-of-distribution gate: kinds it was never chosen or measured on.

    python benchmarks/ood_heldout.py --model liverstage-demo/model.onnx [--per-kind 6] [--json F]

`ood_eval.py` measures the gate on the kinds of export/ood_sets.py, and its `--sweep` chose
the gate's settings on some of them, so its figures are not a held-out test. The kinds here
appear nowhere in the package; nothing was tuned on them. Each volume is written to NIfTI
with its region as a mask and staged from the file by `predict` (flagged uncertain or
refused is a detection), as in `ood_eval.py`.

Kinds that are not liver MRI (counted; the target is the gate's, >= 99 % flagged or refused):

  uniform_noise   uniform noise over [0, level]
  salt_pepper     a blank field with 10 % of its voxels black or white
  stripes         a sinusoidal grating, random period (2.5-20 voxels) and direction
  blobs           30 random discs of random intensities on a flat background, slightly noisy
  heavy_noise     a phantom (synthetic, not a patient) with Gaussian noise of three times its
                  liver's 10-90 % intensity range: no anatomy can be read from it
  mask_in_air     a phantom with the region in the air at a corner of its field of view
  whole_fov       a phantom with the whole field of view as the region: crops of the whole
                  abdomen, not of the liver
  photo           matplotlib's sample photograph (grace_hopper.jpg) stacked into a volume,
                  a box at six places on it: not a medical image at all
  terrain         matplotlib's sample elevation map (jacksboro_fault_dem.npz), two boxes

Kinds reported apart (not counted: whether they should be flagged is a judgement, and the
synthetic phantoms cannot settle it):

  rot90           a phantom and its liver mask rotated 90 degrees in plane, the affine kept: a
                  liver, shown in an orientation the training data never had
  shuffled_liver  a phantom with the voxels inside its liver randomly permuted: the liver's
                  intensities without its texture (on real MRI a gate should see this; the
                  phantoms' liver texture is close to noise already)

The matplotlib files ship inside matplotlib (the `train` extra installs it); without it the
two image kinds are left out with a line saying so. Phantoms are synthetic, not patients.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ood_eval import open_gated, stage_all, summarise, write_case  # noqa: E402

from liverstage.export.ood_sets import SHAPE, OodCase, _affine, _liver_box  # noqa: E402

HELDOUT_SEED = 7_000_001  # neither the training, export, ood_eval nor sweep seed
COUNTED = ("uniform_noise", "salt_pepper", "stripes", "blobs", "heavy_noise", "mask_in_air", "whole_fov",
           "photo", "terrain")
APART = ("rot90", "shuffled_liver")
PHOTO_BOXES = ((100, 150, 400, 450), (0, 0, 200, 200), (200, 200, 400, 400), (300, 100, 500, 300),
               (50, 250, 250, 450), (250, 0, 500, 250))


def synthetic_cases(rng: np.random.Generator, index: int) -> list[OodCase]:
    """One volume of each synthetic kind, with the liver-sized box of ood_sets as its region."""
    level = rng.uniform(100, 2000)
    grid = np.indices(SHAPE).astype(np.float64)
    salt = np.full(SHAPE, level)
    draw = rng.uniform(size=SHAPE)
    salt[draw < 0.05], salt[draw > 0.95] = 0.0, 2.0 * level
    period, angle = rng.uniform(2.5, 20.0), rng.uniform(0.0, np.pi)
    stripes = level * (1.0 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * grid[0] + np.sin(angle) * grid[1]) / period))
    blobs = np.full(SHAPE, 0.3 * level)
    for _ in range(30):
        cx, cy = rng.uniform(0, SHAPE[0], 2)
        radius = rng.uniform(2, 12)
        blobs[(grid[0] - cx) ** 2 + (grid[1] - cy) ** 2 < radius * radius] = rng.uniform(0.2, 2.0) * level
    blobs += rng.normal(0.0, 0.02 * level, SHAPE)
    volumes = {"uniform_noise": rng.uniform(0.0, level, SHAPE), "salt_pepper": salt, "stripes": stripes,
               "blobs": blobs}
    return [OodCase(kind, f"{kind} {index}", data.astype(np.float32), _affine(), _liver_box(SHAPE))
            for kind, data in volumes.items()]


def phantom_cases(rng: np.random.Generator, index: int) -> list[OodCase]:
    """The phantom-based kinds, from one phantom of the held-out seed."""
    from nibabel import orientations  # noqa: PLC0415

    from liverstage.phantoms.synth import synth_patient  # noqa: PLC0415
    from liverstage.runtime.io import volume_from_array  # noqa: PLC0415

    ph = synth_patient(index, seed=HELDOUT_SEED, in_plane=96, slices=20)
    vol = volume_from_array(ph.data, ph.affine, source=f"phantom {HELDOUT_SEED}/{index}")
    liver = np.ascontiguousarray(orientations.apply_orientation(ph.mask, vol.ornt)) > 0
    data = vol.data.astype(np.float64)
    spread = float(np.percentile(data[liver], 90) - np.percentile(data[liver], 10))
    air = np.zeros(data.shape, dtype=bool)
    air[: data.shape[0] // 5, : data.shape[1] // 5, :] = True
    shuffled = data.copy()
    inside = shuffled[liver]
    rng.shuffle(inside)
    shuffled[liver] = inside
    name = f"phantom {index}"
    return [
        OodCase("heavy_noise", name, (data + rng.normal(0.0, 3.0 * spread, data.shape)).astype(np.float32), vol.affine, liver),
        OodCase("mask_in_air", name, data.astype(np.float32), vol.affine, air),
        OodCase("whole_fov", name, data.astype(np.float32), vol.affine, np.ones(data.shape, dtype=bool)),
        OodCase("rot90", name, np.ascontiguousarray(np.rot90(data, axes=(0, 1))).astype(np.float32), vol.affine,
                np.ascontiguousarray(np.rot90(liver, axes=(0, 1)))),
        OodCase("shuffled_liver", name, shuffled.astype(np.float32), vol.affine, liver),
    ]


def _image_volume(image: np.ndarray, slices: int = 8) -> np.ndarray:
    """A 2D picture (rows top to bottom) as a canonical volume: x = columns, y = rows upwards."""
    return np.repeat(np.ascontiguousarray(np.rot90(image, -1))[:, :, None], slices, axis=2).astype(np.float32)


def image_cases() -> tuple[list[OodCase], str | None]:
    """matplotlib's sample photograph and elevation map, or none and the reason."""
    try:
        import matplotlib  # noqa: PLC0415
        from matplotlib import image as mpl_image  # noqa: PLC0415
    except ImportError:
        return [], "matplotlib is not installed: the photo and terrain kinds are left out"
    folder = Path(matplotlib.get_data_path()) / "sample_data"
    photo_path, dem_path = folder / "grace_hopper.jpg", folder / "jacksboro_fault_dem.npz"
    if not (photo_path.is_file() and dem_path.is_file()):
        return [], f"matplotlib's sample data is not in {folder}: the photo and terrain kinds are left out"
    cases = []
    photo = _image_volume(mpl_image.imread(photo_path).astype(np.float64).mean(axis=2))
    for box in PHOTO_BOXES:
        cases.append(OodCase("photo", f"{photo_path.name} box {box}", photo, np.diag([1.0, 1.0, 3.0, 1.0]),
                             _box_region(photo.shape, box)))
    with np.load(dem_path) as dem_file:
        dem = _image_volume(dem_file["elevation"].astype(np.float64))
    x, y = dem.shape[:2]
    for box in ((0, 0, x // 2, y // 2), (x // 4, y // 4, 3 * x // 4, 3 * y // 4)):
        cases.append(OodCase("terrain", f"{dem_path.name} box {box}", dem, np.diag([30.0, 30.0, 30.0, 1.0]),
                             _box_region(dem.shape, box)))
    return cases, None


def _box_region(shape, box) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    region[x0:x1, y0:y1, :] = True
    return region


def heldout_cases(per_kind: int) -> tuple[list[OodCase], str | None]:
    if not isinstance(per_kind, int) or per_kind < 1:
        raise ValueError(f"per_kind must be a positive integer, got {per_kind!r}")
    cases: list[OodCase] = []
    for index in range(per_kind):
        rng = np.random.default_rng(np.random.SeedSequence([HELDOUT_SEED, index]))
        cases += synthetic_cases(rng, index) + phantom_cases(rng, index)
    images, note = image_cases()
    return cases + images, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx carrying a gate")
    parser.add_argument("--per-kind", type=int, default=6, help="volumes of each synthetic / phantom kind")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    start, backend = time.perf_counter(), open_gated(args.model)
    if backend is None:
        return 2
    cases, note = heldout_cases(args.per_kind)
    by_kind: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="liverstage-ood-heldout-") as tmp:
        for case in cases:
            rows = stage_all(backend, [write_case(case, Path(tmp))])
            by_kind.setdefault(case.kind, []).extend(dict(row, name=case.name) for row in rows)
    print(f"model {args.model}: held-out kinds, never used to choose or measure the gate "
          "(synthetic phantoms and public sample images, not patients)")
    if note:
        print(f"  note: {note}")
    total = caught = 0
    summary = {}
    for kind in COUNTED + APART:
        rows = by_kind.get(kind, [])
        if not rows:
            continue
        s = summarise(rows)
        hit = s["uncertain"] + s["refused"]
        scores = [r["score"] for r in rows if r.get("score") is not None]
        s["lowest_score"] = min(scores) if scores else None
        summary[kind] = s
        low = f"lowest volume score {s['lowest_score']:.2f}" if scores else "all refused"
        apart = kind in APART
        print(f"  {kind:<15} {hit:>3} of {s['volumes']:>3} flagged or refused ({s['refused']} refused; {low})"
              + ("   [reported apart]" if apart else ""))
        if not apart:
            total, caught = total + s["volumes"], caught + hit
    print(f"held-out not-liver volumes flagged or refused: {caught} of {total} ({caught / total:.1%}; target >= 99 %)")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        from liverstage.runtime.atomic import write_json  # noqa: PLC0415

        write_json(args.json, {"model": str(args.model), "seed": HELDOUT_SEED, "note": note, "kinds": summary,
                               "detection": caught / total if total else None,
                               "volumes": {kind: rows for kind, rows in by_kind.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
