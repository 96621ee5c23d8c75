"""TensorRT engines: the engine key, its sidecar JSON, and a small TensorRT 11 runtime.

An engine is tied to the TensorRT version and the GPU it was built on, so every `X.engine` has a
sidecar `X.engine.json`:
    {"key": {onnx_sha256, tensorrt_version, gpu_name, compute_capability, precision, profile},
     "metadata": ModelMetadata.to_dict()}
Loading checks the key against this machine first and refuses a mismatch with one clear line
(TensorRT's own deserialize just returns None). `liverstage export --engine trt` rebuilds.

tensorrt and cuda-python are imported lazily, only here; everything else in this module (key,
sidecar, mismatch check) works without them. Never imports torch. Written against the TensorRT
11.x Python API (strongly typed engines, tensor-name IO, execute_async_v3) and not run in this
project's CI, which has neither a GPU nor TensorRT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json
from ..errors import BackendUnavailable, InputError, ModelError
from ..model_meta import INPUT_NAME, OUTPUT_NAMES, ModelMetadata
from ..provenance import file_sha256

SIDECAR_SUFFIX = ".json"
KEY_FIELDS = ("onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profile")
MACHINE_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability")


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """`X.engine` -> `X.engine.json`."""
    path = Path(engine_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def engine_key(*, onnx_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str,
               precision: str, profile: dict[str, int]) -> dict[str, Any]:
    """What an engine is valid for. profile = {"min": .., "opt": .., "max": .., "crop_size": ..}."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    for name in ("min", "opt", "max"):
        if int(profile.get(name, 0)) < 1:
            raise ValueError(f"profile needs a positive {name!r} batch size, got {profile!r}")
    if not int(profile["min"]) <= int(profile["opt"]) <= int(profile["max"]):
        raise ValueError(f"profile needs min <= opt <= max, got {profile!r}")
    return {
        "onnx_sha256": str(onnx_sha256),
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": str(gpu_name),
        "compute_capability": str(compute_capability),
        "precision": precision,
        "profile": {k: int(v) for k, v in profile.items()},
    }


def write_sidecar(engine_path: str | os.PathLike, key: dict[str, Any], metadata: ModelMetadata) -> Path:
    path = sidecar_path(engine_path)
    write_json(path, {"key": key, "metadata": metadata.to_dict()})
    return path


