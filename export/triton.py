"""A Triton Inference Server model repository for an exported ONNX model.

Layout (Triton's model repository convention):
    REPO/<model_name>/config.pbtxt
    REPO/<model_name>/1/model.onnx
platform onnxruntime_onnx, dynamic batching, input `image` [1, S, S] and outputs cosine [C],
probs [C] and embedding [D] (Triton adds the batch dimension itself when max_batch_size > 0).
The preprocessing stays in the ONNX metadata (`liverstage` key): a client cuts crops with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from liverstage.runtime.atomic import atomic_dir
from liverstage.runtime.model_meta import ModelMetadata

MODEL_FILE = "model.onnx"


def config_pbtxt(*, model_name: str, meta: ModelMetadata, max_batch_size: int,
                 preferred_batch_sizes: list[int]) -> str:
    """The config.pbtxt text for this model."""
    size = meta.preprocess.crop_size
    classes = len(meta.class_names)
    preferred = ", ".join(str(b) for b in sorted(set(preferred_batch_sizes)) if 0 < b <= max_batch_size)
    return f'''name: "{model_name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "image"
    data_type: TYPE_FP32
    dims: [ 1, {size}, {size} ]
  }}
]
output [
  {{
    name: "cosine"
    data_type: TYPE_FP32
    dims: [ {classes} ]
  }},
  {{
    name: "probs"
    data_type: TYPE_FP32
    dims: [ {classes} ]
  }},
  {{
    name: "embedding"
    data_type: TYPE_FP32
    dims: [ {meta.embedding_dim} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
parameters {{
  key: "liverstage_precision"
  value: {{ string_value: "{meta.precision}" }}
}}
'''


def valid_model_name(name: str) -> bool:
    return bool(name) and all(ch.isalnum() or ch in "-_." for ch in name) and not name.startswith(".")


def write_repository(root: Path, name: str, *, model_bytes: bytes, config_text: str,
                     write_extras: Callable[[Path], None] | None = None) -> Path:
    """Write ROOT/<name>/{config.pbtxt, 1/model.onnx} (+ extras) as one atomic folder.

    `write_extras(folder)` adds files (parity report, model card) inside the same temporary
    folder, so a failure or a kill at any point leaves no partial model folder behind.
    Returns ROOT/<name>.
    """
    with atomic_dir(Path(root) / name) as tmp:
        (tmp / "1").mkdir()
        (tmp / "1" / MODEL_FILE).write_bytes(model_bytes)
        (tmp / "config.pbtxt").write_text(config_text, encoding="utf-8")
        if write_extras is not None:
            write_extras(tmp)
    return Path(root) / name
