"""`RUN/model.pt` (and `last.pt`, `best.pt`): the typed liverstage checkpoint.

In code a checkpoint is the frozen `Checkpoint`; on disk it is a `torch.save` of `to_dict()`, a
dict of tensors and plain values only, so it loads with `torch.load(weights_only=True)`: opening
a checkpoint cannot run code. The dict layout is in docs/architecture.md; nothing outside this
module reads it by its keys. Writes are atomic.

Format versions: 1 is written and read. A reader that meets a foreign file, a newer version, a
truncated or damaged one raises one ModelError line naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from liverstage.runtime.atomic import atomic_path
from liverstage.runtime.errors import InputError, ModelError
from liverstage.runtime.jsonsafe import json_safe
from liverstage.runtime.provenance import package_versions
from liverstage.runtime.spec import PreprocessSpec
from liverstage.runtime.stages import STAGES

from .config import LOSSES
from .model import StagingNet, build_model

CHECKPOINT_FORMAT = "liverstage-checkpoint"
CHECKPOINT_VERSION = 1
READABLE_VERSIONS = (1,)

# Packages that shape a trained model (their versions are recorded in every checkpoint).
TRAIN_PACKAGES = ("liverstage", "torch", "torchvision", "numpy", "scikit-learn", "nibabel")
SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Splits:
    """Patient ids per split."""

    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | "Splits" | None) -> "Splits":
        if isinstance(data, Splits):
            return data
        data = data or {}
        return cls(**{name: tuple(str(p) for p in data.get(name) or ()) for name in SPLIT_NAMES})

    def to_dict(self) -> dict[str, list[str]]:
        return {name: list(getattr(self, name)) for name in SPLIT_NAMES}

    def everyone(self) -> set[str]:
        return set(self.train) | set(self.val) | set(self.test)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One trained model with everything needed to use, export, evaluate or resume it.

    args: the run's options (`RunConfig.options()`; empty for a model not made by the trainer).
    args and metrics hold plain JSON values (runtime/jsonsafe.py), which weights_only loading accepts.
    manifest: the training manifest's absolute path at training time ("" if none).
    distributed (model.pt): world size and each rank's weight checksum.
    optimizer, history, best (last.pt): the Adam state, one row per epoch and the best
    validation epoch so far, for --resume.
    """

    state_dict: dict[str, torch.Tensor]
    backbone: str
    loss: str
    scale: float
    margin: float
    embedding_dim: int
    preprocess: PreprocessSpec
    epoch: int
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    splits: Splits = Splits()
    manifest: str = ""
    metrics: dict[str, Any] | None = None
    class_names: tuple[str, ...] = STAGES
    distributed: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    history: tuple[dict[str, Any], ...] | None = None
    best: dict[str, Any] | None = None

    @classmethod
    def of_model(cls, model: StagingNet, *, preprocess: PreprocessSpec, args: Mapping[str, Any],
                 splits: Mapping[str, Any] | Splits | None, manifest: str | os.PathLike | None, epoch: int,
                 metrics: Mapping[str, Any] | None = None, **extra: Any) -> "Checkpoint":
        """A checkpoint of `model` (DDP-wrapped or not) as it is now; `extra`: distributed,
        optimizer, history, best."""
        raw = model.module if hasattr(model, "module") else model
        return cls(
            state_dict={k: v.detach().cpu().clone() for k, v in raw.state_dict().items()},
            backbone=raw.backbone_name, loss=raw.loss_name, scale=float(raw.scale), margin=float(raw.margin),
            embedding_dim=int(raw.embedding_dim), preprocess=preprocess, epoch=int(epoch), args=json_safe(dict(args)),
            versions=package_versions(TRAIN_PACKAGES), splits=Splits.from_mapping(splits),
            manifest=str(Path(manifest).resolve()) if manifest else "",
            metrics=json_safe(dict(metrics)) if metrics is not None else None, **extra,
        )

    def replace(self, **changes: Any) -> "Checkpoint":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (format_version 1): weights_only-safe values only."""
        out = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "state_dict": self.state_dict,
            "backbone": self.backbone,
            "loss": self.loss,
            "scale": float(self.scale),
            "margin": float(self.margin),
            "embedding_dim": int(self.embedding_dim),
            "class_names": list(self.class_names),
            "preprocess": self.preprocess.to_dict(),
            "args": json_safe(self.args),
            "versions": dict(self.versions),
            "splits": self.splits.to_dict(),
            "manifest": self.manifest,
            "epoch": int(self.epoch),
            "metrics": json_safe(self.metrics) if self.metrics is not None else None,
        }
        # Stored as given: the optimizer's state is keyed by parameter index (int), not by name.
        for name in ("distributed", "optimizer", "history", "best"):
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if name == "history" else value
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "checkpoint") -> "Checkpoint":
        """Check and type a loaded dict; ModelError (one line naming `source`) if it is not ours."""
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise ModelError(f"{source} is not a liverstage checkpoint (no format tag {CHECKPOINT_FORMAT!r})")
        if data.get("format_version") not in READABLE_VERSIONS:
            raise ModelError(
                f"{source}: checkpoint format_version {data.get('format_version')!r} is not supported "
                f"(this liverstage reads {', '.join(map(str, READABLE_VERSIONS))})"
            )
        try:
            state = data["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise TypeError("state_dict is not a dict of tensors")
            if data["loss"] not in LOSSES:
                raise ValueError(f"unknown loss {data['loss']!r}")
            if list(data["class_names"]) != list(STAGES):
                raise ValueError(f"class names {data['class_names']!r} are not {list(STAGES)}")
            history = data.get("history")
            return cls(
                state_dict=state, backbone=str(data["backbone"]), loss=data["loss"], scale=float(data["scale"]),
                margin=float(data["margin"]), embedding_dim=int(data["embedding_dim"]),
                preprocess=PreprocessSpec.from_dict(data["preprocess"]), epoch=int(data["epoch"]),
                args=dict(data.get("args") or {}), versions={str(k): str(v) for k, v in (data.get("versions") or {}).items()},
                splits=Splits.from_mapping(data.get("splits")), manifest=str(data.get("manifest") or ""),
                metrics=data.get("metrics"), class_names=tuple(data["class_names"]),
                distributed=data.get("distributed"), optimizer=data.get("optimizer"),
                history=tuple(history) if history is not None else None, best=data.get("best"),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ModelError(f"{source}: damaged liverstage checkpoint ({type(exc).__name__}: {detail})") from None

    def manifest_path(self) -> Path | None:
        """The training manifest when it is still on disk."""
        path = Path(self.manifest) if self.manifest else None
        return path if path is not None and path.is_file() else None

    def build_model(self, *, source: str = "checkpoint") -> StagingNet:
        """The StagingNet with these weights, in eval mode; ModelError if they do not fit."""
        try:
            model = build_model(self.backbone, self.loss, num_classes=len(self.class_names), scale=self.scale,
                                margin=self.margin)
            model.load_state_dict(self.state_dict, strict=True)
        except (ValueError, RuntimeError, InputError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ModelError(f"{source}: damaged liverstage checkpoint ({type(exc).__name__}: {detail})") from None
        return model.eval()


def write_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Atomically torch.save a checkpoint: written beside `path`, renamed into place only when complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint.to_dict(), tmp)
    return path


def save_checkpoint(path: str | os.PathLike, model: StagingNet, **fields: Any) -> Path:
    """Write `Checkpoint.of_model(model, **fields)` atomically to `path`; return the path."""
    return write_checkpoint(path, Checkpoint.of_model(model, **fields))


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """torch.load(weights_only=True) + Checkpoint.from_dict, every failure a one-line ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (corrupt, truncated, not torch, unsafe pickle)
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(f"{path} is not a readable liverstage checkpoint ({type(exc).__name__}: {detail})") from None
    return Checkpoint.from_dict(data, source=str(path))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[StagingNet, Checkpoint]:
    """The StagingNet (in eval mode) and its Checkpoint; ModelError if not ours, corrupt or truncated."""
    checkpoint = read_checkpoint(path, map_location=map_location)
    return checkpoint.build_model(source=str(path)), checkpoint
