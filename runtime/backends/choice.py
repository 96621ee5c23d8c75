"""Which backend and precision run a model: `choose_backend`, shared by `predict` and `serve`.

Options (the CLI's `--backend`, `--precision`, `--device`, `--threads`, `--hint`):
  backend    auto | onnx (ONNX Runtime) | openvino (OpenVINO, CPU) | trt (TensorRT engine)
  precision  auto | fp32 | bf16 | int8
             int8 runs the sibling `X.int8.onnx` of `X.onnx` (or the int8 file given), after checking
             that both come from the same checkpoint; bf16 runs the fp32 file with OpenVINO's bf16
             arithmetic and needs a CPU with native bf16; asked for by name it is refused when the
             model's parity record says bf16 changes its answers too much, and runs with a note
             when the model has no record.
  hint       latency | throughput (OpenVINO only)

`auto` backend: a GPU first where one is asked for or present (a sibling TensorRT engine built
from this file, then ONNX Runtime CUDA), else OpenVINO on the CPU where it is installed, else
ONNX Runtime on the CPU. `auto` precision: the file's own precision, except that OpenVINO runs
an fp32 file in bf16 when the CPU has native bf16 and the model's own parity record allows it:
export measured OpenVINO bf16 against OpenVINO fp32 on its parity crops and stored the figures
under `metadata.extra["openvino_bf16"]`; bf16 is allowed when the stage agreement is at least
99.5 % and max |delta cosine| at most 0.02. A model without that record runs in fp32. int8 is
never chosen by `auto`: it is a different file, with a looser parity target, that the user
names.

The backend returned carries `reason`: one line saying what runs and why (the report's
`model.reason`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BackendUnavailable, InputError, ModelError
from ..model_meta import ModelMetadata
from . import DEVICES, Backend, open_backend, sibling_engine

BACKEND_CHOICES = ("auto", "onnx", "openvino", "trt")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8")
HINT_CHOICES = ("latency", "throughput")
BF16_RECORD_KEY = "openvino_bf16"
BF16_MIN_STAGE_AGREEMENT = 0.995
BF16_MAX_ABS_DELTA_COSINE = 0.02
INT8_SUFFIX = ".int8.onnx"


def sibling_file(path: Path, suffix: str) -> Path:
    """X.onnx -> X<suffix> (e.g. X.int8.onnx, X.engine)."""
    name = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
    return path.with_name(name + suffix)


def bf16_allowed(record) -> bool:
    """The rule: bf16 may replace fp32 when it changes no more than this on the parity crops."""
    try:
        return (float(record["stage_agreement"]) >= BF16_MIN_STAGE_AGREEMENT
                and float(record["max_abs_delta_cosine"]) <= BF16_MAX_ABS_DELTA_COSINE)
    except (KeyError, TypeError, ValueError):
        return False


def bf16_verdict(metadata: ModelMetadata) -> tuple[str, str]:
    """("allowed" | "refused" | "unmeasured", why) from the model's own bf16 parity record."""
    record = metadata.extra.get(BF16_RECORD_KEY)
    if not isinstance(record, dict) or "stage_agreement" not in record:
        why = record.get("reason") if isinstance(record, dict) and record.get("reason") else (
            "export it with OpenVINO installed to measure bf16")
        return "unmeasured", f"the model has no bf16 parity record ({why})"
    figures = (f"stage agreement {100 * float(record['stage_agreement']):.2f} % (>= {100 * BF16_MIN_STAGE_AGREEMENT:g} %), "
               f"max |delta cosine| {float(record['max_abs_delta_cosine']):.3g} (<= {BF16_MAX_ABS_DELTA_COSINE:g}) "
               f"on {record.get('n_crops', '?')} parity crops")
    if bf16_allowed(record):
        return "allowed", f"its parity record allows bf16: {figures}"
    return "refused", f"its parity record does not allow bf16: needs {figures}"


def validate_choice(backend: str, precision: str, device: str, threads, hint: str) -> None:
    """InputError for an unknown or contradictory option, before any file is opened."""
    for option, value, allowed in (("--backend", backend, BACKEND_CHOICES), ("--precision", precision, PRECISION_CHOICES),
                                   ("--device", device, DEVICES), ("--hint", hint, HINT_CHOICES)):
        if value not in allowed:
            raise InputError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"--threads must be a positive integer, got {threads!r}")
    if backend == "openvino" and device == "cuda":
        raise InputError("--backend openvino runs on the CPU; use --device cpu or auto")
    if backend == "trt" and device == "cpu":
        raise InputError("--backend trt needs a CUDA GPU; it cannot run with --device cpu")
    if backend == "trt" and precision != "auto":
        raise InputError("--precision does not apply to --backend trt: an engine has the precision it was built with")
    if backend == "onnx" and precision == "bf16":
        raise InputError("--precision bf16 needs OpenVINO (ONNX Runtime has no bf16 CPU kernels): use --backend openvino or auto")


