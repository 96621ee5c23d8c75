"""One DICOM series -> Volume (pydicom + highdicom; the optional `dicom` extra).

highdicom builds the volume (`get_volume_from_series` for classic single-frame instances,
`Image.get_volume` for one enhanced or legacy converted enhanced multi-frame instance): it sorts
the planes, stacks them and applies the rescale (modality) transform. Before that,
`dicom_geometry.series_geometry` checks the headers and names the instance at fault (missing or
non-finite geometry, mixed orientations, duplicate positions, gaps), and every instance's pixel
data is checked (truncated, undecodable, no decoder installed) so a refusal names its file.

The result is laid out as nibabel lays out DICOM: voxel (i = column, j = row, k = slice), slices
in increasing position along the normal n = r x c, with DICOM's LPS affine turned into RAS; that
array and affine go through `io.volume_from_array`, the one reorientation path, so a series and
the same data stored as NIfTI give the same crops bit for bit. A `--bbox` for a series is given
in this (column, row, slice) grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .dicom_geometry import ORIENTATION_TOL, GAP_RTOL, PERPENDICULAR_TOL, label_of, normal_of, series_geometry
from .errors import InputError

# Transfer syntaxes whose coding may be lossy (PS3.5 Table A-1); LossyImageCompression "01"
# marks lossy data whatever the transfer syntax.
LOSSY_TRANSFER_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51",   # JPEG Extended
    "1.2.840.10008.1.2.4.81",   # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000 (lossy or lossless)
    "1.2.840.10008.1.2.4.93",   # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy or lossless)
    "1.2.840.10008.1.2.4.112",  # JPEG XL
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG recompression
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1", "1.2.840.10008.1.2.4.101",
    "1.2.840.10008.1.2.4.101.1", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1", "1.2.840.10008.1.2.4.104",
    "1.2.840.10008.1.2.4.104.1", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1", "1.2.840.10008.1.2.4.107",
    "1.2.840.10008.1.2.4.108",  # MPEG-2 / MPEG-4 / HEVC video
})
# JPEG, JPEG-LS, JPEG 2000 and HTJ2K codestreams all end with the marker FF D9 (EOI / EOC); their
# decoders return an image from a codestream cut short without complaint, so this is checked here.
_ENDS_WITH_EOI = ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.6", "1.2.840.10008.1.2.4.7",
                  "1.2.840.10008.1.2.4.8", "1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# What the volume holds: stored values through the rescale slope/intercept only (what dcm2niix
# writes), no windowing, no presentation or colour transforms.
_PIXEL_TRANSFORMS = dict(apply_real_world_transform=False, apply_voi_transform=False,
                         apply_presentation_lut=False, apply_palette_color_lut=False, apply_icc_profile=False)


def import_pydicom():
    try:
        import pydicom  # noqa: PLC0415
    except ImportError:
        raise InputError("reading DICOM needs pydicom: pip install 'liverstage[dicom]'") from None
    return pydicom


def quiet_pydicom_warnings() -> None:
    """Keep pydicom's warnings about odd values off stderr (for the CLI, at start-up, one thread).

    pydicom warns about every value that breaks the standard (a 'nan' position, a 66-character
    UID) and about files that end early; the CLI promises one line on stderr, and the checks
    here turn what matters for staging into that line or a report warning.
    """
    import warnings  # noqa: PLC0415

    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _import_highdicom():
    try:
        import highdicom  # noqa: PLC0415
    except ImportError:
        raise InputError("reading DICOM needs highdicom: pip install 'liverstage[dicom]'") from None
    return highdicom


def transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(uid) if uid else "1.2.840.10008.1.2"  # no file meta: implicit VR little endian


def lossy_reason(headers: Sequence) -> str | None:
    """Why the pixel values of these instances may differ from the acquired image; None if lossless."""
    pydicom = import_pydicom()
    for ds in headers:
        if str(ds.get("LossyImageCompression", "")).strip() == "01":
            return "LossyImageCompression is 01 (lossy compressed)"
    for ds in headers:
        uid = transfer_syntax(ds)
        if uid in LOSSY_TRANSFER_SYNTAXES:
            return f"transfer syntax {pydicom.uid.UID(uid).name} may be lossy"
    return None


def _read(path: Path):
    pydicom = import_pydicom()
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001  (pydicom raises many kinds on a broken file)
        raise InputError(f"cannot read DICOM file {path} ({_why(exc)})") from None
    if "PixelData" not in ds:  # pydicom returns an empty dataset when the file ends inside its pixel data
        raise InputError(f"{path} has no pixel data (truncated file?)")
    ds.filename = str(path)
    return ds


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:240]


def _series_files(source) -> list[Path]:
    """A folder (every DICOM file directly inside it) or a sequence of files."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"not a folder: {folder}")
        from .dicom_study import dicom_headers  # noqa: PLC0415

        files = [Path(ds.filename) for ds in dicom_headers(folder, recursive=False) if "Rows" in ds]
        if not files:
            raise InputError(f"{folder}: no DICOM images found")
        return files
    files = [Path(p) for p in source]
    if not files:
        raise InputError("no DICOM files given")
    return files


