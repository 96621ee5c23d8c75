"""Training data: manifest -> crops in memory (one tensor), with an on-disk crop cache and mild augmentation.

Crops come from the ONE preprocessing path of the runtime (`crops_for_volume` for volumes,
`normalise_image2d` for pre-cut PNG/NPY crops) with the run's PreprocessSpec, so training sees
exactly what `predict` will see.

Cache: volume crops are computed once and stored as
`<cache_dir>/<spec.hash>/<patient>-<key>.npz`, where key hashes the volume's and mask's absolute
paths, sizes and modification times; a changed file or spec gives a new key, so epochs (and
later runs) never re-read NIfTI. The default cache_dir is `$LIVERSTAGE_CACHE` or
`~/.cache/liverstage/crops`. Writes are atomic, so concurrent DDP ranks cannot see half a file.

Augmentation (training only, per crop, drawn from a generator that is a function of (seed,
epoch) so that resumed runs are exact): intensity x U(0.9, 1.1) + U(-0.05, 0.05); rotation
U(-10, 10) degrees, isotropic scale U(0.9, 1.1), translation U(-5 %, 5 %) of the side, bilinear
with border padding. No flips: a flip would move the liver to the wrong side of the body.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from liverstage.runtime.atomic import atomic_path
from liverstage.runtime.crops import crops_for_volume, normalise_image2d
from liverstage.runtime.errors import InputError, LiverstageError
from liverstage.runtime.manifest import ManifestRow
from liverstage.runtime.spec import PreprocessSpec
from liverstage.runtime.stages import stage_index

AUG_INTENSITY_SCALE = 0.10
AUG_INTENSITY_SHIFT = 0.05
AUG_ROTATION_DEG = 10.0
AUG_SCALE = 0.10
AUG_TRANSLATION = 0.05


@dataclasses.dataclass
class CropData:
    """All crops of a manifest in memory.

    images: float32 [N, 1, S, S]; labels: int64 [N] stage index; patient_ids: [N] str;
    slices: int64 [N] (canonical z for volume crops, the row's order within its patient for
    pre-cut crops).
    """

    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, patients: Sequence[str]) -> "CropData":
        sel = np.isin(self.patient_ids, np.asarray(list(patients), dtype=object).astype(str))
        return CropData(self.images[sel], self.labels[sel], self.patient_ids[sel], self.slices[sel])

    def patient_stages(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pid, lab in zip(self.patient_ids.tolist(), self.labels.tolist()):
            out.setdefault(pid, lab)
        return out


def default_cache_dir() -> Path:
    env = os.environ.get("LIVERSTAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "liverstage" / "crops"


def _file_identity(path: Path | None) -> str:
    if path is None:
        return "-"
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def cache_path(row: ManifestRow, spec: PreprocessSpec, cache_dir: Path) -> Path:
    key = hashlib.sha256(f"{_file_identity(row.image)}#{_file_identity(row.mask)}".encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row.patient_id)[:64]
    return Path(cache_dir) / spec.hash / f"{safe}-{key}.npz"


def _volume_crops(row: ManifestRow, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    region = {"mask": row.mask} if row.mask is not None else {"roi": "auto"}
    crops = crops_for_volume(row.image, spec=spec, **region)
    return crops.images, crops.slices


def volume_crops_cached(row: ManifestRow, spec: PreprocessSpec, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Crops (images, slices) of one volume row, from the cache when present."""
    if cache_dir is None:
        return _volume_crops(row, spec)
    path = cache_path(row, spec, cache_dir)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                images, slices = z["images"], z["slices"]
            if images.ndim == 4 and images.shape[1:] == (1, spec.crop_size, spec.crop_size):
                return images.astype(np.float32, copy=False), slices.astype(np.int64, copy=False)
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: recompute and overwrite it
    images, slices = _volume_crops(row, spec)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images, slices=slices)
    return images, slices


