"""Inference over in-memory crops, predictions.csv, and `liverstage evaluate` on a checkpoint.

The same functions serve the trainer (validation and test) and `evaluate`, so a run's
metrics.json and a later `liverstage evaluate RUN/model.pt` agree.

Evaluation always runs in float32, TF32 off, also on a GPU where training runs under bf16
autocast: reported metrics must not depend on the device. Measured on an H200 (bench_gpu.py),
bf16 moved a trained ResNet18+AMCL's cosines by up to 0.05 and its probabilities by ~0.01 from
fp32, while evaluation is a small share of a run's time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from liverstage.runtime import checks
from liverstage.runtime.atomic import write_json, write_text
from liverstage.runtime.errors import BackendUnavailable, InputError
from liverstage.runtime.jsonsafe import json_safe
from liverstage.runtime.stages import STAGES

from .data import CropData
from .metrics import compute_metrics

PREDICTION_COLUMNS = ("patient_id", "slice", "label", "predicted",
                      *(f"prob_{s}" for s in STAGES), *(f"cos_{s}" for s in STAGES))


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU -> BackendUnavailable."""
    name = checks.device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda was asked for, but no CUDA GPU is available here")
    return torch.device(name)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it, fp16 on older GPUs, none (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def strict_float32():
    """TF32 off for cuDNN convolutions and matmuls (PyTorch lets cuDNN use TF32 by default)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def predict_crops(model, images: np.ndarray | torch.Tensor, *, labels: np.ndarray | None = None,
                  batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Probabilities [N, C] and cosines [N, C] (float64 numpy) of crops [N, 1, S, S], in strict
    float32 (module docstring); with labels also the mean training loss (with margin), for
    validation curves."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    probs, cosines = [], []
    loss_sum, count = 0.0, 0
    data = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    try:
        with strict_float32():
            for start in range(0, data.shape[0], batch_size):
                x = data[start:start + batch_size].to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                emb = model(x)
                logits = model.class_logits(emb)
                probs.append(torch.softmax(logits, dim=1).double().cpu())
                cosines.append(model.cosine(emb).double().cpu())
                if labels is not None:
                    y = torch.as_tensor(labels[start:start + batch_size], device=device)
                    loss_sum += float(model.loss(emb, y)) * len(y)
                    count += len(y)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {
        "probs": torch.cat(probs).numpy() if probs else np.zeros((0, len(STAGES))),
        "cosine": torch.cat(cosines).numpy() if cosines else np.zeros((0, len(STAGES))),
    }
    if labels is not None:
        out["loss"] = loss_sum / max(count, 1)
    return out


def predictions_csv(data: CropData, probs: np.ndarray, cosine: np.ndarray) -> str:
    """predictions.csv text: one row per crop (stage letters for label and predicted)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    predicted = probs.argmax(axis=1)
    for i in range(len(data)):
        writer.writerow([data.patient_ids[i], int(data.slices[i]), STAGES[int(data.labels[i])],
                         STAGES[int(predicted[i])], *(f"{v:.6g}" for v in probs[i]),
                         *(f"{v:.6g}" for v in cosine[i])])
    return buf.getvalue()


def evaluate_data(model, data: CropData, *, batch_size: int = 64,
                  device="cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, raw predictions) of a model over a crop set, in strict float32."""
    raw = predict_crops(model, data.images, labels=data.labels, batch_size=batch_size, device=device)
    metrics = compute_metrics(data.labels, raw["probs"], data.patient_ids.tolist())
    metrics["loss"] = raw["loss"]
    return metrics, raw


def read_patient_list(path: str | os.PathLike) -> list[str]:
    """Patient ids, one per line (blank lines and '#' comments ignored)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"patient list not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"patient list {p} is not a UTF-8 text file") from None
    ids = [ln.split("#", 1)[0].strip() for ln in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise InputError(f"patient list {p} names no patient")
    return ids


def evaluate_checkpoint(model_path: str | os.PathLike, manifest: str | os.PathLike, *,
                        patients: Sequence[str] | None = None, out: str | os.PathLike | None = None,
                        predictions: str | os.PathLike | None = None, device: str = "auto",
                        batch_size: int = 64, cache_dir: str | os.PathLike | None = None,
                        workers: int = 0) -> dict[str, Any]:
    """Metrics of a checkpoint on a manifest (optionally only `patients`), with the checkpoint's
    own PreprocessSpec; writes `out` (metrics JSON) and `predictions` (CSV) when given."""
    from liverstage.runtime.manifest import read_manifest  # noqa: PLC0415

    from .checkpoint import load_checkpoint  # noqa: PLC0415
    from .data import default_cache_dir, load_crops  # noqa: PLC0415

    model, checkpoint = load_checkpoint(model_path)
    spec = checkpoint.preprocess
    rows = read_manifest(manifest)
    if patients is not None:
        wanted = {str(p) for p in patients}
        known = {r.patient_id for r in rows}
        missing = sorted(wanted - known)
        if missing:
            raise InputError(f"patient(s) not in manifest {manifest}: {', '.join(missing[:5])}")
        rows = [r for r in rows if r.patient_id in wanted]
    data = load_crops(rows, spec, cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
                      workers=workers)
    dev = resolve_device(device)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    metrics, raw = evaluate_data(model, data, batch_size=batch_size, device=dev)
    metrics = json_safe(metrics)
    if out is not None:
        write_json(out, metrics)
    if predictions is not None:
        write_text(predictions, predictions_csv(data, raw["probs"], raw["cosine"]))
    return metrics
