"""Far-out-of-distribution volumes for measuring the gate: things that are not liver MRI.

Each case is a whole volume with a liver-sized region, so it goes through the same crop
pipeline (and, in benchmarks/ood_eval.py, through `predict` from a file) as a real study:

  noise         Gaussian noise
  constant      a blank field (exactly constant, or constant with +-1 quantisation noise)
  smooth        low-pass filtered noise (a smooth random field)
  gradient      a linear ramp in a random direction, slightly noisy
  checkerboard  squares of 2-12 voxels, two intensities, noisy
  inverted      a liver phantom with inverted contrast, its own liver mask
  spleen, kidney, below_liver
                phantom crops centred on another organ (`below_liver`: the lower abdomen under
                the liver; the phantoms have no pelvis)
  brain_mri     real brain MRI shipped with nibabel (anatomical.nii, example4d.nii.gz,
                functional.nii, example_nifti2.nii.gz), a box over the head
  other_mri     real non-liver MR / CT images shipped with nibabel and pydicom (a physical
                phantom scanned with EPI, pydicom's MR_small.dcm, CT_small.dcm)

Synthetic kinds and phantoms are drawn from `seed`; the real files are used as they ship (a
kind whose package file is missing is left out, with nothing downloaded). Phantom-based kinds
are synthetic phantoms, not patients.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

KINDS = ("noise", "constant", "smooth", "gradient", "checkerboard", "inverted", "spleen", "kidney",
         "below_liver", "brain_mri", "other_mri")
SHAPE = (96, 96, 20)
SPACING = (4.0, 4.0, 8.0)


@dataclasses.dataclass(frozen=True)
class OodCase:
    """One volume that is not liver MRI: canonical float32 data, its affine and a region (bool)."""

    kind: str
    name: str
    data: np.ndarray
    affine: np.ndarray
    region: np.ndarray


def _affine(spacing=SPACING) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def _liver_box(shape) -> np.ndarray:
    """A liver-sized region where a phantom's liver lies (right upper part of the grid)."""
    region = np.zeros(shape, dtype=bool)
    x, y = shape[0], shape[1]
    region[int(0.5 * x):int(0.85 * x), int(0.3 * y):int(0.7 * y), :] = True
    return region


