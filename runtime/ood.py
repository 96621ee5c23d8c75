"""The out-of-distribution gate: do a volume's crops look like the crops the model was trained on?

A classifier answers for any input: noise, a brain or a kidney get a stage, and with s = 30 and
three classes a confident one. The gate decides whether that answer may be read as a stage;
when it says no, the volume is `uncertain` (its stage and probabilities are still reported,
unchanged).

Two k-nearest-neighbour detectors, each against a bank drawn from training crops at export
(Sun, Ming, Zhu, Li: "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022:
no class structure and no distribution assumed, so it works for every loss, the softmax
baseline too, and it costs one small matrix product per batch):

- embedding: the Euclidean distance, on the unit sphere, from the crop's L2-normalised
  embedding (the model's `embedding` output) to its k-th nearest bank embedding. Why not the
  best cosine to a stage weight: the embedding is the pooled post-ReLU feature, every component
  >= 0, so every crop, liver or not, sits in the same orthant 80-120 degrees from its stage
  weight and that cosine separates nothing. The bank is stored as its coordinates in its own
  top principal directions (`basis`, at most BASIS_DIM of them; on the demo model 64 hold
  99.9 % of the bank's energy): a crop's cosine to a bank entry is then its projection's dot
  product with the entry's coordinates, exact up to the entry's tiny residual, and a crop
  outside the bank's subspace gets a shorter projection, i.e. a larger distance. This keeps
  the gate's matrix products about ten times smaller than the full-dimensional ones (they run
  in one BLAS thread: see `matmul`). A trained network's last features collapse: inputs unlike
  its training data are mapped onto the clusters of the training classes (on the demo model
  noise, blank fields, checkerboards and a brain MRI land at cosine 0.99 from some training
  crop), so this part alone catches few of them (28 of the 120 volumes of
  benchmarks/ood_heldout.py); it catches what looks right but is not (crops the image part
  passes whose features are off).
- image: the standardised distance from a cheap descriptor of the crop image itself (8 x 8
  block means: the layout; a 16-bin intensity histogram; neighbour differences at three scales
  relative to the crop's spread: the texture; see `image_descriptor`) to its k-th nearest bank
  descriptor: what the crop looks like before any learned filter (a whole abdomen, a terrain
  map, a field with the wrong histogram), independent of what the network learned to ignore.

Why no third part from the backbone's early stage: gate format 2 also scored each channel's
mean and deviation over the early stage (resnet `layer1`; early features do not collapse yet,
the reason Lee et al., NeurIPS 2018, score intermediate layers). Measured with
benchmarks/ood_eval.py and ood_heldout.py (2026-12-07, demo models at 64 and 224 px): without
it the gate flagged the same 97 of 97 far-out-of-distribution volumes, 119 of the 120
held-out ones (one photograph box fewer at 64 px, which the 224-px model's gate missed with it
too) and 0 of 100 fresh phantoms where it flagged 2 (both by that part alone). Reading the
stage inside the graph was most of the gate's cost on the int8 and bf16 backends (7-11 % of the
model's time at batch 16 on a CPU with AMX), above the 5 % the gate may cost (issue 11). Since
then the 64-px crops are described at 32 px (`descriptor_factor`), and that gate flags the
photograph box too: 120 of 120.

Each part has its own crop threshold, fitted at export at half of the stated false-alarm
rate (so the two together stay within it) on in-distribution crops the bank does not hold:
held-out patients' crops and the bank's own, each against the bank without its patient
(export/ood_fit.py). A crop's score
is the larger of its two distances, each divided by its threshold: above 1 the crop is
atypical. The
volume's score is the median of its crops' scores; above 1 (more than half of its crops
atypical) the volume is uncertain. One odd slice (the liver dome, a vessel) does not flag a
whole volume; a volume that is mostly not liver is flagged however confident the stage head is.
The reason names the likely cause: input unlike the training data or, where the volume's liver
region came from a box or `--roi auto` and the bank's crops from masks (`fit.bank_regions`,
recorded at export), crops cut and normalised differently, which alone makes most of them
atypical (`OodGate.judge`).

Everything the gate needs travels in the model's metadata (`ModelMetadata.ood`), so every
backend gets it from `backend.metadata` without extra code. A model without it has no result
that reads as certain: each is uncertain with NO_GATE_REASON.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
from typing import Any

import numpy as np

from .errors import ModelError

try:  # built at install from _gate_kernels.c (setup.py); where it could not be, the numpy code runs
    from . import _gate_kernels as _built_kernels
except ImportError:  # pragma: no cover - depends on the install
    _built_kernels = None
_gate_kernels = _built_kernels  # the kernels in use (None: the numpy code); see use_gate_kernels

GATE_METHOD = "knn-embedding+knn-image"
GATE_FORMAT_VERSION = 3
PARTS = ("embedding", "image")
SPHERE_PARTS = {"embedding": "embedding"}  # part -> the model output it reads
NO_GATE_REASON = "the model carries no out-of-distribution gate; re-export it with this liverstage"
NORM_EPS = 1e-12
BASIS_DIM = 64
LAYOUT_BLOCKS = 8
HISTOGRAM_BINS = 16
TEXTURE_SCALES = (1, 2, 4)
DESCRIPTOR_MIN_SIZE = 32  # px: see descriptor_factor
DESCRIPTOR_FAMILIES = {"layout": LAYOUT_BLOCKS**2, "histogram": HISTOGRAM_BINS, "texture": len(TEXTURE_SCALES) + 1}
DESCRIPTOR_DIM = sum(DESCRIPTOR_FAMILIES.values())


def gate_kernels() -> str:
    """Which code computes the gate's per-batch work: "compiled" (runtime/_gate_kernels.c, built
    at install) or "numpy" (this module's reference code, where no C compiler was found). Both
    give the same verdicts and the same scores up to float32 rounding (tests/test_ood.py); only
    the time differs (measured with gate format 2's three parts at batch 16: 0.65-0.71 -> 0.33-0.37
    ms at 64 px, 0.92-1.07 -> 0.63-0.66 ms at 224 px; README: the gate's cost)."""
    return "compiled" if _gate_kernels is not None else "numpy"


def use_gate_kernels(kind: str) -> None:
    """Compute the gate with "compiled" kernels or the "numpy" reference code from now on (process-
    wide), for benchmarks and tests that compare the two in one process."""
    global _gate_kernels
    if kind not in ("compiled", "numpy"):
        raise ValueError(f"kind must be 'compiled' or 'numpy', got {kind!r}")
    if kind == "compiled" and _built_kernels is None:
        raise ValueError("the gate's compiled kernels were not built at install (no C compiler?)")
    _gate_kernels = _built_kernels if kind == "compiled" else None


def encode_array(values: np.ndarray) -> dict[str, Any]:
    """A float array as JSON: float16, little-endian, base64 (the banks' storage format)."""
    data = np.ascontiguousarray(values, dtype="<f2")
    return {"dtype": "float16", "shape": [int(n) for n in data.shape],
            "base64": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(entry: dict[str, Any]) -> np.ndarray:
    """The array of `encode_array` as float32 (ValueError if malformed or non-finite)."""
    if entry.get("dtype") != "float16":
        raise ValueError(f"array dtype {entry.get('dtype')!r} is not float16")
    shape = tuple(int(n) for n in entry["shape"])
    raw = base64.b64decode(entry["base64"], validate=True)
    if len(shape) != 2 or min(shape) < 1 or len(raw) != 2 * shape[0] * shape[1]:
        raise ValueError(f"array of shape {list(shape)} does not match its {len(raw)} bytes")
    values = np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    if not np.isfinite(values).all():
        raise ValueError("array holds non-finite values")
    return values


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x / np.maximum(norm, NORM_EPS)[:, None]


@functools.lru_cache(maxsize=16)
def layout_matrix(size: int, blocks: int = LAYOUT_BLOCKS) -> np.ndarray:
    """P [blocks, size] such that P @ X @ P.T holds the means of `blocks` x `blocks` (nearly)
    equal blocks of a [size, size] image X; its pixels are repeated first when size < blocks.

    Why a matrix: block means are separable, and two small matrix products for the whole batch
    take 4 us where numpy's reduceat over uneven blocks (a 224-px crop's 14-px level) took 40."""
    positions = np.arange(size)
    if size < blocks:
        positions = np.repeat(positions, -(-blocks // size))
    length = len(positions)
    if length % blocks == 0:
        starts = np.arange(0, length, length // blocks)
    else:
        starts = np.linspace(0, length, blocks + 1).round().astype(np.int64)[:-1]
    stops = np.append(starts[1:], length)
    matrix = np.zeros((blocks, size), dtype=np.float64)
    for row, (start, stop) in enumerate(zip(starts, stops)):
        np.add.at(matrix[row], positions[start:stop], 1.0 / (stop - start))
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _block_means(x: np.ndarray, blocks: int) -> np.ndarray:
    """[N, S, S] -> [N, blocks, blocks] means over (nearly) equal blocks (see `layout_matrix`)."""
    rows = layout_matrix(x.shape[1], blocks)
    return rows @ x @ rows.T


def _pool2(x: np.ndarray) -> np.ndarray:
    """2 x 2 mean pooling of [N, H, W] (an odd last row / column is dropped). Pairs of whole rows
    are added first (contiguous memory), then pairs of columns: 2.4x faster than four strided
    slices at 224 px."""
    x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    rows = x[:, 0::2, :] + x[:, 1::2, :]
    out = rows[:, :, 0::2] + rows[:, :, 1::2]
    out *= 0.25
    return out


def descriptor_factor(size: int) -> int:
    """The block size the descriptor averages a crop of `size` px by: the largest power of two
    that leaves at least DESCRIPTOR_MIN_SIZE px, so a crop is described at 32-63 px (1 under
    64 px; 2 for the demo's 64-px crops, described at 32 px; 4 for a 224-px crop, at 56 px).
    Why: the descriptor's cost must stay a few per cent of the model's at every crop size, and a
    32-px image still shows layout, histogram and texture at three scales (32, 16 and 8 px).
    Measured when the minimum went from 56 to 32 px (2026-12-07, 64-px demo models, gate format
    3, same thresholds' rate): the descriptor of 16 crops 61 -> 25 us compiled, and the same
    detection or better (fresh phantoms 0 of 100 flagged, far-OOD 97 of 97, held-out 120 of 120
    where 56 px passed one photograph box; benchmarks/ood_eval.py, ood_heldout.py)."""
    factor = 1
    while size // (2 * factor) >= DESCRIPTOR_MIN_SIZE:
        factor *= 2
    return factor


def _block_mean(x: np.ndarray, factor: int) -> np.ndarray:
    """factor x factor block means of [N, H, W] (a remainder of rows / columns is dropped): whole
    rows are summed first (contiguous memory; einsum's loop is 1.3x numpy's reduction here), then
    strided columns, in one pass over the crop. `_pool2` is its factor-2 case, bit for bit, kept
    for the small texture levels, where its two slices are 20 % faster than the einsum."""
    if factor == 1:
        return x
    n, h, w = x.shape[0], x.shape[1] // factor, x.shape[2] // factor
    rows = np.einsum("nhkw->nhw", x[:, : h * factor, : w * factor].reshape(n, h, factor, w * factor))
    out = rows[:, :, 0::factor].copy()
    for k in range(1, factor):
        out += rows[:, :, k::factor]
    out *= 1.0 / (factor * factor)
    return out


def _roughness(y: np.ndarray) -> np.ndarray:
    """Mean absolute difference of neighbouring pixels, both axes, per image of [N, H, W]
    (each difference array made once, its absolute value taken in place, and summed as one
    contiguous row per image: 1.1x numpy's mean over two axes of a strided view at 56 px, 1.6x
    at 64 px)."""
    n, h, w = y.shape
    total = np.zeros(n, dtype=np.float32)
    for diff in (np.subtract(y[:, 1:], y[:, :-1]), np.subtract(y[:, :, 1:], y[:, :, :-1])):
        np.abs(diff, out=diff)
        total += diff.reshape(n, -1).sum(axis=1) * np.float32(1.0 / max(diff[0].size, 1))
    return total


def _spread(x: np.ndarray) -> np.ndarray:
    """Per-image population standard deviation of [N, H, W] (float32; two passes, as x.std)."""
    flat = x.reshape(len(x), -1)
    centred = flat - (flat.sum(axis=1) * np.float32(1.0 / flat.shape[1]))[:, None]
    return np.sqrt(np.einsum("ij,ij->i", centred, centred) * np.float32(1.0 / flat.shape[1]))


def image_descriptor(images: np.ndarray, *, clip_low: float, clip_high: float) -> np.ndarray:
    """[N, 1, S, S] crops -> [N, DESCRIPTOR_DIM] float32 (see the module docstring).

    Crops of 64 px or more are first block-averaged to 32-63 px (`descriptor_factor`: a 64-px
    crop to 32 px, a 224-px crop to 56 px). texture: neighbour
    differences at that, 1/2 and 1/4 resolution, each relative to the crop's standard deviation,
    and that deviation; histogram: 16 bins over the clip range of the half-resolution image;
    layout: 8 x 8 block means of the quarter-resolution image. The block average keeps the cost
    near one pass over the crop. Computed by the compiled kernel where it was built
    (`gate_kernels`), else by `image_descriptor_numpy`: the same histogram bit for bit, the rest
    to float32 rounding.
    """
    x = np.asarray(images, dtype=np.float32).reshape(len(images), images.shape[-2], images.shape[-1])
    if _gate_kernels is None or x.shape[1] != x.shape[2] or len(x) == 0:
        return image_descriptor_numpy(_block_mean(x, descriptor_factor(min(x.shape[1:]))),
                                      clip_low=clip_low, clip_high=clip_high)
    factor, layout = _kernel_plan(x.shape[1])
    out = np.empty((len(x), DESCRIPTOR_DIM), dtype=np.float32)
    _gate_kernels.image_descriptor(np.ascontiguousarray(x), len(x), x.shape[1], factor, layout,
                                   float(clip_low), float(clip_high), out)
    return out


@functools.lru_cache(maxsize=16)
def _kernel_plan(size: int) -> tuple[int, np.ndarray]:
    """For the compiled descriptor of a [size, size] crop: its block factor and the layout matrix
    of its coarse level (the levels' sides as image_descriptor_numpy pools them)."""
    factor = descriptor_factor(size)
    sides = [size // factor]
    for _ in TEXTURE_SCALES[1:]:
        sides.append(sides[-1] // 2 if sides[-1] >= 4 else sides[-1])
    coarse = next((side for side in reversed(sides) if side >= LAYOUT_BLOCKS), sides[0])
    return factor, layout_matrix(coarse)


def image_descriptor_numpy(x: np.ndarray, *, clip_low: float, clip_high: float) -> np.ndarray:
    """`image_descriptor` of [N, S, S] crops already block-averaged, in numpy: the reference the
    compiled kernel is tested against, and the code that runs where it was not built."""
    n = x.shape[0]
    spread = np.maximum(_spread(x), np.float32(1e-6))
    levels = [x]
    for _ in TEXTURE_SCALES[1:]:
        levels.append(_pool2(levels[-1]) if min(levels[-1].shape[1:]) >= 4 else levels[-1])
    texture = [_roughness(y) / spread for y in levels] + [spread]
    half = levels[1]
    span = max(float(clip_high - clip_low), 1e-6)
    bins = ((half - clip_low) * (HISTOGRAM_BINS / span)).astype(np.intp)
    np.clip(bins, 0, HISTOGRAM_BINS - 1, out=bins)
    bins += (np.arange(n, dtype=np.intp) * HISTOGRAM_BINS)[:, None, None]
    hist = np.bincount(bins.ravel(), minlength=n * HISTOGRAM_BINS).reshape(n, HISTOGRAM_BINS)
    hist = hist / float(half.shape[1] * half.shape[2])
    coarse = next((lv for lv in reversed(levels) if lv.shape[1] >= LAYOUT_BLOCKS), x)
    layout = _block_means(coarse, LAYOUT_BLOCKS).reshape(n, -1)
    return np.concatenate([layout, hist, np.stack(texture, axis=1)], axis=1).astype(np.float32)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b (BLAS, in one thread: see `one_blas_thread`). Measured on the quiet 2-core machine,
    16 x 64 x 782: BLAS p50 0.013 ms, p99 0.026 ms; numpy's einsum loops 0.094 / 0.134 ms."""
    return a @ b


def one_blas_thread() -> None:
    """Set numpy's BLAS to one thread (process-wide; threadpoolctl).

    Why: OpenBLAS starts a second thread for products above 2^18 multiply-adds, and the gate's
    are above it (16 x 84 x 782 for the demo's image bank). That thread needs a core which the
    model, predict's prefetch thread or serve's network threads are using: measured with the
    2 cores busy, the image part took 2.65 ms with two BLAS threads and 0.11 ms with one. The
    runtime has no other BLAS work, and torch keeps its own threads."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    threadpool_limits(limits=1, user_api="blas")


# Up to this k the k-th largest value is found by removing each row's maximum k - 1 times.
REMOVE_MAXIMA_UP_TO_K = 16


def kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """Each row's k-th largest value of a [N, K] float array (ties counted: the value
    np.partition puts at K - k); `values` may be overwritten.

    The compiled kernel (`gate_kernels`) keeps a sorted list of each row's k largest in one pass
    (7 us on the demo's [16, 782] similarities). The numpy form, where it was not built: setting
    each row's maximum to -inf k - 1 times and taking the maximum gives the same value, bit for
    bit, in 12-14 us where np.partition took 49 us (twice per batch); np.partition above
    REMOVE_MAXIMA_UP_TO_K. The inputs are finite or -inf (export's excluded bank rows): predict
    refuses a batch whose model outputs are not finite."""
    if (_gate_kernels is not None and values.dtype == np.float32 and values.ndim == 2 and len(values) > 0
            and 1 <= k <= values.shape[1]):
        out = np.empty(len(values), dtype=np.float32)
        _gate_kernels.kth_largest(np.ascontiguousarray(values), len(values), values.shape[1], int(k), out)
        return out
    return kth_largest_numpy(values, k)


def kth_largest_numpy(values: np.ndarray, k: int) -> np.ndarray:
    """`kth_largest` in numpy (the reference for the compiled kernel); `values` is overwritten."""
    if k > REMOVE_MAXIMA_UP_TO_K:
        return np.partition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k]
    rows = np.arange(len(values))
    for _ in range(k - 1):
        values[rows, values.argmax(axis=1)] = -np.inf
    return values.max(axis=1)


def kth_distance(queries: np.ndarray, bank_t: np.ndarray, bank_sq: np.ndarray, k: int,
                 exclude: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distance from each query row to its k-th nearest bank row (float64).

    bank_t: the bank transposed [D, K]; bank_sq: each bank row's squared norm [K]; exclude: an
    optional boolean [N, K] of bank rows each query may not use (export's leave-one-patient-out
    thresholds; the runtime passes none).
    """
    q = np.asarray(queries, dtype=np.float32)
    # |q - b|^2 = |q|^2 - (2 q.b - |b|^2): the k-th smallest squared distance is |q|^2 less the
    # k-th largest "closeness" 2 q.b - |b|^2, made in place in the product's own array
    closeness = matmul(q, bank_t)
    if _compiled_knn(closeness, k, exclude):
        out = np.empty(len(q), dtype=np.float64)
        _gate_kernels.knn_distance(closeness, len(q), closeness.shape[1], int(k), np.ascontiguousarray(bank_sq, dtype=np.float32),
                                   np.einsum("ij,ij->i", q, q), out)
        return out
    closeness *= np.float32(2.0)
    closeness -= bank_sq
    if exclude is not None:
        closeness[exclude] = -np.inf
    kth = kth_largest(closeness, k).astype(np.float64)
    return np.sqrt(np.maximum(np.einsum("ij,ij->i", q, q) - kth, 0.0))


def _compiled_knn(products: np.ndarray, k: int, exclude: np.ndarray | None) -> bool:
    """Whether the compiled `knn_distance` computes a part's distances from these products (the
    kernels built, no bank rows excluded: export's leave-one-patient-out thresholds use the
    numpy code, which gives the same values)."""
    return (_gate_kernels is not None and exclude is None and products.dtype == np.float32
            and products.flags.c_contiguous and len(products) > 0 and 1 <= k <= products.shape[1])


def _median(values: np.ndarray) -> float:
    """np.median of a short finite 1-D array, the same value without its general machinery
    (a third of the gate's per-batch scoring time at batch 16)."""
    ordered = np.array(values, dtype=np.float64)  # a copy, sorted in place (np.sort's wrapper costs more here)
    ordered.sort()
    middle = len(ordered) // 2
    return float(ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2.0)


@dataclasses.dataclass(frozen=True)
class CropScores:
    """Per crop: the two kNN distances and the combined score (> 1: atypical)."""

    embedding: np.ndarray
    image: np.ndarray
    score: np.ndarray

    def select(self, keep: np.ndarray) -> "CropScores":
        """The scores of the crops where `keep` (a boolean mask or indices) holds."""
        return CropScores(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class OodVerdict:
    """The gate's answer for one volume."""

    uncertain: bool
    reason: str | None
    score: float | None          # median of the crops' scores
    threshold: float | None      # 1.0: the volume (and a crop) is atypical above it
    atypical_crops: int | None


# How a volume's liver region was given to `predict`, in the words of a reason (see `OodGate.judge`).
REGION_WORDS = {"bbox": "a box (--bbox)", "auto": "a rough liver region found without a mask (--roi auto)"}
REGIONS = ("mask", *REGION_WORDS)
BANK_REGION_WORDS = {"mask": "from liver masks", "auto": "with --roi auto", "mixed": "from liver masks and with --roi auto"}
BANK_REGIONS = tuple(BANK_REGION_WORDS)  # export/data.py region_kind
BANK_REGIONS_WITH_AUTO = ("auto", "mixed")  # banks that hold crops cut with --roi auto

# The least share of export's far-out-of-distribution volumes (export/ood_sets.py) a gate must flag
# or refuse; below it export warns and predict warns on every result (`OodGate.detection_warning`).
FAR_OOD_TARGET = 0.99

NO_GATE = OodVerdict(uncertain=True, reason=NO_GATE_REASON, score=None, threshold=None, atypical_crops=None)
THRESHOLD = 1.0


class OodGate:
    """Both detectors with their banks and thresholds, from `ModelMetadata.ood`."""

    def __init__(self, config: dict[str, Any], *, clip_low: float, clip_high: float, source: str = "model") -> None:
        try:
            if config.get("method") != GATE_METHOD or config.get("format_version") != GATE_FORMAT_VERSION:
                raise ValueError(f"unknown gate {config.get('method')!r} version {config.get('format_version')!r} "
                                 f"(this liverstage reads {GATE_METHOD!r} version {GATE_FORMAT_VERSION}: re-export the model)")
            img = config["image"]
            self.k = {part: int(config[part]["k"]) for part in PARTS}
            self.thresholds = {part: float(config[part]["threshold"]) for part in PARTS}
            self.bases = {part: decode_array(config[part]["basis"]) for part in SPHERE_PARTS}  # [D, m]
            banks = {part: decode_array(config[part]["bank"]) for part in PARTS}  # sphere parts: coordinates in the basis
            self.image_mean = np.asarray(img["mean"], dtype=np.float32)
            self.image_scale = np.asarray(img["scale"], dtype=np.float32)
            for part in PARTS:
                if not 1 <= self.k[part] <= len(banks[part]):
                    raise ValueError(f"{part}: k = {self.k[part]} is outside 1..{len(banks[part])} (its bank size)")
                if not (np.isfinite(self.thresholds[part]) and self.thresholds[part] > 0):
                    raise ValueError(f"{part}: threshold must be finite and > 0")
            for part in SPHERE_PARTS:
                if self.bases[part].shape[1] != banks[part].shape[1]:
                    raise ValueError(f"{part}: basis {list(self.bases[part].shape)} and bank "
                                     f"{list(banks[part].shape)} disagree")
            if len({len(bank) for bank in banks.values()}) != 1:
                raise ValueError("the parts' banks must hold the same crops")
            if not (banks["image"].shape[1] == DESCRIPTOR_DIM and self.image_mean.shape == (DESCRIPTOR_DIM,)
                    and self.image_scale.shape == (DESCRIPTOR_DIM,) and (self.image_scale > 0).all()):
                raise ValueError(f"image: bank, mean and scale must have {DESCRIPTOR_DIM} positive-scaled features")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{source}: invalid out-of-distribution gate in its metadata ({exc})") from None
        self.clip = (float(clip_low), float(clip_high))
        fit = config.get("fit") if isinstance(config.get("fit"), dict) else {}
        regions = fit.get("bank_regions")
        self.bank_regions = regions if regions in BANK_REGIONS else None  # None: not recorded (older exports)
        detection = fit.get("far_ood_detection")
        self.far_ood_detection = (float(detection) if isinstance(detection, (int, float))
                                  and not isinstance(detection, bool) and 0.0 <= detection <= 1.0 else None)
        self.dims = {part: int(self.bases[part].shape[0]) for part in SPHERE_PARTS}
        self.bank_size = int(len(banks["image"]))  # the same crops in every part
        self._sphere_banks_t = {part: np.ascontiguousarray(banks[part].T) for part in SPHERE_PARTS}  # [m, K]
        self._image_bank = (np.ascontiguousarray(banks["image"].T), np.einsum("ij,ij->i", banks["image"], banks["image"]))
        one_blas_thread()

    @classmethod
    def from_metadata(cls, metadata, *, source: str = "model") -> "OodGate | None":
        """The gate of a model's metadata, or None for a model exported without one."""
        config = getattr(metadata, "ood", None)
        if config is None:
            return None
        spec = metadata.preprocess
        return cls(config, clip_low=spec.clip_low, clip_high=spec.clip_high, source=source)

    def detection_warning(self) -> str | None:
        """A warning for every result of a model whose gate, measured at export, flagged fewer
        far-out-of-distribution volumes than FAR_OOD_TARGET (None when it met it or, for older
        exports, the figure is not recorded). Why on every result: such a gate lets more input the
        model was not made for through as staged, so 'uncertain: no' is weaker evidence there."""
        if self.far_ood_detection is None or self.far_ood_detection >= FAR_OOD_TARGET:
            return None
        return (f"this model's out-of-distribution gate flagged only {self.far_ood_detection:.1%} of the "
                f"far-out-of-distribution test volumes at export (target {FAR_OOD_TARGET:.0%}), so a result not "
                "marked uncertain may still be input the model was not made for; see its model card")

    def image_features(self, images: np.ndarray) -> np.ndarray:
        """The standardised image descriptor, in the bank's units."""
        raw = image_descriptor(images, clip_low=self.clip[0], clip_high=self.clip[1])
        return (raw - self.image_mean) / self.image_scale

    def sphere_distance(self, part: str, values: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """Distance on the unit sphere from each L2-normalised row to its k-th nearest bank row
        (`exclude`: as in `kth_distance`)."""
        rows = normalise_rows(values)
        sims = matmul(matmul(rows, self.bases[part]), self._sphere_banks_t[part])
        if _compiled_knn(sims, self.k[part], exclude):
            out = np.empty(len(sims), dtype=np.float64)
            _gate_kernels.knn_distance(sims, len(sims), sims.shape[1], self.k[part], None, None, out)
            return out
        if exclude is not None:
            sims[exclude] = -np.inf
        kth = kth_largest(sims, self.k[part])
        return np.sqrt(np.clip(2.0 - 2.0 * kth.astype(np.float64), 0.0, 4.0))

    def scores(self, outputs: dict[str, np.ndarray], images: np.ndarray, *,
               exclude: np.ndarray | None = None) -> CropScores:
        """The two distances and the combined score for a batch of crops and the model's
        outputs for them (a backend's `run`: `embedding` is read); `exclude`:
        bank rows each crop may not use (`kth_distance`)."""
        if exclude is not None and exclude.shape != (len(images), self.bank_size):
            raise ValueError(f"exclude must be [{len(images)}, {self.bank_size}], got {list(exclude.shape)}")
        distances = {}
        for part, output in SPHERE_PARTS.items():
            values = np.asarray(outputs[output])
            if values.ndim != 2 or values.shape[1] != self.dims[part] or len(values) != len(images):
                raise ValueError(f"{output} of shape {list(values.shape)} does not match the gate "
                                 f"(dimension {self.dims[part]}) or the {len(images)} crops")
            distances[part] = self.sphere_distance(part, values, exclude)
        distances["image"] = kth_distance(self.image_features(images), *self._image_bank, self.k["image"], exclude)
        return CropScores(**distances, score=self.crop_score(distances))

    def crop_score(self, distances, parts: tuple[str, ...] = PARTS) -> np.ndarray:
        """Each crop's score from its distances (a mapping part -> [N], or CropScores): the largest
        of `parts`' distances, each divided by its threshold (above 1: atypical). `parts` other than
        all of them: what the gate would say with only those (benchmarks/ood_eval.py)."""
        get = distances.__getitem__ if isinstance(distances, dict) else lambda part: getattr(distances, part)
        score = get(parts[0]) / self.thresholds[parts[0]]
        for part in parts[1:]:
            np.maximum(score, get(part) / self.thresholds[part], out=score)
        return score

    def judge(self, crops: CropScores, *, region: str = "mask") -> OodVerdict:
        """The volume rule on its crops' scores (module docstring). `region`: how the volume's
        liver region was given ("mask", "bbox" or "auto"); where its crops were cut otherwise
        than the bank's, the reason says so, because that alone makes most crops atypical (the
        normalisation and the box follow the region) and only a mask tells it apart from input
        that is not liver MRI."""
        if region not in REGIONS:
            raise ValueError(f"region must be one of {list(REGIONS)}, got {region!r}")
        score = np.asarray(crops.score, dtype=np.float64)
        if score.ndim != 1 or len(score) < 1:
            raise ValueError(f"need the scores of at least one crop, got shape {score.shape}")
        median = _median(score)
        atypical = score > THRESHOLD
        count = int(np.count_nonzero(atypical))
        reason = None
        if median > THRESHOLD:
            by = {part: int(np.count_nonzero(atypical & (getattr(crops, part) > self.thresholds[part]))) for part in PARTS}
            reason = (f"{count} of {len(score)} crops look unlike the liver crops the model was trained on "
                      f"(median out-of-distribution score {median:.2f} > {THRESHOLD:g}; by their embedding: "
                      f"{by['embedding']}, by their image: {by['image']}): "
                      f"{self._cause(region)}")
        return OodVerdict(uncertain=median > THRESHOLD, reason=reason, score=median, threshold=THRESHOLD,
                          atypical_crops=count)

    def _cause(self, region: str) -> str:
        """The likely cause of atypical crops, for a volume whose region was given as `region`."""
        if region == "mask" or (region == "auto" and self.bank_regions in BANK_REGIONS_WITH_AUTO):
            return "not liver MRI like the training data, so the stage is not reliable"
        cut = f"its crops were cut from {REGION_WORDS[region]}"
        if self.bank_regions is None:  # not recorded: say what holds for a model trained on masks
            cause = f"{cut}; if the model's training crops were cut from liver masks, that alone"
        else:
            cause = f"{cut}, the model's training crops {BANK_REGION_WORDS[self.bank_regions]}, and that alone"
        cause += " makes most crops look atypical"
        return (f"{cause}, so the stage is not reliable; give a liver mask (--mask or --mask-dir; e.g. TotalSegmentator "
                "total_mr, liver label 5) to tell that from input that is not liver MRI like the training data")
