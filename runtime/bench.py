"""`liverstage bench`: how fast an exported model runs here, against references from the same run.

Per backend and batch size: latency p50 / p90 / p99 per batch, crops/s, speed-up against PyTorch
eager fp32 (only where torch is installed; the caller passes that reference in, so the runtime
never imports torch), achieved GFLOP/s against this machine's float32 matrix-multiply peak (numpy,
measured in the same run), and with `input_volume`, model-only time against end-to-end time
(volume in, report out). For a
model with an out-of-distribution gate, the gate's time on each batch's outputs and its share of
the model-only time (the gate runs in numpy after the backend, whichever backend it is).

Backends:
  onnx       the fp32 (or whatever) .onnx given as the model, ONNX Runtime
  onnx-int8  `int8_model`, else the sibling `X.int8.onnx` of `X.onnx`; skipped if neither exists
  openvino, openvino-bf16, openvino-int8
             OpenVINO on the CPU (latency hint): the fp32 model in fp32 and in bf16 (skipped on a
             CPU without native bf16), and the int8 model; skipped without OpenVINO
  trt        `engine`, else the sibling `X.engine`; skipped without TensorRT / a GPU
  torch      PyTorch eager fp32 from the checkpoint (`checkpoint`, else
             metadata.extra["checkpoint_path"]), built by `torch_reference` (the CLI passes
             TorchEager from the train package's reference module); skipped without it or a checkpoint
A skipped backend is a row with `skipped` saying why, never an error.

FLOPs: counted once per crop from the ONNX graph's Conv / Gemm / MatMul shapes after onnx shape
inference (2 x multiply-accumulates); n/a if the onnx package is not installed or a shape is not
known. Every backend runs the same network, so the same count is used for all of them.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .backends.choice import sibling_file as sibling  # X.onnx -> X.int8.onnx, X.engine
from .errors import InputError, LiverstageError

BACKENDS = ("onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8", "trt", "torch")
OPENVINO_ROWS = {"openvino": "fp32", "openvino-bf16": "bf16", "openvino-int8": "int8"}


# -- timing core -----------------------------------------------------------------------------------
def percentiles(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50 / p90 / p99 / mean of a list of durations (seconds), linear interpolation."""
    a = np.asarray(samples_s, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean())}


def time_calls(fn: Callable[[], object], *, warmup: int, iters: int) -> list[float]:
    """Call fn `warmup` times untimed, then `iters` times, returning each call's duration (s)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak_gflops(n: int = 1024, repeats: int = 15) -> float:
    """This machine's float32 matrix-multiply rate (numpy/BLAS), best of `repeats`, in GFLOP/s.

    Best of many short runs: on a machine shared with other work most runs are interrupted, and
    the peak is what an uninterrupted one reaches.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread pool start
    best = min(time_calls(lambda: a @ b, warmup=0, iters=repeats))
    return 2.0 * n**3 / best / 1e9


