"""OpenVINO backend (CPU) on the same `.onnx` files that `liverstage export` writes.

Precision: the file decides fp32 or int8 (`X.int8.onnx`, a QDQ model run with VNNI kernels);
bf16 runs the fp32 file with bfloat16 arithmetic, only on a CPU with native bf16 (AVX512_BF16
or AMX), and `auto` takes it where the model's parity record allows (backends/choice.py). OpenVINO's CPU plugin would pick bf16 by itself on such a CPU, so every
compile states INFERENCE_PRECISION_HINT explicitly: f32 unless bf16 was asked for. For an int8
model the layers left in float run in f32 too, as they did when its parity was measured.

The metadata comes from the ONNX `metadata_props` that OpenVINO's ONNX reader keeps in the
model's rt_info (`framework/liverstage`), so this backend needs no onnxruntime.

Compiled models are cached (OpenVINO's CACHE_DIR) under the user's cache folder,
`$XDG_CACHE_HOME/liverstage/openvino/<key>/` (else `~/.cache/...`), one folder per (model
sha256, OpenVINO version, CPU): a blob is never offered to another model, release or processor.
An unwritable cache folder only turns the cache off.

Telemetry: `import openvino` imports its model converter, which loads the `openvino_telemetry`
package and sends an "import" event (seen here as a DNS lookup) unless a consent file under
~/intel opts out. `import_openvino` marks that package absent before the first import, so the
converter falls back to its built-in no-op stub; nothing here calls the converter either. (A
process that imported openvino before liverstage did has its telemetry already loaded.)

Hint: "latency" runs one request on all threads; "throughput" lets OpenVINO make several
streams and splits each batch across them (an AsyncInferQueue), for servers that care about
crops per second over time per call.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ModelError
from ..model_meta import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, ModelMetadata
from ..provenance import file_sha256
from . import check_images, check_io

HINTS = ("latency", "throughput")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
TELEMETRY_MODULE = "openvino_telemetry"


def import_openvino():
    """`openvino`, with its telemetry package kept from loading; BackendUnavailable if absent."""
    if TELEMETRY_MODULE not in sys.modules:
        sys.modules[TELEMETRY_MODULE] = None  # type: ignore[assignment]  (import raises ImportError)
    try:
        import openvino  # noqa: PLC0415
    except ImportError:
        raise BackendUnavailable("OpenVINO is not installed: pip install 'liverstage[openvino]'") from None
    return openvino


def openvino_installed() -> bool:
    """Whether openvino could be imported, without importing it."""
    import importlib.util  # noqa: PLC0415

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    flags = _cpuinfo().get("flags")
    return frozenset(flags.split()) if flags else None


def native_bf16(core=None) -> bool:
    """True on a CPU with bf16 arithmetic (AVX512_BF16 or AMX). Without /proc/cpuinfo, OpenVINO's
    own OPTIMIZATION_CAPABILITIES decide."""
    flags = cpu_flags()
    if flags is not None:
        return any(flag in flags for flag in BF16_FLAGS)
    core = core or import_openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_identity() -> str:
    """Model name and a digest of the feature flags: what a compiled CPU blob depends on."""
    info = _cpuinfo()
    flags = " ".join(sorted((info.get("flags") or "").split()))
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} [{hashlib.sha256(flags.encode()).hexdigest()[:12]}]"


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/liverstage/openvino` (an absolute XDG_CACHE_HOME only), else ~/.cache/..."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "liverstage" / "openvino"


def cache_key(model_sha256: str, openvino_version: str, cpu: str) -> str:
    text = json.dumps({"model_sha256": model_sha256, "openvino": openvino_version, "cpu": cpu}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def prepare_cache_dir(model_sha256: str, openvino_version: str) -> Path | None:
    """The cache folder for this model here, created with a `key.json` saying what it is for;
    None if it cannot be written."""
    from ..atomic import write_json  # noqa: PLC0415

    cpu = cpu_identity()
    folder = cache_root() / cache_key(model_sha256, openvino_version, cpu)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "key.json").is_file():
            write_json(folder / "key.json", {"model_sha256": model_sha256, "openvino": openvino_version, "cpu": cpu})
    except OSError:
        return None
    return folder


def read_model(core, path: Path):
    """OpenVINO's model of an ONNX file; ModelError naming the file if it cannot be read."""
    try:
        return core.read_model(str(path))
    except Exception as exc:  # noqa: BLE001  (OpenVINO raises RuntimeError subclasses for a bad file)
        reason = " ".join(str(exc).split())[:200]
        raise ModelError(f"{path}: not an ONNX model OpenVINO can read ({reason})") from None


def model_metadata(model, path: Path) -> ModelMetadata:
    """The liverstage metadata OpenVINO's ONNX reader kept in the model's rt_info."""
    try:
        raw = model.get_rt_info(["framework", METADATA_KEY]).astype(str)
    except Exception:  # noqa: BLE001  (no such rt_info entry)
        raise ModelError(
            f"{path}: ONNX model without liverstage metadata (export it with `liverstage export`)"
        ) from None
    return ModelMetadata.from_json(raw, source=str(path))


