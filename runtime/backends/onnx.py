"""ONNX Runtime backend (CPU, or CUDA with onnxruntime-gpu).

The model must carry our metadata (`metadata_props["liverstage"]`), an input `image` and the
outputs `cosine`, `probs`, `embedding`; anything else is a ModelError naming the file. Threads:
`threads` sets ONNX Runtime's intra-op thread pool (None = its default, one per core); the
inter-op pool is 1 because the graph is one sequential chain.

Spinning is off: by default ONNX Runtime's idle workers busy-wait after each run, which on a
small CPU takes the cores away from the loading/cropping that predict overlaps with inference.
Measured on the 2-core machine (ResNet18, 224 px, 40-slice phantom): end-to-end / model-only
time 1.30-1.35 with spinning, 1.03-1.15 without, and model-only time no slower.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ModelError
from ..model_meta import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, ModelMetadata
from . import check_images, check_io


def _import_ort():
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError:
        raise BackendUnavailable(
            "onnxruntime is not installed: pip install 'liverstage[cpu]' (or [gpu] for onnxruntime-gpu)"
        ) from None
    return ort


def choose_providers(device: str, available: list[str]) -> list[str]:
    """ONNX Runtime providers for `device`, fastest first; BackendUnavailable if cuda is asked but absent."""
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda":
        if not has_cuda:
            raise BackendUnavailable(
                "--device cuda needs onnxruntime-gpu and a CUDA GPU; this onnxruntime offers only "
                + ", ".join(available)
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackend:
    """One onnxruntime InferenceSession over an exported liverstage model."""

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None) -> None:
        ort = _import_ort()
        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # errors only: keep the CLI output clean
        providers = choose_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            reason = " ".join(str(exc).split())[:200]
            raise ModelError(f"{self.path}: not an ONNX model or TensorRT engine ({reason})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise ModelError(
                f"{self.path}: ONNX model without liverstage metadata (export it with `liverstage export`)"
            )
        self.metadata = ModelMetadata.from_json(raw, source=str(self.path))
        self.precision = self.metadata.precision
        used = self.session.get_providers()
        self.name = "onnxruntime-cuda" if used and used[0] == "CUDAExecutionProvider" else "onnxruntime-cpu"
        self.threads = threads
        self._check_io()

    def _check_io(self) -> None:
        inputs = self.session.get_inputs()
        check_io(self.path, [i.name for i in inputs], list(inputs[0].shape),
                 {o.name for o in self.session.get_outputs()}, self.metadata.preprocess.crop_size)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = check_images(images, self.metadata.preprocess.crop_size)
        values = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return dict(zip(OUTPUT_NAMES, values))