def blas_info() -> str:
    """numpy's BLAS (name, version, kernel target) as one line, or 'unknown'."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # noqa: BLE001  (older numpy: no dict mode)
        return "unknown"
    config = blas.get("openblas configuration", "")
    return " ".join(str(v) for v in (blas.get("name"), blas.get("version"), config) if v)


# -- FLOP counting ---------------------------------------------------------------------------------
def count_flops(onnx_path: str | Path) -> float | None:
    """FLOPs per crop (batch 1) of Conv/ConvTranspose/Gemm/MatMul nodes; None if unknown."""
    try:
        import onnx  # noqa: PLC0415
        from onnx import shape_inference  # noqa: PLC0415
    except ImportError:
        return None
    try:
        model = onnx.load(str(onnx_path))
        graph = model.graph
        init_names = {i.name for i in graph.initializer}
        for inp in graph.input:
            if inp.name in init_names:
                continue
            dims = inp.type.tensor_type.shape.dim
            if dims:
                dims[0].ClearField("dim_param")
                dims[0].dim_value = 1
        del graph.value_info[:]
        for out in graph.output:  # drop declared symbolic dims so inference fills them in
            out.type.tensor_type.ClearField("shape")
        model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001  (an unusual graph: say n/a rather than fail the bench)
        return None
    shapes: dict[str, list[int] | None] = {}

    def record(vi) -> None:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            shapes[vi.name] = None
            return
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shapes[vi.name] = None if any(d is None for d in dims) else dims

    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        record(vi)
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    total = 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger",
                                "QLinearConv", "QLinearMatMul"):
            continue
        if node.op_type == "QLinearConv":
            a_name, w_name = node.input[0], node.input[3]
        elif node.op_type == "QLinearMatMul":
            a_name, w_name = node.input[0], node.input[3]
        else:
            a_name, w_name = node.input[0], node.input[1]
        out, w, a = shapes.get(node.output[0]), shapes.get(w_name), shapes.get(a_name)
        if out is None or w is None or a is None:
            return None
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            total += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))          # Cin/g * kh * kw per output
        elif node.op_type == "ConvTranspose":
            total += 2.0 * float(np.prod(a)) * float(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            total += 2.0 * float(np.prod(out)) * float(k)
        else:  # MatMul family: out [..., M, N], K = a[-1]
            total += 2.0 * float(np.prod(out)) * float(a[-1])
    return total


# -- backends --------------------------------------------------------------------------------------

def runner_device(runner) -> str:
    """'cuda' for backends that run on the GPU (ONNX Runtime CUDA, TensorRT), else 'cpu'."""
    return "cuda" if runner.name in ("onnxruntime-cuda", "tensorrt", "torch-eager-cuda") else "cpu"


@dataclasses.dataclass
class BenchConfig:
    model: Path
    backends: tuple[str, ...] = ("onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8", "trt", "torch")
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 3
    iters: int = 20
    threads: int | None = None
    device: str = "cpu"
    input_volume: Path | None = None
    int8_model: Path | None = None
    engine: Path | None = None
    checkpoint: Path | None = None
    # (checkpoint, threads, device) -> runner: the PyTorch eager reference (TorchEager of the train
    # package's reference module, passed in by the bench command where torch is installed; None: the torch row is skipped)
    torch_reference: Callable[[Path, int | None, str], object] | None = None

    def validate(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise InputError(f"--backends: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise InputError(f"--batch-sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.warmup < 0 or self.iters < 1:
            raise InputError(f"need --warmup >= 0 and --iters >= 1, got {self.warmup} and {self.iters}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        if not self.model.is_file():
            raise InputError(f"model file not found: {self.model}")
        if self.input_volume is not None and not self.input_volume.exists():
            raise InputError(f"--input not found: {self.input_volume}")


def _open(kind: str, cfg: BenchConfig, metadata, *, torch_device: str = "cpu"):
    """(runner, path, skipped reason). Never raises for an absent optional backend."""
    from .backends import open_backend  # noqa: PLC0415

    try:
        if kind == "onnx":
            if cfg.model.suffix == ".engine":
                return None, cfg.model, "the model is an engine; give the .onnx for the onnx backend"
            return open_backend(cfg.model, device=cfg.device, threads=cfg.threads), cfg.model, None
        if kind == "onnx-int8":
            path = cfg.int8_model or sibling(cfg.model, ".int8.onnx")
            if not path.is_file():
                return None, path, f"no int8 model ({path} not found; give --int8-model)"
            return open_backend(path, device=cfg.device, threads=cfg.threads), path, None
        if kind in OPENVINO_ROWS:
            return _open_openvino(kind, cfg)
        if kind == "trt":
            path = cfg.engine or (cfg.model if cfg.model.suffix == ".engine" else sibling(cfg.model, ".engine"))
            if not path.is_file():
                return None, path, f"no TensorRT engine ({path} not found; give --engine)"
            return open_backend(path, device="cuda"), path, None
        # torch: the optional PyTorch eager reference, built by the factory the caller passed in
        path = cfg.checkpoint or (Path(metadata.extra["checkpoint_path"]) if metadata.extra.get("checkpoint_path") else None)
        if cfg.torch_reference is None:
            return None, path, "torch is not installed (the PyTorch eager reference needs the train extra)"
        if path is None or not path.is_file():
            return None, path, f"no torch checkpoint ({path or 'none named in the metadata'}; give --checkpoint)"
        return cfg.torch_reference(path, cfg.threads, torch_device), path, None
    except ImportError as exc:
        return None, None, f"{kind} is not available here ({exc})"
    except LiverstageError as exc:
        return None, None, " ".join(str(exc).split())


def _open_openvino(kind: str, cfg: BenchConfig):
    from .backends.openvino import OpenVINOBackend  # noqa: PLC0415

    precision = OPENVINO_ROWS[kind]
    if cfg.model.suffix == ".engine":
        return None, cfg.model, "the model is an engine; give the .onnx for the OpenVINO backend"
    path = (cfg.int8_model or sibling(cfg.model, ".int8.onnx")) if precision == "int8" else cfg.model
    if not path.is_file():
        return None, path, f"no int8 model ({path} not found; give --int8-model)"
    return OpenVINOBackend(path, precision=precision, threads=cfg.threads), path, None


def _batch(images: np.ndarray, n: int) -> np.ndarray:
    reps = int(np.ceil(n / len(images)))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:n])


def gate_cost(runner, batch: np.ndarray, model_p50_s: float, *, warmup: int, iters: int) -> dict:
    """p50 time of the out-of-distribution gate (runtime/ood.py) on this batch's model outputs, and
    its share of the model's own p50; None for a runner without a gate (the PyTorch reference)."""
    from .ood import OodGate  # noqa: PLC0415

    metadata = getattr(runner, "metadata", None)
    gate = OodGate.from_metadata(metadata) if metadata is not None else None
    if gate is None:
        return {"ood_gate_ms": None, "ood_gate_fraction": None}
    outputs = runner.run(batch)
    gate_s = percentiles(time_calls(lambda: gate.judge(gate.scores(outputs, batch)), warmup=warmup, iters=iters))["p50"]
    return {"ood_gate_ms": gate_s * 1e3, "ood_gate_fraction": gate_s / model_p50_s}


