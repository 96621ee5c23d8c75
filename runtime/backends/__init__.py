"""Inference backends: one small interface over ONNX Runtime and TensorRT.

`open_backend(path)` picks the backend from the file: a `.engine` file is a TensorRT engine (with
its sidecar `X.engine.json`), anything else must be an ONNX model carrying our metadata. Every
backend exposes the same four things, so predict and bench never care which one runs:

    backend.name       e.g. "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"
    backend.precision  "fp32" | "fp16" | "int8" (from the model's metadata)
    backend.metadata   ModelMetadata (the preprocessing comes only from here)
    backend.run(images float32 [N,1,S,S]) -> {"cosine": [N,C], "probs": [N,C], "embedding": [N,D]}

Device: "cpu" forces the CPU; "cuda" needs a CUDA GPU (BackendUnavailable otherwise); "auto"
takes the fastest present, in this order:
  1. for `X.onnx`, a sibling TensorRT engine `X.engine` whose sidecar says it was built from this
     very ONNX file (same sha256), when TensorRT and a matching GPU are here;
  2. ONNX Runtime's CUDA provider (onnxruntime-gpu and a GPU);
  3. ONNX Runtime on the CPU.
A sibling engine that cannot run here (no TensorRT, no GPU, another GPU) is passed over in
"auto"; asked for by name (`--model X.engine`), the same problem is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendUnavailable, InputError, ModelError
from ..model_meta import INPUT_NAME, OUTPUT_NAMES, ModelMetadata

DEVICES = ("auto", "cpu", "cuda")


class Backend(Protocol):
    name: str
    precision: str
    metadata: ModelMetadata
    path: Path

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def check_images(images: np.ndarray, crop_size: int) -> np.ndarray:
    """Validate a batch before it reaches a backend: float32, C-contiguous, [N, 1, S, S]."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2:] != (crop_size, crop_size) or images.shape[0] < 1:
        raise ValueError(f"expected images of shape [N, 1, {crop_size}, {crop_size}], got {list(images.shape)}")
    return images


def check_io(path: Path, inputs: list[str], input_shape: list, outputs: set[str], crop_size: int) -> None:
    """ModelError unless the graph has our interface: input `image` [N, 1, S, S] (S = the metadata's
    crop size; None or a name for a dynamic dimension) and the outputs cosine, probs, embedding
    (a model of an older liverstage may have more: its gate is refused by runtime/ood.py)."""
    if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= outputs:
        raise ModelError(
            f"{path}: expected input '{INPUT_NAME}' and outputs {', '.join(OUTPUT_NAMES)}, got "
            f"inputs {inputs} and outputs {sorted(outputs)}"
        )
    static = [d for d in input_shape[1:] if isinstance(d, int)]
    if len(input_shape) != 4 or (static and static != [1, crop_size, crop_size][-len(static):]):
        raise ModelError(f"{path}: input shape {input_shape} does not match crop_size {crop_size} from its metadata")


def open_backend(model_path: str | Path, *, device: str = "auto", threads: int | None = None,
                 rebuild_engine: bool = False) -> Backend:
    """Open an exported model for inference; ModelError / BackendUnavailable name the file.

    `rebuild_engine`: an engine built for another TensorRT version or GPU is rebuilt from the ONNX
    model it was built from (named in its sidecar) instead of being refused.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if path.suffix == ".engine":
        if device == "cpu":
            raise BackendUnavailable(f"{path}: a TensorRT engine needs a CUDA GPU; use the .onnx model with --device cpu")
        try:
            from .tensorrt import TensorRTBackend  # noqa: PLC0415  (tensorrt is optional)
        except ImportError as exc:
            raise BackendUnavailable(f"{path}: the TensorRT backend is not available here ({exc})") from None
        return TensorRTBackend(path, rebuild=rebuild_engine)
    if device == "auto" and path.suffix == ".onnx":
        engine = sibling_engine(path)
        if engine is not None:
            return engine
    from .onnx import OnnxBackend  # noqa: PLC0415  (onnxruntime imported only when needed)

    return OnnxBackend(path, device=device, threads=threads)


def sibling_engine(onnx_path: Path):
    """The TensorRT backend of `X.engine` beside `X.onnx` if it was built from this file and runs here, else None."""
    engine_path = onnx_path.with_suffix(".engine")
    if not engine_path.is_file():
        return None
    try:
        from ..provenance import file_sha256  # noqa: PLC0415
        from .tensorrt import TensorRTBackend, read_sidecar  # noqa: PLC0415

        key, _ = read_sidecar(engine_path)
        if key.get("onnx_sha256") != file_sha256(onnx_path):
            return None  # built from another (older) export: not this model
        return TensorRTBackend(engine_path)
    except (ImportError, BackendUnavailable, ModelError, InputError):
        return None