def read_sidecar(engine_path: str | os.PathLike) -> tuple[dict[str, Any], ModelMetadata]:
    """(key, metadata) from `X.engine.json`; ModelError naming the file on any problem."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ModelError(f"{engine_path}: missing engine sidecar {path.name} (re-export the engine with liverstage export --engine trt)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable engine sidecar ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict) or "metadata" not in data:
        raise ModelError(f"{path}: not a liverstage engine sidecar (needs 'key' and 'metadata')")
    key = data["key"]
    missing = [name for name in KEY_FIELDS if name not in key]
    if missing:
        raise ModelError(f"{path}: engine key lacks {', '.join(missing)}")
    metadata = ModelMetadata.from_dict(data["metadata"], source=str(path))
    return key, metadata


def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise BackendUnavailable(
            "TensorRT is not installed here (pip install 'liverstage[gpu]' on a machine with an NVIDIA GPU "
            "and NVIDIA's package index); use --engine onnx instead"
        ) from None
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415  (cuda-python >= 12.6)
    except ImportError:
        try:
            from cuda import cudart  # noqa: PLC0415  (older cuda-python)
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed here (needed by the TensorRT backend)") from None
    return cudart


def _check(result):
    """cuda-python calls return (err, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendUnavailable(f"CUDA error {err} ({getattr(err, 'name', '')})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def machine_info(device: int = 0) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine.

    BackendUnavailable (one line, exit code 2) without tensorrt, cuda-python or a CUDA GPU.
    """
    trt = _import_tensorrt()
    cudart = _import_cudart()
    try:
        count = _check(cudart.cudaGetDeviceCount())
    except BackendUnavailable:
        count = 0
    if not count:
        raise BackendUnavailable("no CUDA GPU is visible on this machine; TensorRT engines need one (use --engine onnx)")
    props = _check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": name.strip("\x00 ").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
    }


def check_engine_matches_machine(key: dict[str, Any], *, machine: dict[str, str] | None = None,
                                 engine_path: str | os.PathLike = "engine") -> None:
    """ModelError with a clear line if the engine was built for another TensorRT or GPU.

    `machine` defaults to machine_info() (which needs tensorrt and a GPU); tests pass one.
    The GPU name is informational: TensorRT engines are portable across GPUs of the same compute
    capability, so only the TensorRT version and compute capability must match.
    """
    if isinstance(key.get("key"), dict):  # a whole sidecar was passed
        key = key["key"]
    machine = machine_info() if machine is None else machine
    problems = []
    if str(key.get("tensorrt_version")) != str(machine["tensorrt_version"]):
        problems.append(f"TensorRT {key.get('tensorrt_version')} (this machine has {machine['tensorrt_version']})")
    if str(key.get("compute_capability")) != str(machine["compute_capability"]):
        problems.append(f"a GPU of compute capability {key.get('compute_capability')} ({key.get('gpu_name')}; "
                        f"this machine has {machine['compute_capability']}, {machine['gpu_name']})")
    if problems:
        raise ModelError(
            f"{engine_path} was built for " + " and ".join(problems)
            + "; rebuild it here with: liverstage export CHECKPOINT --engine trt --out " + str(engine_path)
        )


def timing_cache_path(engine_path: str | os.PathLike, machine: dict[str, str]) -> Path:
    """One timing cache per folder, TensorRT version and compute capability (reused across builds)."""
    tag = f"trt{machine['tensorrt_version']}-sm{machine['compute_capability'].replace('.', '')}"
    return Path(engine_path).parent / f".liverstage-timing-{tag}.cache"


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, metadata: ModelMetadata,
                 batch_min: int, batch_opt: int, batch_max: int, device: int = 0) -> dict[str, Any]:
    """Build a TensorRT 11 engine from a liverstage ONNX model; write it and its sidecar atomically.

    The network is strongly typed (TensorRT 11 has no other kind): the engine's precision is the
    ONNX model's own (an FP16 ONNX with explicit float32 Casts gives an FP16 engine with a float32
    head; a QDQ ONNX gives INT8). No precision builder flags are set. One optimisation profile over
    the batch range; the timing cache beside the engine makes rebuilds fast. Returns the key.
    """
    from ..atomic import atomic_path  # noqa: PLC0415

    machine = machine_info(device)  # BackendUnavailable first, before any work
    trt = _import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    size = int(metadata.preprocess.crop_size)
    profile_dims = {"min": int(batch_min), "opt": int(batch_opt), "max": int(batch_max), "crop_size": size}
    key = engine_key(onnx_sha256=file_sha256(onnx_path), precision=metadata.precision,
                     profile=profile_dims, **machine)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: required on TensorRT 10.x to keep the ONNX model's own types, the only kind
    # of network (flag accepted, default) on 11.x.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(strongly_typed) if strongly_typed is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (batch_min, 1, size, size), (batch_opt, 1, size, size), (batch_max, 1, size, size))
    config.add_optimization_profile(profile)
    cache_file = timing_cache_path(engine_path, machine)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT messages above)")
    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    key["onnx_file"] = os.path.relpath(onnx_path.resolve(), engine_path.resolve().parent)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    write_sidecar(engine_path, key, metadata)
    return key


def _rebuild_from_onnx(engine_path: Path, key: dict[str, Any], metadata: ModelMetadata, device: int) -> None:
    """Rebuild a mismatched engine from the ONNX model it was built from, if that file is unchanged."""
    onnx_file = key.get("onnx_file")
    onnx_path = (engine_path.parent / onnx_file) if onnx_file else None
    if onnx_path is None or not onnx_path.is_file():
        raise ModelError(f"{engine_path}: cannot rebuild, its ONNX model ({onnx_file or 'unknown'}) is not at hand")
    if file_sha256(onnx_path) != key["onnx_sha256"]:
        raise ModelError(f"{engine_path}: cannot rebuild, {onnx_path} changed since the engine was built")
    profile = key["profile"]
    build_engine(onnx_path, engine_path, metadata=metadata, batch_min=profile["min"],
                 batch_opt=profile["opt"], batch_max=profile["max"], device=device)


class TensorRTBackend:
    """Runs an engine written by `liverstage export --engine trt`.

    `.metadata` (ModelMetadata from the sidecar), `.run(images [N,1,S,S] float32) -> {cosine,
    probs, embedding}`. Batches larger than the engine's profile maximum are split. With
    `rebuild=True` an engine built for another TensorRT/GPU is rebuilt from its ONNX model (named
    in the sidecar) when that file is at hand and unchanged; otherwise a mismatch is a ModelError.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, device: int = 0, rebuild: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"engine not found: {self.path}")
        self.key, self.metadata = read_sidecar(self.path)
        trt = _import_tensorrt()
        self._cudart = _import_cudart()
        try:
            check_engine_matches_machine(self.key, machine=machine_info(device), engine_path=self.path)
        except ModelError:
            if not rebuild:
                raise
            _rebuild_from_onnx(self.path, self.key, self.metadata, device)
            self.key, self.metadata = read_sidecar(self.path)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ModelError(f"{self.path}: TensorRT could not deserialize this engine (corrupt, or built by another TensorRT)")
        self._context = self._engine.create_execution_context()
        self.precision = self.metadata.precision
        profile = self.key["profile"]
        self.batch_min, self.batch_max = int(profile["min"]), int(profile["max"])
        self.crop_size = int(self.metadata.preprocess.crop_size)
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        widths = {"cosine": len(self.metadata.class_names), "probs": len(self.metadata.class_names),
                  "embedding": int(self.metadata.embedding_dim)}
        self._widths = widths
        self._alloc(INPUT_NAME, self.batch_max * self.crop_size * self.crop_size * 4)
        for name in OUTPUT_NAMES:
            self._alloc(name, self.batch_max * widths[name] * 4)

    def _alloc(self, name: str, nbytes: int) -> None:
        pointer = _check(self._cudart.cudaMalloc(nbytes))
        self._buffers[name] = (int(pointer), nbytes)
        self._context.set_tensor_address(name, int(pointer))

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (1, self.crop_size, self.crop_size):
            raise InputError(f"engine {self.path.name} expects [N, 1, {self.crop_size}, {self.crop_size}] crops, "
                             f"got {list(images.shape)}")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
        for start in range(0, len(images), self.batch_max):
            chunk = images[start:start + self.batch_max]
            n = len(chunk)
            if n < self.batch_min:  # pad up to the profile minimum, drop the padding after
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_min - n, axis=0)])
            for name, value in self._run_chunk(chunk).items():
                parts[name].append(value[:n])
        return {name: np.concatenate(values) if values else np.zeros((0, self._widths[name]), np.float32)
                for name, values in parts.items()}

    def _run_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        n = len(chunk)
        self._context.set_input_shape(INPUT_NAME, tuple(chunk.shape))
        _check(cudart.cudaMemcpyAsync(self._buffers[INPUT_NAME][0], chunk.ctypes.data, chunk.nbytes, h2d, self._stream))
        if not self._context.execute_async_v3(int(self._stream)):
            raise ModelError(f"{self.path}: TensorRT execution failed")
        out = {name: np.empty((n, self._widths[name]), np.float32) for name in OUTPUT_NAMES}
        for name, host in out.items():
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, d2h, self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        return out

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:  # pragma: no cover  (GPU only)
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
