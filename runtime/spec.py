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

SPEC_VERSION = 1


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
    clip_low / clip_high: normalised intensities are clipped to this range (keeps the values a
        little beyond the liver's own range, e.g. bright vessels and dark fat, without outliers).
    """

    crop_size: int = 224
    box_margin: float = 0.15
    min_area_fraction: float = 0.3
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    clip_low: float = -0.5
    clip_high: float = 1.5
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        # Normalise numeric types so 0 and 0.0 give the same JSON and the same hash.
        for name in ("box_margin", "min_area_fraction", "percentile_low", "percentile_high", "clip_low", "clip_high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.crop_size, int) or isinstance(self.crop_size, bool) or not 8 <= self.crop_size <= 2048:
            raise ValueError(f"crop_size must be an integer in [8, 2048], got {self.crop_size!r}")
        if not 0.0 <= float(self.box_margin) <= 2.0:
            raise ValueError(f"box_margin must be in [0, 2], got {self.box_margin!r}")
        if not 0.0 <= float(self.min_area_fraction) <= 1.0:
            raise ValueError(f"min_area_fraction must be in [0, 1], got {self.min_area_fraction!r}")
        if not 0.0 <= float(self.percentile_low) < float(self.percentile_high) <= 100.0:
            raise ValueError(
                f"need 0 <= percentile_low < percentile_high <= 100, got "
                f"{self.percentile_low!r}, {self.percentile_high!r}"
            )
        if not float(self.clip_low) < float(self.clip_high):
            raise ValueError(f"need clip_low < clip_high, got {self.clip_low!r}, {self.clip_high!r}")
        if self.version != SPEC_VERSION:
            raise ValueError(
                f"PreprocessSpec version {self.version!r} is not supported by this liverstage "
                f"(it reads version {SPEC_VERSION})"
            )

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
        return cls(**data)

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