def _check_pixels(ds) -> None:
    """Truncated or undecodable pixel data -> InputError naming the file (pixel_array stays cached)."""
    pydicom = import_pydicom()
    name = ds.filename
    uid = pydicom.uid.UID(transfer_syntax(ds))
    if not uid.is_transfer_syntax:
        raise InputError(f"{name}: transfer syntax {str(uid)[:70]!r} is not a DICOM transfer syntax (damaged file?)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for key in ("RescaleSlope", "RescaleIntercept"):
        try:
            value = float(ds.get(key, 0) or 0)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value):
            raise InputError(f"{name}: {key} {ds.get(key)!r} is not a finite number")
    if not uid.is_encapsulated:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        expected = (int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1) or 1) * bits + 7) // 8
        have = len(ds.PixelData)
        if have < expected:
            raise InputError(f"{name}: truncated pixel data ({have} of {expected} bytes)")
    else:
        decoder = pydicom.pixels.get_decoder(uid)
        if decoder is None or not decoder.is_available:
            raise InputError(f"{name}: no decoder for {uid.name} is installed: pip install 'liverstage[dicom]'")
        if str(uid).startswith(_ENDS_WITH_EOI):
            _check_codestream_ends(ds, uid, frames)
    try:
        ds.pixel_array  # noqa: B018  (decodes once; pydicom caches the array for highdicom)
    except Exception as exc:  # noqa: BLE001  (a corrupt stream fails in the codec, with its own types)
        raise InputError(f"{name}: cannot decode the pixel data ({uid.name}; {_why(exc)})") from None


def _check_codestream_ends(ds, uid, frames: int) -> None:
    pydicom = import_pydicom()
    try:
        codestreams = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception as exc:  # noqa: BLE001  (broken item tags or offsets)
        raise InputError(f"{ds.filename}: cannot split the {uid.name} pixel data into frames ({_why(exc)})") from None
    if len(codestreams) != frames:
        raise InputError(f"{ds.filename}: {len(codestreams)} compressed frames in the pixel data, NumberOfFrames is {frames}")
    for k, codestream in enumerate(codestreams):
        if b"\xff\xd9" not in codestream[-4:]:  # encoders pad to even length with 00 or FF
            raise InputError(f"{ds.filename}: frame {k + 1} of the {uid.name} pixel data is cut short "
                             "(no end-of-image marker)")


