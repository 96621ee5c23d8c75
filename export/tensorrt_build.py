"""`--engine trt`: build a TensorRT 11 engine from the exported ONNX model and check it.

The builder itself lives in liverstage.runtime.backends.tensorrt.build_engine (it needs only
tensorrt, so a deployment machine can rebuild an engine from the ONNX file without torch). Here:
build it over the requested batch profile, load it with the runtime's TensorRTBackend, and
compare its outputs with PyTorch fp32 on the same crops as the ONNX parity check.

TensorRT 11 networks are strongly typed: an FP16 engine comes from the FP16 ONNX model (its
float32 head kept by explicit Casts), INT8 from the QDQ model; no precision flags are set.
This path is written against the TensorRT 11 documentation and has not run in CI (no GPU there).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def build_and_check(onnx_path: Path, engine_path: Path, *, metadata, reference: dict, images: np.ndarray,
                    labels: np.ndarray | None, options, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the engine (with sidecar), run it on `images`, return parity figures incl. crops/s."""
    from liverstage.runtime.backends.tensorrt import TensorRTBackend, build_engine  # noqa: PLC0415

    from .parity import compare  # noqa: PLC0415

    echo(f"building TensorRT engine (batch {options.batch_min}/{options.batch_opt}/{options.batch_max}) ...")
    start = time.perf_counter()
    key = build_engine(onnx_path, engine_path, metadata=metadata, batch_min=options.batch_min,
                       batch_opt=options.batch_opt, batch_max=options.batch_max)
    build_s = time.perf_counter() - start
    backend = TensorRTBackend(engine_path)
    try:
        backend.run(images[: options.batch_opt])  # warm-up
        start = time.perf_counter()
        outputs = backend.run(images)
        run_s = time.perf_counter() - start
    finally:
        backend.close()
    figures = compare(reference, outputs, labels=labels)
    figures.update({"runtime": "tensorrt", "build_seconds": build_s,
                    "crops_per_second": len(images) / run_s if run_s > 0 else None, "key": key})
    return figures