def read_metadata(path: str | Path) -> ModelMetadata:
    """The metadata of an exported ONNX model, without compiling it."""
    path = Path(path)
    return model_metadata(read_model(import_openvino().Core(), path), path)


def inference_precision(asked: str, metadata: ModelMetadata, core) -> tuple[str, str]:
    """(precision that runs, why) for `asked` (auto | fp32 | bf16 | int8) on this model and CPU."""
    from .choice import bf16_verdict  # noqa: PLC0415

    file_precision = metadata.precision
    if asked == "bf16":
        if file_precision != "fp32":
            raise ModelError(f"--precision bf16 asked, but this model is {file_precision} (bf16 runs from the fp32 model)")
        if not native_bf16(core):
            raise BackendUnavailable("bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); this one has neither, "
                                     "use --precision fp32")
        state, why = bf16_verdict(metadata)
        if state == "refused":
            raise ModelError(f"--precision bf16 refused: {why}; use --precision fp32")
        return "bf16", "--precision bf16" + ("" if state == "allowed" else f" (unchecked: {why})")
    if asked != "auto":
        if asked != file_precision:
            raise ModelError(f"--precision {asked} asked, but this model is {file_precision}")
        return file_precision, f"--precision {asked}"
    if file_precision != "fp32":
        return file_precision, f"the model file is {file_precision}"
    if not native_bf16(core):
        return "fp32", "this CPU has no native bf16 (AVX512_BF16 or AMX)"
    state, why = bf16_verdict(metadata)
    return ("bf16" if state == "allowed" else "fp32"), why


class OpenVINOBackend:
    """One compiled OpenVINO CPU model over an exported liverstage ONNX file.

    `precision`: fp32 / int8 run the file as it is (and must match it), bf16 runs an fp32 file
    with bf16 arithmetic, auto picks bf16 where `choice.bf16_verdict` allows it; `precision_reason`
    says why.
    """

    def __init__(self, path: str | Path, *, precision: str = "fp32", threads: int | None = None,
                 hint: str = "latency", cache: bool = True) -> None:
        if precision not in ("auto", "fp32", "bf16", "int8"):
            raise ValueError(f"precision must be auto, fp32, bf16 or int8, got {precision!r}")
        if hint not in HINTS:
            raise ValueError(f"hint must be one of {', '.join(HINTS)}, got {hint!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        ov = import_openvino()
        self.path = Path(path)
        core = ov.Core()
        model = read_model(core, self.path)
        self.metadata = model_metadata(model, self.path)
        shape = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
        check_io(self.path, [i.get_any_name() for i in model.inputs], shape,
                 {name for o in model.outputs for name in o.get_names()}, self.metadata.preprocess.crop_size)
        try:
            self.precision, self.precision_reason = inference_precision(precision, self.metadata, core)
        except (ModelError, BackendUnavailable) as exc:
            raise type(exc)(f"{self.path}: {exc}") from None
        bf16 = self.precision == "bf16"
        self.hint = hint
        self.threads = threads
        self.sha256 = file_sha256(self.path)
        self.openvino_version = ov.get_version()
        self.cache_dir = prepare_cache_dir(self.sha256, self.openvino_version) if cache else None
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                                     "PERFORMANCE_HINT": hint.upper()}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001
            reason = " ".join(str(exc).split())[:200]
            raise ModelError(f"{self.path}: OpenVINO could not compile it for the CPU ({reason})") from None
        self.name = "openvino-cpu"
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self._request = self.compiled.create_infer_request()
        self._queue = None
        if hint == "throughput" and self.streams > 1:
            self._queue = ov.AsyncInferQueue(self.compiled, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            self._queue.set_callback(self._collect)
            self._parts: dict[int, dict[str, np.ndarray]] = {}

    @staticmethod
    def _outputs(request) -> dict[str, np.ndarray]:
        # Copies: a request's output tensors are overwritten by its next run.
        return {name: np.array(request.get_tensor(name).data, dtype=np.float32, copy=True) for name in OUTPUT_NAMES}

    def _collect(self, request, index: int) -> None:
        self._parts[index] = self._outputs(request)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = check_images(images, self.metadata.preprocess.crop_size)
        if self._queue is None or len(images) == 1:
            self._request.infer({INPUT_NAME: images})
            return self._outputs(self._request)
        bounds = np.linspace(0, len(images), min(self.streams, len(images)) + 1).astype(int)
        self._parts = {}
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            self._queue.start_async({INPUT_NAME: images[start:stop]}, index)
        self._queue.wait_all()
        return {name: np.concatenate([self._parts[i][name] for i in range(len(bounds) - 1)]) for name in OUTPUT_NAMES}