def _model_file(path: Path, precision: str) -> Path:
    """The file that runs: the int8 sibling for --precision int8, else the file given."""
    if precision != "int8" or path.name.endswith(INT8_SUFFIX):
        return path
    int8 = sibling_file(path, INT8_SUFFIX)
    if not int8.is_file():
        raise ModelError(f"{path}: --precision int8 needs the int8 model {int8.name} beside it "
                         "(liverstage export ... --precision int8)")
    return int8


def _check(backend, precision: str, given: Path, given_metadata) -> None:
    """The file that ran has the precision asked for, and an int8 sibling comes from the given model's checkpoint."""
    file_precision = backend.metadata.precision
    if precision == "auto":
        precision = file_precision
    if file_precision != ("fp32" if precision == "bf16" else precision):
        raise ModelError(f"{backend.path}: --precision {precision} asked, but this model is {file_precision}")
    if given_metadata is not None and backend.metadata.checkpoint_sha256 != given_metadata.checkpoint_sha256:
        raise ModelError(f"{backend.path} was exported from another checkpoint than {given.name}; export the int8 "
                         "model again from the same checkpoint")


def _metadata_of(path: Path) -> ModelMetadata:
    """The metadata of an ONNX model, read with whichever runtime is installed."""
    from .openvino import openvino_installed  # noqa: PLC0415

    if openvino_installed():
        from .openvino import read_metadata  # noqa: PLC0415

        return read_metadata(path)
    return open_backend(path, device="cpu").metadata


def _cuda_onnxruntime() -> bool:
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_backend(model_path: str | Path, *, backend: str = "auto", precision: str = "auto", device: str = "auto",
                   threads: int | None = None, hint: str = "latency", rebuild_engine: bool = False) -> Backend:
    """Open `model_path` with the backend and precision the options and this machine allow (rules in
    the module docstring). Bad options are InputError; a missing runtime is BackendUnavailable; a
    model that cannot do what was asked is ModelError. The result has `reason`."""
    validate_choice(backend, precision, device, threads, hint)
    given = Path(model_path)
    if not given.is_file():
        raise ModelError(f"model file not found: {given}")
    if given.suffix == ".engine" or backend == "trt":
        return _engine(given, backend, device, rebuild_engine)
    path = _model_file(given, precision)
    given_metadata = _metadata_of(given) if path != given else None

    why = f"--backend {backend}"
    if backend == "auto" and device != "cpu" and precision != "bf16":
        if device == "auto" and precision == "auto":
            engine = sibling_engine(path)
            if engine is not None:
                return _with_reason(engine, f"a TensorRT engine built from this very model ({engine.path.name}) runs here")
        if device == "cuda" or _cuda_onnxruntime():
            backend, why = "onnx", "--device cuda" if device == "cuda" else "a CUDA GPU and onnxruntime-gpu are present"
    if backend == "auto":
        from .openvino import openvino_installed  # noqa: PLC0415

        if openvino_installed():
            backend, why = "openvino", "OpenVINO is installed (the fastest CPU backend)"
        elif precision == "bf16":
            raise BackendUnavailable("--precision bf16 needs OpenVINO: pip install 'liverstage[openvino]'")
        else:
            backend, why = "onnx", "OpenVINO is not installed"
    if backend == "onnx":
        runner = _onnx(path, device, threads)
        _check(runner, precision, given, given_metadata)
        return _with_reason(runner, why if precision == "auto" else f"{why}, --precision {precision}")
    from .openvino import OpenVINOBackend  # noqa: PLC0415

    runner = OpenVINOBackend(path, precision=precision, threads=threads, hint=hint)
    _check(runner, precision, given, given_metadata)
    return _with_reason(runner, f"{why}; {runner.precision_reason}")


def _engine(given: Path, backend: str, device: str, rebuild_engine: bool):
    """The TensorRT engine given, or the sibling X.engine of X.onnx for --backend trt."""
    if backend not in ("auto", "trt"):
        raise InputError(f"{given}: a TensorRT engine runs with --backend trt or auto, not {backend}")
    engine = given if given.suffix == ".engine" else sibling_file(given, ".engine")
    if not engine.is_file():
        raise ModelError(f"{given}: --backend trt needs the engine {engine.name} beside it")
    runner = open_backend(engine, device="cuda" if device == "auto" else device, rebuild_engine=rebuild_engine)
    return _with_reason(runner, "a TensorRT engine was given" if engine == given else "--backend trt")


def _onnx(path: Path, device: str, threads):
    from .onnx import OnnxBackend  # noqa: PLC0415

    return OnnxBackend(path, device=device, threads=threads)


def _with_reason(runner, reason: str):
    runner.reason = f"{runner.name} {runner.precision}: {reason}"
    return runner


def model_info(runner) -> dict:
    """The report's `model` entry for the backend that runs: the file that ran, its sha256, and why."""
    from ..provenance import file_sha256  # noqa: PLC0415

    return {"path": str(Path(runner.path).resolve()),
            "sha256": getattr(runner, "sha256", None) or file_sha256(runner.path),
            "backend": runner.name, "precision": runner.precision, "reason": runner.reason}
