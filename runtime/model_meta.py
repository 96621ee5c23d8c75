"""ModelMetadata: what every exported model carries (ONNX `metadata_props["liverstage"]`, and the
JSON sidecar of a TensorRT engine).

The export side writes it, the runtime, bench and Triton export read it. Preprocessing is taken
only from here, never configured twice.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .errors import ModelError
from .spec import PreprocessSpec
from .stages import STAGES

METADATA_KEY = "liverstage"
METADATA_FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAMES = ("cosine", "probs", "embedding")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """Everything needed to run an exported model and to explain its answer.

    probs_source: "cosine" when probs = softmax(scale * cosine / temperature) (angular losses), or
        "linear" when probs come from the softmax baseline's linear classifier (Eq. 1).
    ood: the out-of-distribution gate (runtime/ood.py: banks, thresholds, how they were fitted),
        fitted at export; None for a model exported without one (its results are all uncertain).
        Older models' `cosine_threshold` and `early_stats_dim` are read and ignored.
    """

    class_names: tuple[str, ...]
    preprocess: PreprocessSpec
    backbone: str
    loss: str
    scale: float
    margin: float
    temperature: float
    probs_source: str
    precision: str
    embedding_dim: int
    checkpoint_sha256: str
    versions: dict[str, str]
    ood: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = METADATA_FORMAT_VERSION

    def __post_init__(self) -> None:
        if tuple(self.class_names) != STAGES:
            raise ValueError(f"class_names must be {list(STAGES)}, got {list(self.class_names)}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.probs_source not in ("cosine", "linear"):
            raise ValueError(f"probs_source must be 'cosine' or 'linear', got {self.probs_source!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.ood is not None and not isinstance(self.ood, dict):
            raise ValueError(f"ood must be a JSON object or null, got {type(self.ood).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names)
        out["preprocess"] = self.preprocess.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "model") -> "ModelMetadata":
        """Parse and validate; any problem is a ModelError naming `source`."""
        try:
            if not isinstance(data, dict):
                raise ValueError("metadata is not a JSON object")
            if data.get("format_version") != METADATA_FORMAT_VERSION:
                raise ValueError(f"unsupported metadata format_version {data.get('format_version')!r}")
            fields = {f.name for f in dataclasses.fields(cls)}
            missing = sorted(f.name for f in dataclasses.fields(cls)
                             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                             and f.name not in data)
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            kwargs = {k: v for k, v in data.items() if k in fields}
            kwargs["preprocess"] = PreprocessSpec.from_dict(data["preprocess"])
            return cls(**kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"{source}: invalid liverstage metadata ({exc})") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "model") -> "ModelMetadata":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{source}: liverstage metadata is not valid JSON ({exc.msg})") from None
        return cls.from_dict(data, source=source)

    def replace(self, **changes: Any) -> "ModelMetadata":
        return dataclasses.replace(self, **changes)
