"""Plain OpenVINO on an exported .onnx file, as its documentation shows it: the reference that
the `openvino*` rows of `liverstage bench` are held against (each should reach >= 95 % of it).

    python benchmarks/openvino_plain.py MODEL.onnx [--precision fp32|bf16] [--batch 16]
                                        [--threads N] [--warmup 3] [--iters 20]

No liverstage code: read_model, compile_model for the CPU with the latency hint and the given
inference precision (f32 for fp32 and for an int8 QDQ file, as liverstage runs them), one infer
request, random inputs, the median time per batch. The telemetry package that `import openvino`
pulls in is kept from loading, as liverstage does (no network access at any point).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


class PlainOpenVINO:
    """One compiled model and one infer request, nothing else."""

    def __init__(self, model: str, *, precision: str = "fp32", threads: int | None = None) -> None:
        sys.modules.setdefault("openvino_telemetry", None)
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(model), "CPU", config)
        self.crop_size = self.compiled.inputs[0].get_partial_shape()[2].get_length()
        self.request = self.compiled.create_infer_request()

    def run(self, images: np.ndarray) -> None:
        self.request.infer({0: images})


def plain_openvino_p50(model: str, *, precision: str = "fp32", batch: int = 16, threads: int | None = None,
                       warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per batch of `model` under plain OpenVINO."""
    plain = PlainOpenVINO(model, precision=precision, threads=threads)
    images = np.random.default_rng(0).standard_normal((batch, 1, plain.crop_size, plain.crop_size)).astype(np.float32)
    for _ in range(warmup):
        plain.run(images)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        plain.run(images)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    p50 = plain_openvino_p50(args.model, precision=args.precision, batch=args.batch, threads=args.threads,
                             warmup=args.warmup, iters=args.iters)
    print(f"plain OpenVINO {args.precision}, batch {args.batch}: p50 {p50 * 1e3:.1f} ms, {args.batch / p50:.1f} crops/s")


if __name__ == "__main__":
    main()
