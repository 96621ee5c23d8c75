"""OpenVINO bf16 against OpenVINO fp32 on the export's parity crops: the record that `auto`
precision reads (`metadata.extra["openvino_bf16"]`, see runtime/backends/choice.py).

Measured only for an fp32 ONNX export, when OpenVINO is installed. On a CPU without native bf16
the record says so instead of holding figures, and the runtime then keeps fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from liverstage.runtime.backends.choice import BF16_MAX_ABS_DELTA_COSINE, BF16_MIN_STAGE_AGREEMENT, bf16_allowed
from liverstage.runtime.model_meta import OUTPUT_NAMES

BATCH = 32


def _outputs(backend, images: np.ndarray) -> dict[str, np.ndarray]:
    parts = [backend.run(images[start:start + BATCH]) for start in range(0, len(images), BATCH)]
    return {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_NAMES}


def measure_bf16(model_bytes: bytes, images: np.ndarray, labels: np.ndarray | None, *,
                 echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The bf16 record for this fp32 model, or None without OpenVINO (then nothing is recorded)."""
    from liverstage.runtime.backends.openvino import (  # noqa: PLC0415
        OpenVINOBackend, cpu_identity, import_openvino, native_bf16, openvino_installed)

    from . import parity  # noqa: PLC0415

    if not openvino_installed():
        echo("OpenVINO bf16: not measured (OpenVINO is not installed; `auto` precision will keep fp32)")
        return None
    version = import_openvino().get_version()
    if not native_bf16():
        echo("OpenVINO bf16: not measured (this CPU has no native bf16)")
        return {"reason": "the export ran on a CPU without native bf16", "openvino": version}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model_bytes)
        fp32 = _outputs(OpenVINOBackend(path, precision="fp32", cache=False), images)
        bf16 = _outputs(OpenVINOBackend(path, precision="bf16", cache=False), images)
    figures = parity.compare(fp32, bf16, labels=labels)
    record = {key: figures[key] for key in ("n_crops", "finite", "max_abs_delta_cosine", "mean_abs_delta_cosine",
                                           "stage_agreement", "disagreements", "accuracy_delta") if key in figures}
    record.update({
        "allowed": bf16_allowed(record),
        "rule": {"min_stage_agreement": BF16_MIN_STAGE_AGREEMENT, "max_abs_delta_cosine": BF16_MAX_ABS_DELTA_COSINE},
        "reference": "openvino fp32", "openvino": version, "cpu": cpu_identity(),
    })
    accuracy = (f", accuracy delta {100 * record['accuracy_delta']:+.2f} points"
                if "accuracy_delta" in record else "")
    echo(f"OpenVINO bf16 vs fp32 ({record['n_crops']} parity crops): max |delta cosine| "
         f"{record['max_abs_delta_cosine']:.3g}, stage agreement {record['stage_agreement']:.2%}{accuracy}: "
         + ("bf16 allowed" if record["allowed"] else "bf16 NOT allowed (auto keeps fp32)"))
    return record
