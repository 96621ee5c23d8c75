"""`RUN/model.pt`: save and load a liverstage checkpoint (format in docs/architecture.md).

The file is a `torch.save` of a dict of tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint cannot run code. Writes are atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from liverstage.runtime.atomic import atomic_path
from liverstage.runtime.errors import InputError, ModelError
from liverstage.runtime.provenance import package_versions
from liverstage.runtime.spec import PreprocessSpec
from liverstage.runtime.stages import STAGES

from .model import LOSSES, StagingNet, build_model

CHECKPOINT_FORMAT = "liverstage-checkpoint"
CHECKPOINT_VERSION = 1


# Packages that shape a trained model (their versions are recorded in every checkpoint).
TRAIN_PACKAGES = ("liverstage", "torch", "torchvision", "numpy", "scikit-learn", "nibabel")


def _plain(value: Any) -> Any:
    """Coerce to types torch.load(weights_only=True) accepts (paths -> str, tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None or isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def checkpoint_dict(
    model: StagingNet,
    *,
    preprocess: PreprocessSpec,
    args: dict[str, Any],
    splits: dict[str, list[str]],
    manifest: str | os.PathLike | None,
    epoch: int,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (without writing it)."""
    raw = model.module if hasattr(model, "module") else model  # DDP-wrapped or not
    state = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "state_dict": state,
        "backbone": raw.backbone_name,
        "loss": raw.loss_name,
        "scale": float(raw.scale),
        "margin": float(raw.margin),
        "embedding_dim": int(raw.embedding_dim),
        "class_names": list(STAGES),
        "preprocess": preprocess.to_dict(),
        "args": _plain(args),
        "versions": package_versions(TRAIN_PACKAGES),
        "splits": {k: [str(p) for p in splits.get(k, [])] for k in ("train", "val", "test")},
        "manifest": str(Path(manifest).resolve()) if manifest else "",
        "epoch": int(epoch),
        "metrics": _plain(metrics) if metrics is not None else None,
    }
    if extra:
        ckpt.update(extra)  # the caller keeps these weights_only-safe (e.g. optimizer state_dict)
    return ckpt


def save_checkpoint(path: str | os.PathLike, model: StagingNet, **fields: Any) -> Path:
    """Write `checkpoint_dict(model, **fields)` atomically to `path`; return the path."""
    ckpt = checkpoint_dict(model, **fields)
    return write_checkpoint_dict(path, ckpt)


def write_checkpoint_dict(path: str | os.PathLike, ckpt: dict[str, Any]) -> Path:
    """Atomically torch.save a dict: written beside `path`, renamed into place only when complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def read_checkpoint_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True) with every failure turned into a one-line ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (corrupt, truncated, not torch, unsafe pickle)
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(f"{path} is not a readable liverstage checkpoint ({type(exc).__name__}: {detail})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a liverstage checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise ModelError(
            f"{path}: checkpoint format_version {ckpt.get('format_version')!r} is not supported "
            f"(this liverstage reads {CHECKPOINT_VERSION})"
        )
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[StagingNet, dict[str, Any]]:
    """Rebuild the StagingNet (in eval mode) from `path`; ModelError if not ours, corrupt or truncated."""
    ckpt = read_checkpoint_dict(path, map_location=map_location)
    try:
        if ckpt["loss"] not in LOSSES:
            raise ValueError(f"unknown loss {ckpt['loss']!r}")
        if list(ckpt["class_names"]) != list(STAGES):
            raise ValueError(f"class names {ckpt['class_names']!r} are not {list(STAGES)}")
        PreprocessSpec.from_dict(ckpt["preprocess"])
        model = build_model(ckpt["backbone"], ckpt["loss"], num_classes=len(ckpt["class_names"]),
                            scale=float(ckpt["scale"]), margin=float(ckpt["margin"]))
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError, InputError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(f"{path}: damaged liverstage checkpoint ({type(exc).__name__}: {detail})") from None
    model.eval()
    return model, ckpt


def checkpoint_spec(ckpt: dict[str, Any]) -> PreprocessSpec:
    """The PreprocessSpec a checkpoint was trained with."""
    return PreprocessSpec.from_dict(ckpt["preprocess"])