def run_bench(cfg: BenchConfig, *, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every requested backend at every batch size; return the JSON-ready result."""
    from .backends import open_backend  # noqa: PLC0415
    from .ood import gate_kernels  # noqa: PLC0415

    cfg.validate()
    reference = open_backend(cfg.model, device=cfg.device if cfg.model.suffix != ".engine" else "auto",
                             threads=cfg.threads)
    meta = reference.metadata
    size = meta.preprocess.crop_size
    crops = None
    if cfg.input_volume is not None:
        from .predict import Predictor  # noqa: PLC0415

        crops = Predictor(reference, roi="auto").prepare(cfg.input_volume).images
    images = crops if crops is not None else np.random.default_rng(0).standard_normal((max(cfg.batch_sizes), 1, size, size)).astype(np.float32)

    log("measuring the float32 matmul peak (numpy; again at the end) ...")
    peak = matmul_peak_gflops()
    flops = count_flops(cfg.model) if cfg.model.suffix == ".onnx" else None
    rows: list[dict] = []
    opened = []  # (kind, runner, path) of the backends under test, in the order asked
    for kind in (b for b in cfg.backends if b != "torch"):
        runner, path, skipped = _open(kind, cfg, meta)
        if runner is None:
            rows.append({"backend": kind, "model": str(path) if path else None, "skipped": skipped})
            log(f"{kind}: skipped ({skipped})")
        else:
            opened.append((kind, runner, path))
    # The PyTorch reference runs on each device a backend under test runs on (the GPU for
    # TensorRT, so its speed-up is against PyTorch on the same GPU); alone, on --device.
    if "torch" in cfg.backends:
        devices = sorted({runner_device(r) for _, r, _ in opened}) or (["cuda"] if cfg.device == "cuda" else ["cpu"])
        for device in devices:
            runner, path, skipped = _open("torch", cfg, meta, torch_device=device)
            if runner is None:
                rows.append({"backend": "torch", "model": str(path) if path else None, "skipped": skipped})
                log(f"torch: skipped ({skipped})")
            else:
                opened.insert(0, ("torch", runner, path))  # the references first, for the speed-ups
    torch_p50: dict[tuple[str, int], float] = {}
    for kind, runner, path in opened:
        device = runner_device(runner)
        for bs in cfg.batch_sizes:
            batch = _batch(images, bs)
            log(f"{kind} ({device}): batch {bs} ({cfg.warmup} warm-up + {cfg.iters} timed runs) ...")
            stats = percentiles(time_calls(lambda: runner.run(batch), warmup=cfg.warmup, iters=cfg.iters))
            row = {"backend": kind, "runner": runner.name, "device": device, "model": str(path),
                   "precision": runner.precision, "batch_size": bs, "skipped": None,
                   **{f"{k}_ms": v * 1e3 for k, v in stats.items()},
                   "crops_per_s": bs / stats["p50"]}
            if kind == "torch":
                torch_p50[device, bs] = stats["p50"]
            torch_s = torch_p50.get((device, bs))
            row["speedup_vs_torch"] = torch_s / stats["p50"] if torch_s else None
            row.update(gate_cost(runner, batch, stats["p50"], warmup=cfg.warmup, iters=cfg.iters))
            row["gflops"] = flops * bs / stats["p50"] / 1e9 if flops else None
            # The matmul peak is the CPU's; a GPU row's share of it would mean nothing.
            row["fraction_of_peak"] = row["gflops"] / peak if row["gflops"] and device == "cpu" else None
            rows.append(row)

    # Again after the backends, keeping the higher: on a shared machine one reading can be low.
    peak = max(peak, matmul_peak_gflops())
    for row in rows:
        if row.get("gflops") and row.get("device") == "cpu":
            row["fraction_of_peak"] = row["gflops"] / peak
    result = {
        "liverstage_version": __version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": cfg.threads, "device": cfg.device,
                    "matmul_peak_gflops": peak, "matmul_blas": blas_info(), "ood_gate_kernels": gate_kernels()},
        "model": {"path": str(cfg.model), "backbone": meta.backbone, "crop_size": size, "precision": meta.precision},
        "flops_per_crop": flops,
        "warmup": cfg.warmup,
        "iters": cfg.iters,
        "inputs": "crops of " + str(cfg.input_volume) if crops is not None else "random crops (seed 0)",
        "results": rows,
        "end_to_end": end_to_end(cfg, reference, log=log) if cfg.input_volume is not None else None,
    }
    return result


def end_to_end(cfg: BenchConfig, backend, *, log: Callable[[str], None] = lambda s: None,
               batch_size: int | None = None, mask: Path | None = None) -> dict:
    """Median time of predict (volume in, report written) against model-only time of its crops.

    The region is `mask` if given, else `--roi auto` (bench's --input has no mask option).
    """
    from .predict import Predictor  # noqa: PLC0415
    from .report import write_report  # noqa: PLC0415

    bs = batch_size or max(cfg.batch_sizes)
    predictor = Predictor(backend, batch_size=bs, mask=mask, roi=None if mask is not None else "auto")
    images = predictor.prepare(cfg.input_volume).images
    repeats = max(3, min(cfg.iters, 10))
    log(f"end-to-end on {cfg.input_volume}: {len(images)} crops, batch {bs}, 1 warm-up + {repeats} runs ...")

    def model_only() -> None:
        for start in range(0, len(images), bs):
            backend.run(images[start:start + bs])

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"

        def e2e() -> None:
            run = predictor.run([cfg.input_volume])
            if run.errors:
                raise InputError(run.errors[0][1])
            write_report(report, run)

        # Interleaved, so both see the same machine load (a shared machine drifts over a run).
        e2e(), model_only()
        e2e_t, model_t = [], []
        for _ in range(repeats):
            e2e_t += time_calls(e2e, warmup=0, iters=1)
            model_t += time_calls(model_only, warmup=0, iters=1)
    e2e_s, model_s = percentiles(e2e_t)["p50"], percentiles(model_t)["p50"]
    return {"input": str(cfg.input_volume), "crops": int(len(images)), "batch_size": bs, "repeats": repeats,
            "model_only_s": model_s, "end_to_end_s": e2e_s, "ratio": e2e_s / model_s}