def load_image2d(path: Path) -> np.ndarray:
    """A pre-cut crop file (.png via Pillow, .npy without pickles) -> array [H, W] or [H, W, C]."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image  # noqa: PLC0415

        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read 2D crop {path}: {type(exc).__name__}: {exc}") from None


def _crop_row(row: ManifestRow, spec: PreprocessSpec) -> np.ndarray:
    try:
        return normalise_image2d(load_image2d(row.image), spec)
    except InputError as exc:
        raise InputError(f"{row.image} (patient {row.patient_id}): {exc}") from None


def _volume_job(args):
    row, spec, cache_dir = args
    try:
        return volume_crops_cached(row, spec, cache_dir)
    except LiverstageError as exc:
        raise InputError(f"{row.image} (patient {row.patient_id}): {exc}") from None


def load_crops(
    rows: Sequence[ManifestRow],
    spec: PreprocessSpec,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 0,
    progress: bool = False,
) -> CropData:
    """Every crop of the manifest rows, in manifest order. InputError if a patient has no crop.

    workers > 0 computes uncached volume crops in that many processes.
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    volume_rows = [r for r in rows if r.kind == "volume"]
    jobs = [(r, spec, cache) for r in volume_rows]
    iterator = None
    if workers > 0 and len(jobs) > 1:
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers)
        iterator = pool.map(_volume_job, jobs)
    else:
        pool = None
        iterator = map(_volume_job, jobs)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        iterator = tqdm(iterator, total=len(jobs), desc="crops", unit="volume", leave=False)
    try:
        volume_results = dict(zip((id(r) for r in volume_rows), iterator))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    images, labels, pids, slices = [], [], [], []
    per_patient: dict[str, int] = {}
    for row in rows:
        if row.kind == "volume":
            imgs, sl = volume_results[id(row)]
        else:
            imgs = _crop_row(row, spec)[None]
            sl = np.asarray([per_patient.get(row.patient_id, 0)], dtype=np.int64)
        n = int(imgs.shape[0])
        per_patient[row.patient_id] = per_patient.get(row.patient_id, 0) + n
        if n:
            images.append(imgs)
            labels.append(np.full(n, stage_index(row.stage), dtype=np.int64))
            pids.extend([row.patient_id] * n)
            slices.append(np.asarray(sl, dtype=np.int64))
    empty = [pid for pid, n in per_patient.items() if n == 0]
    if empty:
        raise InputError(f"patient {empty[0]} has no crop (its liver region is too small or empty)"
                         + (f"; {len(empty) - 1} more patient(s) too" if len(empty) > 1 else ""))
    if not images:
        raise InputError("the manifest yields no crops")
    return CropData(
        images=np.ascontiguousarray(np.concatenate(images), dtype=np.float32),
        labels=np.concatenate(labels),
        patient_ids=np.asarray(pids, dtype=str),
        slices=np.concatenate(slices),
    )


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, salt): resumed runs draw the same numbers."""
    digest = hashlib.sha256(f"liverstage|{seed}|{epoch}|{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclasses.dataclass
class AugmentParams:
    """Per-crop augmentation parameters for one epoch (index = crop index)."""

    gain: torch.Tensor
    offset: torch.Tensor
    theta: torch.Tensor  # [N, 2, 3] affine matrices for affine_grid

    def take(self, index: torch.Tensor, device) -> "AugmentParams":
        return AugmentParams(self.gain[index].to(device), self.offset[index].to(device), self.theta[index].to(device))


def draw_augmentation(n: int, generator: torch.Generator) -> AugmentParams:
    def uniform(*shape, half):
        return (torch.rand(*shape, generator=generator) * 2 - 1) * half

    gain = 1.0 + uniform(n, half=AUG_INTENSITY_SCALE)
    offset = uniform(n, half=AUG_INTENSITY_SHIFT)
    angle = uniform(n, half=math.radians(AUG_ROTATION_DEG))
    zoom = 1.0 + uniform(n, half=AUG_SCALE)
    shift = uniform(n, 2, half=2 * AUG_TRANSLATION)  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return AugmentParams(gain, offset, theta)


def augment(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply intensity and small affine augmentation to a batch [B, 1, S, S] (float32)."""
    grid = F.affine_grid(params.theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out * params.gain.view(-1, 1, 1, 1).to(images.dtype) + params.offset.view(-1, 1, 1, 1).to(images.dtype)
