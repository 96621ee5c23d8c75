"""TensorRT engine key, sidecar and mismatch handling (no tensorrt needed), and the CLI's answer
on a machine without TensorRT or a GPU. Tests that need TensorRT skip with the reason."""

from __future__ import annotations

import importlib.util
import json

import pytest

from liverstage.runtime.backends import tensorrt as trt_backend
from liverstage.runtime.errors import BackendUnavailable, InputError, ModelError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT_REASON = "tensorrt is not installed here (NVIDIA's package index is unreachable; see docs/architecture.md)"

PROFILE = {"min": 1, "opt": 16, "max": 64, "crop_size": 32}
MACHINE = {"tensorrt_version": "11.0.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def make_key(**changes):
    fields = dict(onnx_sha256="ab" * 32, precision="fp16", profile=PROFILE, **MACHINE)
    fields.update(changes)
    return trt_backend.engine_key(**fields)


def test_engine_key_fields_and_validation():
    key = make_key()
    assert set(trt_backend.KEY_FIELDS) <= set(key)
    assert key["profile"] == PROFILE and key["compute_capability"] == "9.0"
    with pytest.raises(ValueError, match="min <= opt <= max"):
        make_key(profile={"min": 8, "opt": 4, "max": 64})
    with pytest.raises(ValueError, match="precision"):
        make_key(precision="fp8")


def test_sidecar_round_trip(tmp_path, tiny_onnx):
    meta = tiny_onnx.tiny_metadata(crop_size=32).replace(precision="fp16")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 16)
    path = trt_backend.write_sidecar(engine, make_key(), meta)
    assert path.name == "model.engine.json"
    key, meta_back = trt_backend.read_sidecar(engine)
    assert key == make_key() and meta_back == meta
    assert json.loads(path.read_text())["metadata"]["precision"] == "fp16"


def test_sidecar_missing_or_damaged(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(ModelError, match="missing engine sidecar"):
        trt_backend.read_sidecar(engine)
    trt_backend.sidecar_path(engine).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable engine sidecar"):
        trt_backend.read_sidecar(engine)
    trt_backend.sidecar_path(engine).write_text(json.dumps({"key": {"precision": "fp16"}, "metadata": {}}))
    with pytest.raises(ModelError, match="engine key lacks"):
        trt_backend.read_sidecar(engine)


def test_engine_for_this_machine_is_accepted():
    trt_backend.check_engine_matches_machine(make_key(), machine=dict(MACHINE))
    trt_backend.check_engine_matches_machine({"key": make_key(), "metadata": {}}, machine=dict(MACHINE))
    # the GPU's marketing name may differ between two boards of one compute capability
    trt_backend.check_engine_matches_machine(make_key(), machine={**MACHINE, "gpu_name": "NVIDIA H100 PCIe"})


@pytest.mark.parametrize("machine,needles", [
    ({**MACHINE, "compute_capability": "8.0", "gpu_name": "NVIDIA A100"}, ["compute capability 9.0", "8.0", "NVIDIA A100"]),
    ({**MACHINE, "tensorrt_version": "11.1.0"}, ["TensorRT 11.0.0", "11.1.0"]),
])
def test_engine_mismatch_is_one_clear_line(machine, needles):
    with pytest.raises(ModelError) as info:
        trt_backend.check_engine_matches_machine(make_key(), machine=machine, engine_path="run/model.engine")
    message = str(info.value)
    assert "\n" not in message and "run/model.engine was built for" in message and "rebuild" in message
    for needle in needles:
        assert needle in message


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here; this checks its absence")
def test_backend_without_tensorrt_is_unavailable(tmp_path, tiny_onnx):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    trt_backend.write_sidecar(engine, make_key(), tiny_onnx.tiny_metadata(crop_size=32))
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        trt_backend.TensorRTBackend(engine)
    with pytest.raises(BackendUnavailable):
        trt_backend.machine_info()
    with pytest.raises(InputError, match="engine not found"):
        trt_backend.TensorRTBackend(tmp_path / "absent.engine")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here; this checks its absence")
def test_cli_trt_without_tensorrt_exits_2(tmp_path, capsys):
    from liverstage.runtime.cli import main

    out = tmp_path / "engines" / "model.engine"
    checkpoint = tmp_path / "never-read.pt"  # TensorRT is checked before the checkpoint is read
    checkpoint.write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        main(["export", str(checkpoint), "--engine", "trt", "--precision", "fp16", "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "TensorRT" in err and "Traceback" not in err
    assert not out.parent.exists()


def test_cli_trt_needs_engine_suffix(tmp_path, capsys):
    from liverstage.runtime.cli import main

    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path / "m.pt"), "--engine", "trt", "--out", str(tmp_path / "m.onnx")])
    assert info.value.code != 0 and "must end with .engine" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TRT_REASON)
def test_build_and_run_fp16_engine(tmp_path, small_cohort):  # pragma: no cover  (GPU + TensorRT only)
    """Build an FP16 engine from a small checkpoint and compare it with PyTorch fp32."""
    import torch

    from liverstage.export.api import ExportOptions, export_checkpoint
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.checkpoint import save_checkpoint
    from liverstage.train.model import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", "amcl").eval(),
                           preprocess=PreprocessSpec(crop_size=32), args={}, splits={}, manifest=None, epoch=0)
    result = export_checkpoint(ckpt, tmp_path / "m.engine",
                               ExportOptions(engine="trt", precision="fp16", batch_min=1, batch_opt=8, batch_max=32),
                               echo=lambda line: None)
    trt = result.parity["tensorrt"]
    assert trt["finite"] and trt["max_abs_delta_cosine"] <= 1e-2 and trt["stage_agreement"] >= 0.98
    backend = trt_backend.TensorRTBackend(tmp_path / "m.engine")
    assert backend.metadata.precision == "fp16"


@pytest.mark.parametrize("onnx_state,needle", [("absent", "is not at hand"), ("changed", "changed since the engine was built")])
def test_rebuild_is_refused_without_the_unchanged_onnx(tmp_path, tiny_onnx, monkeypatch, onnx_state, needle):
    """rebuild=True rebuilds only from the very ONNX file the engine was built from."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    onnx_path = tmp_path / "m.onnx"
    if onnx_state == "changed":
        onnx_path.write_bytes(b"a different model")
    key = {**make_key(compute_capability="8.0"), "onnx_file": "m.onnx"}
    trt_backend.write_sidecar(engine, key, tiny_onnx.tiny_metadata(crop_size=32))
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: object())
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: object())
    monkeypatch.setattr(trt_backend, "machine_info", lambda device=0: dict(MACHINE))  # sm 9.0 here
    with pytest.raises(ModelError, match="was built for"):
        trt_backend.TensorRTBackend(engine)
    with pytest.raises(ModelError, match=needle):
        trt_backend.TensorRTBackend(engine, rebuild=True)