def _smooth_field(rng: np.random.Generator, shape, scale_vox: float) -> np.ndarray:
    """Gaussian low-pass of white noise (FFT), unit standard deviation."""
    noise = rng.standard_normal(shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    sq = sum(f**2 for f in freqs)
    field = np.real(np.fft.ifftn(np.fft.fftn(noise) * np.exp(-2 * (np.pi * scale_vox) ** 2 * sq)))
    return field / max(float(field.std()), 1e-12)


def _synthetic(kind: str, rng: np.random.Generator) -> np.ndarray:
    shape = SHAPE
    level = rng.uniform(100, 2000)
    if kind == "noise":
        return rng.normal(level, rng.uniform(0.05, 0.5) * level, shape)
    if kind == "constant":
        base = np.full(shape, np.round(level))
        return base if rng.uniform() < 0.5 else base + rng.integers(-1, 2, shape)
    if kind == "smooth":
        return level * (1.0 + 0.3 * _smooth_field(rng, shape, rng.uniform(3, 12)))
    if kind == "gradient":
        direction = rng.standard_normal(3)
        grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
        ramp = sum(d * g for d, g in zip(direction / np.linalg.norm(direction), grid))
        return level * (1.0 + ramp / max(float(np.ptp(ramp)), 1e-9)) + rng.normal(0, 0.01 * level, shape)
    if kind == "checkerboard":
        size = int(rng.integers(2, 13))
        grid = np.meshgrid(*[np.arange(n) // size for n in shape[:2]], indexing="ij")
        board = ((grid[0] + grid[1]) % 2).astype(np.float64)[:, :, None] * np.ones(shape)
        return level * (0.5 + board) + rng.normal(0, 0.05 * level, shape)
    raise ValueError(f"not a synthetic kind: {kind}")


def _phantom_cases(kinds: list[str], count: int, seed: int) -> list[OodCase]:
    from nibabel import orientations  # noqa: PLC0415

    from liverstage.phantoms.synth import synth_patient  # noqa: PLC0415
    from liverstage.runtime.io import volume_from_array  # noqa: PLC0415

    cases = []
    for i in range(count):
        ph = synth_patient(i, seed=seed, in_plane=96, slices=20)
        vol = volume_from_array(ph.data, ph.affine, source=f"phantom {seed}/{i}")
        liver = np.ascontiguousarray(orientations.apply_orientation(ph.mask, vol.ornt)) > 0
        data = vol.data
        for kind in kinds:
            if kind == "inverted":
                cases.append(OodCase(kind, f"inverted phantom {i}", (data.max() - data).astype(np.float32),
                                     vol.affine, liver))
                continue
            names = ("kidney_left", "kidney_right") if kind == "kidney" else (kind,)
            name = names[i % len(names)]
            lo, hi = ph.params["organ_boxes"][name]
            region = np.zeros(data.shape, dtype=bool)
            region[tuple(slice(max(a, 0), max(b, 0)) for a, b in zip(lo, hi))] = True
            if region.any():
                cases.append(OodCase(kind, f"{name} of phantom {i}", data, vol.affine, region))
    return cases


def _head_box(shape) -> np.ndarray:
    region = np.zeros(shape, dtype=bool)
    region[int(0.2 * shape[0]):int(0.8 * shape[0]), int(0.2 * shape[1]):int(0.8 * shape[1]), :] = True
    return region


def _real_cases(kind: str) -> list[OodCase]:
    """The real non-liver images that ship inside installed packages (none downloaded)."""
    import nibabel as nib  # noqa: PLC0415

    out = []
    if kind == "brain_mri":
        try:
            from nibabel.testing import data_path  # noqa: PLC0415
        except ImportError:
            return []
        for name in ("anatomical.nii", "example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz"):
            path = Path(data_path) / name
            if path.is_file():
                img = nib.load(path)
                arr = np.asanyarray(img.dataobj).astype(np.float32)
                arr = arr[..., 0] if arr.ndim == 4 else arr
                out.append(OodCase(kind, name, arr, img.affine, _head_box(arr.shape)))
        return out
    if kind == "other_mri":
        try:
            from nibabel.testing import data_path  # noqa: PLC0415

            par = Path(data_path) / "phantom_EPI_asc_CLEAR_2_1.PAR"
            if par.is_file():
                img = nib.load(par)
                arr = np.asanyarray(img.dataobj).astype(np.float32)[..., 0]
                out.append(OodCase(kind, par.name + " (EPI of a physical phantom)", arr, img.affine, _head_box(arr.shape)))
        except ImportError:
            pass
        for name in ("MR_small.dcm", "CT_small.dcm"):
            case = _dicom_case(kind, name)
            if case is not None:
                out.append(case)
        return out
    raise ValueError(f"not a real-image kind: {kind}")


def _dicom_case(kind: str, name: str) -> OodCase | None:
    """A pydicom test file (only if installed locally: get_testdata_file may try the network)."""
    try:
        import pydicom  # noqa: PLC0415
        import pydicom.data  # noqa: PLC0415
    except ImportError:
        return None
    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.is_file():
        return None
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
    arr = pixels.T[:, :, None]
    affine = np.diag([spacing[1], spacing[0], float(ds.get("SliceThickness", 5.0) or 5.0), 1.0])
    return OodCase(kind, name, arr, affine, _head_box(arr.shape))


def far_ood_cases(*, kinds=KINDS, per_kind: int = 3, seed: int = 777) -> list[OodCase]:
    """`per_kind` cases of every synthetic and phantom kind, and every real file of the real kinds."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown out-of-distribution kind(s) {unknown}; choose from {', '.join(KINDS)}")
    if not isinstance(per_kind, int) or per_kind < 1:
        raise ValueError(f"per_kind must be a positive integer, got {per_kind!r}")
    cases: list[OodCase] = []
    for kind in kinds:
        if kind in ("noise", "constant", "smooth", "gradient", "checkerboard"):
            for i in range(per_kind):
                rng = np.random.default_rng(np.random.SeedSequence([seed, KINDS.index(kind), i]))
                data = _synthetic(kind, rng).astype(np.float32)
                cases.append(OodCase(kind, f"{kind} {i}", data, _affine(), _liver_box(data.shape)))
    phantom_kinds = [k for k in kinds if k in ("inverted", "spleen", "kidney", "below_liver")]
    if phantom_kinds:
        cases += _phantom_cases(phantom_kinds, per_kind, seed)
    for kind in kinds:
        if kind in ("brain_mri", "other_mri"):
            cases += _real_cases(kind)
    return cases
