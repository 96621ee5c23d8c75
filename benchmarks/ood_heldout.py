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

A second set, with its own seed (7000002), was added after the first had been seen (the
first showed that the gate of its day passed one photograph box; the gate's third part, the
early-stage statistics, came after that). Its kinds were written down before the gate was
ever run on them, and its figures are reported apart from the first set's:

  pink_noise      Gaussian noise with a 1/f^2 power spectrum (smooth at every scale)
  zone_plate      concentric rings whose frequency grows with the radius, random centre
  rectangles      40 random filled rectangles on a flat background (a screenshot-like image)
  photo_sklearn   scikit-learn's sample photographs (china.jpg, flower.jpg), three boxes each
  package_photo   matplotlib's Minduka_Present_Blue_Pack.png, two boxes
  brain_slice     matplotlib's s1045.ima.gz: an axial MRI slice of a head, a box over the
                  head and one over the whole image (real MRI, not liver)
  bathymetry      matplotlib's topobathy.npz (elevation and sea depth), two boxes
  mirrored        [reported apart] a phantom and its liver mirrored left-right (the liver on
                  the patient's left: situs inversus, anatomy the training data never had)

A third set, with its own seed (7000003), was written down (and committed) before the gate was
ever run on it, when the early-stage statistics were changed to read every 4th row of a 224-px
crop's stage (gate format 2; that part was dropped in format 3, runtime/ood.py); its figures are
reported apart as well:

  row_grating     a grating that varies along one in-plane axis only (the first or the second,
                  alternately), random period 3-24 voxels: stripes aligned with the rows the
                  statistics skip, the case the row step could miss
  voronoi         40 flat random cells of random intensities (a piecewise-constant map)
  siemens_star    a star of 36 spokes around a random centre (a resolution test pattern)
  blocky_noise    Gaussian noise in 6 x 6-voxel blocks (nearest-neighbour upsampled)
  ct_slice        pydicom's 693_J2KI.dcm and J2K_pixelrep_mismatch.dcm: real CT slices
                  (not MR), a box over the middle and one over the whole image
  ultrasound      pydicom's examples_palette.dcm and examples_rgb_color.dcm (real ultrasound)
  nuclear         pydicom's JPGExtended.dcm (a real nuclear-medicine image)
  colour_test     pydicom's SC_rgb_jpeg_dcmd.dcm (a colour test image, in grey)
  text_image      pydicom's GDCMJ2K_TextGBR.dcm (an image of text)
  segmentation    pydicom's liver_1frame.dcm: a liver segmentation mask (a label image, not MRI)
  upside_down     [reported apart] a phantom and its liver rotated 180 degrees in plane
  blurred         [reported apart] a phantom blurred in plane (Gaussian, sigma 3 voxels): a
                  liver MRI at a resolution the training data never had

The matplotlib and scikit-learn files ship inside those packages (the `train` extra installs
both); without them the image kinds are left out with a line saying so. Phantoms are
synthetic, not patients.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ood_eval import open_gated, parts_line, stage_all, summarise, write_case  # noqa: E402

from liverstage.export.ood_sets import SHAPE, OodCase, _affine, _liver_box  # noqa: E402

HELDOUT_SEED = 7_000_001  # neither the training, export, ood_eval nor sweep seed
SECOND_SEED = 7_000_002  # the second set's
COUNTED = ("uniform_noise", "salt_pepper", "stripes", "blobs", "heavy_noise", "mask_in_air", "whole_fov",
           "photo", "terrain")
APART = ("rot90", "shuffled_liver")
SECOND_COUNTED = ("pink_noise", "zone_plate", "rectangles", "photo_sklearn", "package_photo", "brain_slice",
                  "bathymetry")
SECOND_APART = ("mirrored",)
THIRD_SEED = 7_000_003  # the third set's
THIRD_COUNTED = ("row_grating", "voronoi", "siemens_star", "blocky_noise", "ct_slice", "ultrasound", "nuclear",
                 "colour_test", "text_image", "segmentation")
THIRD_APART = ("upside_down", "blurred")
SETS = {"first": (COUNTED, APART), "second": (SECOND_COUNTED, SECOND_APART), "third": (THIRD_COUNTED, THIRD_APART)}
SEEDS = {"first": HELDOUT_SEED, "second": SECOND_SEED, "third": THIRD_SEED}
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


def second_synthetic_cases(rng: np.random.Generator, index: int) -> list[OodCase]:
    """One volume of each synthetic kind of the second set, liver-sized box as region."""
    level = rng.uniform(100, 2000)
    fx = np.fft.fftfreq(SHAPE[0])[:, None, None]
    fy = np.fft.fftfreq(SHAPE[1])[None, :, None]
    fz = np.fft.fftfreq(SHAPE[2])[None, None, :]
    radius = np.sqrt(fx * fx + fy * fy + fz * fz)
    radius[0, 0, 0] = 1.0
    spectrum = np.fft.fftn(rng.standard_normal(SHAPE)) / radius  # amplitude 1/f: power 1/f^2
    spectrum[0, 0, 0] = 0.0
    pink = np.real(np.fft.ifftn(spectrum))
    pink = level * (1.0 + 0.3 * pink / pink.std())
    grid = np.indices(SHAPE).astype(np.float64)
    cx, cy = rng.uniform(0.3, 0.7, 2) * np.array(SHAPE[:2])
    r2 = (grid[0] - cx) ** 2 + (grid[1] - cy) ** 2
    zone = level * (1.0 + 0.5 * np.cos(np.pi * r2 / rng.uniform(40.0, 120.0)))
    rects = np.full(SHAPE, rng.uniform(0.2, 1.0) * level)
    for _ in range(40):
        x0, y0 = rng.integers(0, SHAPE[0] - 4), rng.integers(0, SHAPE[1] - 4)
        w, h = rng.integers(3, 30, 2)
        rects[x0:x0 + w, y0:y0 + h, :] = rng.uniform(0.0, 2.0) * level
    volumes = {"pink_noise": pink, "zone_plate": zone, "rectangles": rects}
    return [OodCase(kind, f"{kind} {index}", data.astype(np.float32), _affine(), _liver_box(SHAPE))
            for kind, data in volumes.items()]


def mirrored_case(index: int) -> OodCase:
    """A phantom of the second seed and its liver mirrored left-right (canonical x flipped)."""
    from nibabel import orientations  # noqa: PLC0415

    from liverstage.phantoms.synth import synth_patient  # noqa: PLC0415
    from liverstage.runtime.io import volume_from_array  # noqa: PLC0415

    ph = synth_patient(index, seed=SECOND_SEED, in_plane=96, slices=20)
    vol = volume_from_array(ph.data, ph.affine, source=f"phantom {SECOND_SEED}/{index}")
    liver = np.ascontiguousarray(orientations.apply_orientation(ph.mask, vol.ornt)) > 0
    data = np.ascontiguousarray(vol.data[::-1]).astype(np.float32)
    return OodCase("mirrored", f"phantom {index}", data, vol.affine, np.ascontiguousarray(liver[::-1]))


def second_image_cases() -> tuple[list[OodCase], str | None]:
    """The second set's pictures from files inside matplotlib and scikit-learn, or the reason they are left out."""
    try:
        import matplotlib  # noqa: PLC0415
        import sklearn  # noqa: PLC0415
        from matplotlib import image as mpl_image  # noqa: PLC0415
    except ImportError:
        return [], "matplotlib or scikit-learn is not installed: the second set's image kinds are left out"
    mpl_folder = Path(matplotlib.get_data_path()) / "sample_data"
    sk_folder = Path(sklearn.__file__).parent / "datasets" / "images"
    paths = {"china": sk_folder / "china.jpg", "flower": sk_folder / "flower.jpg",
             "package": mpl_folder / "Minduka_Present_Blue_Pack.png", "brain": mpl_folder / "s1045.ima.gz",
             "bathymetry": mpl_folder / "topobathy.npz"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        return [], f"sample files missing ({', '.join(missing)}): the second set's image kinds are left out"
    import gzip  # noqa: PLC0415

    cases = []
    for name in ("china", "flower"):
        picture = _image_volume(mpl_image.imread(paths[name]).astype(np.float64)[..., :3].mean(axis=2))
        x, y = picture.shape[:2]
        for box in ((0, 0, x // 2, y // 2), (x // 4, y // 4, 3 * x // 4, 3 * y // 4), (x // 2, y // 3, x, y)):
            cases.append(OodCase("photo_sklearn", f"{paths[name].name} box {box}", picture,
                                 np.diag([0.5, 0.5, 3.0, 1.0]), _box_region(picture.shape, box)))
    package = _image_volume(mpl_image.imread(paths["package"]).astype(np.float64)[..., :3].mean(axis=2))
    x, y = package.shape[:2]
    for box in ((x // 4, y // 4, 3 * x // 4, 3 * y // 4), (0, y // 2, x // 2, y)):
        cases.append(OodCase("package_photo", f"{paths['package'].name} box {box}", package,
                             np.diag([0.5, 0.5, 3.0, 1.0]), _box_region(package.shape, box)))
    with gzip.open(paths["brain"], "rb") as handle:
        # big-endian 16-bit: read little-endian, neighbouring pixels differ by 950 on average
        # (byte-swapped noise); big-endian, by 3.7 (an image)
        brain = _image_volume(np.frombuffer(handle.read(), ">u2").reshape(256, 256).astype(np.float64))
    for box in ((40, 40, 216, 216), (0, 0, 256, 256)):
        cases.append(OodCase("brain_slice", f"{paths['brain'].name} box {box}", brain,
                             np.diag([1.0, 1.0, 5.0, 1.0]), _box_region(brain.shape, box)))
    with np.load(paths["bathymetry"]) as bathy_file:
        bathy = _image_volume(bathy_file["topo"].astype(np.float64))
    x, y = bathy.shape[:2]
    for box in ((0, 0, x // 2, y // 2), (x // 4, y // 4, 3 * x // 4, 3 * y // 4)):
        cases.append(OodCase("bathymetry", f"{paths['bathymetry'].name} box {box}", bathy,
                             np.diag([30.0, 30.0, 30.0, 1.0]), _box_region(bathy.shape, box)))
    return cases, None


def third_synthetic_cases(rng: np.random.Generator, index: int) -> list[OodCase]:
    """One volume of each synthetic kind of the third set, liver-sized box as region."""
    level = rng.uniform(100, 2000)
    grid = np.indices(SHAPE).astype(np.float64)
    axis, period = index % 2, rng.uniform(3.0, 24.0)
    grating = level * (1.0 + 0.5 * np.sin(2 * np.pi * grid[axis] / period + rng.uniform(0, 2 * np.pi)))
    seeds = rng.uniform(0, 1, (40, 2)) * np.array(SHAPE[:2])
    plane = (grid[0][..., 0, None] - seeds[:, 0]) ** 2 + (grid[1][..., 0, None] - seeds[:, 1]) ** 2
    cells = rng.uniform(0.1, 2.0, 40)[np.argmin(plane, axis=-1)]
    voronoi = level * np.repeat(cells[:, :, None], SHAPE[2], axis=2)
    cx, cy = rng.uniform(0.3, 0.7, 2) * np.array(SHAPE[:2])
    star = level * (1.0 + 0.5 * np.sign(np.sin(18.0 * np.arctan2(grid[1] - cy, grid[0] - cx))))
    coarse = rng.standard_normal((-(-SHAPE[0] // 6), -(-SHAPE[1] // 6), SHAPE[2]))
    blocky = level * (1.0 + 0.3 * np.repeat(np.repeat(coarse, 6, axis=0), 6, axis=1)[: SHAPE[0], : SHAPE[1]])
    volumes = {"row_grating": grating, "voronoi": voronoi, "siemens_star": star, "blocky_noise": blocky}
    return [OodCase(kind, f"{kind} {index}", data.astype(np.float32), _affine(), _liver_box(SHAPE))
            for kind, data in volumes.items()]


def third_phantom_cases(index: int) -> list[OodCase]:
    """The third set's phantom kinds (reported apart), from one phantom of its seed."""
    from nibabel import orientations  # noqa: PLC0415
    from scipy import ndimage  # noqa: PLC0415

    from liverstage.phantoms.synth import synth_patient  # noqa: PLC0415
    from liverstage.runtime.io import volume_from_array  # noqa: PLC0415

    ph = synth_patient(index, seed=THIRD_SEED, in_plane=96, slices=20)
    vol = volume_from_array(ph.data, ph.affine, source=f"phantom {THIRD_SEED}/{index}")
    liver = np.ascontiguousarray(orientations.apply_orientation(ph.mask, vol.ornt)) > 0
    data = vol.data.astype(np.float64)
    name = f"phantom {index}"
    return [
        OodCase("upside_down", name, np.ascontiguousarray(np.rot90(data, 2, axes=(0, 1))).astype(np.float32),
                vol.affine, np.ascontiguousarray(np.rot90(liver, 2, axes=(0, 1)))),
        OodCase("blurred", name, ndimage.gaussian_filter(data, sigma=(3.0, 3.0, 0.0)).astype(np.float32), vol.affine,
                liver),
    ]


THIRD_FILES = {"ct_slice": ("693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"),
               "ultrasound": ("examples_palette.dcm", "examples_rgb_color.dcm"), "nuclear": ("JPGExtended.dcm",),
               "colour_test": ("SC_rgb_jpeg_dcmd.dcm",), "text_image": ("GDCMJ2K_TextGBR.dcm",),
               "segmentation": ("liver_1frame.dcm",)}


def third_image_cases() -> tuple[list[OodCase], str | None]:
    """The third set's pictures from pydicom's test files (colour in grey), a box over the middle
    and one over the whole image; files that cannot be decoded here are left out, with the reason."""
    import warnings  # noqa: PLC0415

    import pydicom  # noqa: PLC0415
    import pydicom.data  # noqa: PLC0415

    folder = Path(pydicom.data.__file__).parent / "test_files"
    cases, left_out = [], []
    for kind, names in THIRD_FILES.items():
        for name in names:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pixels = pydicom.dcmread(folder / name).pixel_array.astype(np.float64)
            except Exception as exc:  # noqa: BLE001  (a missing file or decoder)
                left_out.append(f"{name} ({type(exc).__name__})")
                continue
            picture = _image_volume(pixels[..., :3].mean(axis=-1) if pixels.ndim == 3 else pixels)
            x, y = picture.shape[:2]
            for box in ((x // 4, y // 4, 3 * x // 4, 3 * y // 4), (0, 0, x, y)):
                cases.append(OodCase(kind, f"{name} box {box}", picture, np.diag([0.7, 0.7, 3.0, 1.0]),
                                     _box_region(picture.shape, box)))
    return cases, (f"left out (cannot be read here): {', '.join(left_out)}" if left_out else None)


def third_set_cases(per_kind: int) -> tuple[list[OodCase], str | None]:
    """The third held-out set (module docstring)."""
    return _set_cases(THIRD_SEED, per_kind,
                      lambda rng, index: third_synthetic_cases(rng, index) + third_phantom_cases(index),
                      third_image_cases)


def _set_cases(seed: int, per_kind: int, volumes, pictures) -> tuple[list[OodCase], str | None]:
    """`volumes(rng, index)` for each index (one generator per (seed, index)), then `pictures()`:
    the cases and the reason any pictures are left out."""
    if not isinstance(per_kind, int) or per_kind < 1:
        raise ValueError(f"per_kind must be a positive integer, got {per_kind!r}")
    cases: list[OodCase] = []
    for index in range(per_kind):
        cases += volumes(np.random.default_rng(np.random.SeedSequence([seed, index])), index)
    images, note = pictures()
    return cases + images, note


def second_set_cases(per_kind: int) -> tuple[list[OodCase], str | None]:
    """The second held-out set (module docstring)."""
    return _set_cases(SECOND_SEED, per_kind,
                      lambda rng, index: second_synthetic_cases(rng, index) + [mirrored_case(index)], second_image_cases)


def _box_region(shape, box) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    region[x0:x1, y0:y1, :] = True
    return region


def heldout_cases(per_kind: int) -> tuple[list[OodCase], str | None]:
    """The first held-out set (module docstring)."""
    return _set_cases(HELDOUT_SEED, per_kind,
                      lambda rng, index: synthetic_cases(rng, index) + phantom_cases(rng, index), image_cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx carrying a gate")
    parser.add_argument("--per-kind", type=int, default=6, help="volumes of each synthetic / phantom kind")
    parser.add_argument("--openvino", choices=("fp32", "bf16", "int8"), default=None,
                        help="stage with OpenVINO at this precision (default: ONNX Runtime)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    start, backend = time.perf_counter(), open_gated(args.model, args.openvino)
    if backend is None:
        return 2
    sets = {"first": heldout_cases(args.per_kind), "second": second_set_cases(args.per_kind),
            "third": third_set_cases(args.per_kind)}
    by_kind: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="liverstage-ood-heldout-") as tmp:
        for case in (case for cases, _note in sets.values() for case in cases):
            rows = stage_all(backend, [write_case(case, Path(tmp))])
            by_kind.setdefault(case.kind, []).extend(dict(row, name=case.name) for row in rows)
    print(f"model {args.model}: held-out kinds, never used to choose or measure the gate "
          "(synthetic phantoms and public sample images, not patients)")
    summary, totals = {}, {}
    for set_name, (_cases, note) in sets.items():
        counted, apart = SETS[set_name]
        print(f" {set_name} set (seed {SEEDS[set_name]}):")
        if note:
            print(f"  note: {note}")
        total = caught = 0
        for kind in counted + apart:
            rows = by_kind.get(kind, [])
            if not rows:
                continue
            s = summarise(rows)
            hit = s["uncertain"] + s["refused"]
            scores = [r["score"] for r in rows if r.get("score") is not None]
            s["lowest_score"] = min(scores) if scores else None
            summary[kind] = s
            low = f"lowest volume score {s['lowest_score']:.2f}" if scores else "all refused"
            side = f"; {s['left_side']} by the region's side" if s["left_side"] else ""
            print(f"  {kind:<15} {hit:>3} of {s['volumes']:>3} flagged or refused ({s['refused']} refused{side}; {low})"
                  + ("   [reported apart]" if kind in apart else ""))
            if kind not in apart:
                total, caught = total + s["volumes"], caught + hit
        totals[set_name] = {"volumes": total, "caught": caught, "detection": caught / total if total else None}
        print(f"  {set_name} set's not-liver volumes flagged or refused: {caught} of {total} "
              f"({caught / total:.1%}; target >= 99 %)")
        print(f"  {parts_line([summary[k] for k in counted if k in summary])}")
    total = sum(t["volumes"] for t in totals.values())
    caught = sum(t["caught"] for t in totals.values())
    print(f"held-out not-liver volumes flagged or refused, all sets: {caught} of {total} ({caught / total:.1%}; "
          "target >= 99 %)")
    print(f"  {parts_line([summary[k] for cases in SETS.values() for k in cases[0] if k in summary])}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json is not None:
        from liverstage.runtime.atomic import write_json  # noqa: PLC0415

        write_json(args.json, {"model": str(args.model), "seeds": list(SEEDS.values()),
                               "notes": [note for _cases, note in sets.values() if note], "kinds": summary, "sets": totals,
                               "detection": caught / total if total else None,
                               "volumes": {kind: rows for kind, rows in by_kind.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