def _to_nibabel_grid(volume, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """highdicom's [slice, row, column] + LPS affine -> [column, row, slice] (along +normal) + RAS affine.

    Fortran-ordered, as the canonical array (io._canonical): the transpose of highdicom's
    C-ordered array already is, so an axial series is not copied."""
    data = np.asarray(volume.array).transpose(2, 1, 0)
    lps = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    if float(lps[:3, 2] @ normal) < 0:
        data = data[:, :, ::-1]
        lps[:3, 3] += lps[:3, 2] * (data.shape[2] - 1)
        lps[:3, 2] *= -1
    return np.asfortranarray(data), _LPS_TO_RAS @ lps


def _highdicom_volume(highdicom, datasets, multi):
    """highdicom's volume of one enhanced instance or of a classic series; InputError when it cannot build one."""
    try:
        if multi:
            image = highdicom.Image.from_dataset(datasets[0], copy=False)
            return image.get_volume(dtype=np.float32, rtol=GAP_RTOL, perpendicular_tol=PERPENDICULAR_TOL,
                                    **_PIXEL_TRANSFORMS)
        return highdicom.get_volume_from_series(
            datasets, dtype=np.float32, rtol=GAP_RTOL, perpendicular_tol=PERPENDICULAR_TOL,
            orientation_tol=ORIENTATION_TOL, **_PIXEL_TRANSFORMS)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (highdicom raises ValueError/RuntimeError/AttributeError)
        raise InputError(f"{_where(datasets)}: cannot build a volume from the series ({_why(exc)})") from None


def read_dicom_series(source) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one series: (data float32 [columns, rows, slices], RAS affine 4x4, warnings).

    `source` is a folder holding exactly one series (not recursive) or the series' files.
    """
    datasets = [_read(p) for p in _series_files(source)]
    uids = sorted({str(ds.get("SeriesInstanceUID", "?")) for ds in datasets})
    if len(uids) > 1:
        counts = "; ".join(f"{u} ({sum(str(d.get('SeriesInstanceUID', '?')) == u for d in datasets)} files)" for u in uids)
        raise InputError(f"{_where(datasets)} holds {len(uids)} DICOM series, expected one: {counts}")
    multi = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1
             or "PerFrameFunctionalGroupsSequence" in ds]
    if multi and len(datasets) > 1:
        raise InputError(f"{_where(datasets)}: a series of {len(datasets)} instances with multi-frame ones among "
                         f"them ({label_of(multi[0], 0)}); one enhanced instance per series is supported")
    try:
        geometry = series_geometry(datasets)
    except InputError as exc:
        raise InputError(f"{_where(datasets)}: {exc}") from None
    for ds in datasets:
        _check_pixels(ds)

    highdicom = _import_highdicom()
    # An extreme rescale overflows float32 quietly here; the non-finite voxels it makes are refused
    # where they matter (inside the liver region), with one clear line instead of numpy's warning.
    with np.errstate(over="ignore", invalid="ignore"):
        volume = _highdicom_volume(highdicom, datasets, multi)
    if volume.number_of_channel_dimensions:
        raise InputError(f"{_where(datasets)}: colour images; a greyscale MR series is needed")
    data, affine = _to_nibabel_grid(volume, normal_of(geometry.frames[0].orientation))
    warnings: list[str] = []
    if data.shape[2] == 1:
        warnings.append("single-slice DICOM series")
    lossy = lossy_reason(datasets)
    if lossy:
        warnings.append(f"lossy compression: {lossy}; pixel values differ from the acquired image")
    return data, affine, warnings


def _where(datasets: Sequence) -> str:
    folders = sorted({str(Path(ds.filename).parent) for ds in datasets})
    return folders[0] if len(folders) == 1 else f"{folders[0]} (and {len(folders) - 1} more folders)"


def load_dicom_series(source, *, name: str | None = None):
    """Load one series (a folder or its files) as a canonical (RAS+) `Volume`.

    `name` is how the volume is named in messages (default: "DICOM series <folder>").
    """
    from .io import volume_from_array  # noqa: PLC0415

    files = _series_files(source)
    data, affine, warnings = read_dicom_series(files)
    label = name or f"DICOM series {source if isinstance(source, (str, Path)) else files[0].parent}"
    return volume_from_array(data, affine, source=label, warnings=warnings)
