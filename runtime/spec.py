"""PreprocessSpec: every parameter that turns a volume + liver region into model crops.

It is saved inside every checkpoint and every exported model (as nnU-Net keeps its plans with
the weights), so a model is never run with preprocessing it was not trained with. Frozen,
versioned, JSON round-trip, stable hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from . import checks

SPEC_VERSION = 1
# Fields added after version 1 was written, with the value that gives a model saved without
# them the preprocessing it was trained with.
LEGACY_DEFAULTS = {"percentile_inset": 0}


def _help(text: str) -> dict[str, str]:
    """Field metadata: the one-line help that `liverstage crops`, `train` and `experiment` show."""
    return {"help": text}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How crops are cut and normalised.

    crop_size: side of the square crop fed to the model, in pixels.
    box_margin: the square box around the slice's liver region is grown by this fraction of its
        side on every side (the paper's "rough crop": some context around the liver).
    min_area_fraction: a slice yields a crop only if its region area is at least this fraction
        of the largest slice's region area (drops the liver's thin top and bottom slices).
    percentile_low / percentile_high: intensity percentiles, taken inside the region over the
        whole volume, mapped to 0 and 1.
    percentile_inset: the percentiles are taken over the region less this many voxels along its
        in-plane edge (the region's in-plane erosion; the whole region where that would leave
        less than half of it). Why: a mask one voxel wider than the liver adds a ring of fat and
        neighbouring organ that is 10-20 % of the region's voxels, moves its 0.5th percentile by
        half the liver's range and so changes every crop (README: masks that are not the
        training masks). 0 is the behaviour of models made before this field existed.
    clip_low / clip_high: normalised intensities are clipped to this range (keeps the values a
        little beyond the liver's own range, e.g. bright vessels and dark fat, without outliers).
    Each field is checked by its validator in runtime/checks.py.
    """

    crop_size: int = dataclasses.field(default=224, metadata=_help("Crop side in pixels."))
    box_margin: float = dataclasses.field(
        default=0.15, metadata=_help("Box growth per side, fraction of its side."))
    min_area_fraction: float = dataclasses.field(
        default=0.3, metadata=_help("Keep slices whose region area is at least this fraction of the largest."))
    percentile_low: float = dataclasses.field(
        default=0.5, metadata=_help("Percentile inside the region mapped to 0."))
    percentile_high: float = dataclasses.field(
        default=99.5, metadata=_help("Percentile inside the region mapped to 1."))
    percentile_inset: int = dataclasses.field(
        default=3, metadata=_help("In-plane voxels trimmed off the region's edge before its percentiles are taken."))
    clip_low: float = dataclasses.field(
        default=-0.5, metadata=_help("Normalised values below this are raised to it."))
    clip_high: float = dataclasses.field(default=1.5, metadata=_help("Normalised values above this are lowered to it."))
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        # Canonical types, so 0 and 0.0 give the same JSON and the same hash.
        object.__setattr__(self, "crop_size", checks.crop_size(self.crop_size))
        object.__setattr__(self, "box_margin", checks.number(self.box_margin, "box_margin", low=0.0, high=2.0))
        object.__setattr__(self, "min_area_fraction",
                           checks.number(self.min_area_fraction, "min_area_fraction", low=0.0, high=1.0))
        object.__setattr__(self, "percentile_inset", checks.integer(self.percentile_inset, "percentile_inset", low=0, high=16))
        for name in ("percentile_low", "percentile_high", "clip_low", "clip_high"):
            object.__setattr__(self, name, checks.number(getattr(self, name), name))
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise checks.InvalidValue(
                f"need 0 <= percentile_low < percentile_high <= 100, got "
                f"{self.percentile_low!r}, {self.percentile_high!r}"
            )
        if not self.clip_low < self.clip_high:
            raise checks.InvalidValue(f"need clip_low < clip_high, got {self.clip_low!r}, {self.clip_high!r}")
        if self.version != SPEC_VERSION:
            raise checks.InvalidValue(
                f"PreprocessSpec version {self.version!r} is not supported by this liverstage "
                f"(it reads version {SPEC_VERSION})"
            )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The fields a user sets (all but `version`), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "version")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        if not isinstance(data, dict):
            raise ValueError(f"PreprocessSpec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PreprocessSpec field(s): {', '.join(unknown)}")
        return cls(**{**LEGACY_DEFAULTS, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "PreprocessSpec":
        return dataclasses.replace(self, **changes)

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit hash of the canonical JSON (sorted keys, floats as written)."""
        canonical = self.to_json()
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
