"""open_backend / OnnxBackend: the model file decides the backend; bad model files are one-line errors."""

import json

import numpy as np
import onnx
import pytest

from liverstage.runtime.backends import open_backend
from liverstage.runtime.backends.onnx import choose_providers
from liverstage.runtime.cli import main
from liverstage.runtime.errors import BackendUnavailable, ModelError


def test_onnx_backend_runs_and_carries_metadata(tiny_model, tiny_onnx):
    backend = open_backend(tiny_model, device="cpu", threads=1)
    assert backend.name == "onnxruntime-cpu"
    assert backend.precision == "fp32"
    assert backend.metadata == tiny_onnx.tiny_metadata(crop_size=32)
    images = np.random.default_rng(0).standard_normal((5, 1, 32, 32)).astype(np.float32)
    out = backend.run(images)
    assert set(out) == {"cosine", "probs", "embedding"}
    assert out["cosine"].shape == (5, 3) and out["probs"].shape == (5, 3) and out["embedding"].shape == (5, 8)
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    assert np.all(np.abs(out["cosine"]) <= 1.0 + 1e-5)
    # probs = softmax(scale * cosine): the model's own outputs agree with the metadata's scale.
    logits = backend.metadata.scale * out["cosine"].astype(np.float64)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out["probs"], expected / expected.sum(axis=1, keepdims=True), atol=1e-4)
    # One crop at a time gives the same answer as the batch.
    single = np.concatenate([backend.run(images[i:i + 1])["probs"] for i in range(5)])
    np.testing.assert_allclose(single, out["probs"], atol=1e-6)


def test_run_checks_shape(tiny_model):
    backend = open_backend(tiny_model, device="cpu")
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        backend.run(np.zeros((2, 1, 16, 16), np.float32))


def test_missing_and_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        open_backend(tmp_path / "none.onnx")
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelError, match="not an ONNX model or TensorRT engine"):
        open_backend(junk)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="notes.txt"):
        open_backend(text)


def test_onnx_without_metadata(tmp_path, tiny_onnx):
    path = tiny_onnx.build_tiny_onnx(tmp_path / "plain.onnx", with_metadata=False)
    with pytest.raises(ModelError, match="without liverstage metadata"):
        open_backend(path)


def test_onnx_with_bad_metadata_or_io(tmp_path, tiny_model):
    model = onnx.load(str(tiny_model))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["liverstage"])
    meta["class_names"] = ["X", "Y", "Z"]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"liverstage": json.dumps(meta)})
    onnx.save(model, str(tmp_path / "bad_meta.onnx"))
    with pytest.raises(ModelError, match="invalid liverstage metadata"):
        open_backend(tmp_path / "bad_meta.onnx")

    model = onnx.load(str(tiny_model))
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if n == "image" else n for n in node.input]
    onnx.save(model, str(tmp_path / "bad_io.onnx"))
    with pytest.raises(ModelError, match="expected input 'image'"):
        open_backend(tmp_path / "bad_io.onnx")


def test_model_with_the_gate_of_format_2_is_refused_with_the_fix(tmp_path, tiny_onnx, capsys):
    """A model exported with gate format 2 (its `early_stats` output, read by a third part of the
    gate, dropped since) opens, but its gate cannot be used: one line says what to do."""
    from liverstage.runtime.ood import OodGate

    meta = tiny_onnx.tiny_metadata(crop_size=32, ood={"method": "knn-embedding+knn-early+knn-image", "format_version": 2})
    model = onnx.load(str(tiny_onnx.build_tiny_onnx(tmp_path / "tiny.onnx", crop_size=32, metadata=meta)))
    model.graph.node.append(onnx.helper.make_node("Identity", ["embedding"], ["early_stats"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("early_stats", onnx.TensorProto.FLOAT, ["N", 8]))
    onnx.save(model, str(tmp_path / "old.onnx"))
    backend = open_backend(tmp_path / "old.onnx")  # the extra output is harmless
    assert set(backend.run(np.zeros((2, 1, 32, 32), dtype=np.float32))) == {"cosine", "probs", "embedding"}
    with pytest.raises(ModelError, match="version 2.*re-export the model"):
        OodGate.from_metadata(backend.metadata)
    volume = tmp_path / "v.nii.gz"
    volume.write_bytes(b"")  # never read: the model is opened first
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(volume), "--model", str(tmp_path / "old.onnx"), "--report", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "re-export the model" in err
    assert not (tmp_path / "r.json").exists()


def test_device_and_provider_choice(tiny_model):
    assert choose_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailable, match="--device cuda"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="device"):
        open_backend(tiny_model, device="gpu")
    with pytest.raises(ValueError, match="threads"):
        open_backend(tiny_model, threads=0)


def test_engine_on_cpu_is_refused(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 64)
    with pytest.raises(BackendUnavailable, match="TensorRT engine needs a CUDA GPU"):
        open_backend(engine, device="cpu")


@pytest.mark.parametrize("kind", ["junk", "no-metadata", "missing"])
def test_cli_bad_model_is_one_line(tmp_path, tiny_onnx, capsys, kind):
    model = tmp_path / "m.onnx"
    if kind == "junk":
        model.write_bytes(b"\x08\x01garbage")
    elif kind == "no-metadata":
        tiny_onnx.build_tiny_onnx(model, with_metadata=False)
    volume = tmp_path / "v.nii.gz"
    volume.write_bytes(b"")  # never read: the model is opened first
    report = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(volume), "--model", str(model), "--report", str(report)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("liverstage: error:") and str(model) in err and len(err.splitlines()) == 1
    assert not report.exists()


def _fake_engine(tmp_path, tiny_onnx, *, sidecar=True):
    from liverstage.runtime.backends import tensorrt as trt_backend

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00fake engine bytes")
    if sidecar:
        key = trt_backend.engine_key(onnx_sha256="0" * 64, tensorrt_version="11.0.0", gpu_name="NVIDIA A100",
                                     compute_capability="8.0", precision="fp16",
                                     profile={"min": 1, "opt": 16, "max": 64, "crop_size": 32})
        trt_backend.write_sidecar(engine, key, tiny_onnx.tiny_metadata(crop_size=32).replace(precision="fp16"))
    return engine


@pytest.mark.parametrize("case, expected", [
    ("no-sidecar", "missing engine sidecar"),
    ("no-tensorrt", "TensorRT is not installed"),
    ("other-gpu", "was built for"),
])
def test_cli_engine_problems_are_one_line(tmp_path, tiny_onnx, capsys, monkeypatch, case, expected):
    """An engine without its sidecar, without TensorRT here, or built for another GPU/TensorRT."""
    from liverstage.runtime.backends import tensorrt as trt_backend

    engine = _fake_engine(tmp_path, tiny_onnx, sidecar=case != "no-sidecar")
    if case == "no-tensorrt":
        monkeypatch.setattr(trt_backend, "_import_tensorrt",
                            lambda: (_ for _ in ()).throw(BackendUnavailable(
                                "TensorRT is not installed here (pip install 'liverstage[gpu]')")))
    if case == "other-gpu":  # a machine with TensorRT and an H100 (sm 9.0): the A100 (8.0) engine must be refused
        monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda: object())
        monkeypatch.setattr(trt_backend, "_import_cudart", lambda: object())
        monkeypatch.setattr(trt_backend, "machine_info", lambda device=0: {
            "tensorrt_version": "11.0.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"})
    report = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "v.nii.gz"), "--model", str(engine), "--report", str(report)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("liverstage: error:") and expected in err and len(err.splitlines()) == 1, err
    assert not report.exists()


def test_auto_prefers_a_matching_sibling_engine(tmp_path, tiny_onnx, monkeypatch):
    """--device auto with X.onnx: X.engine built from this very ONNX wins if it runs here; else ORT."""
    from liverstage.runtime.backends import tensorrt as trt_backend
    from liverstage.runtime.report import file_sha256

    onnx_path = tiny_onnx.build_tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00fake")

    def sidecar(sha):
        key = trt_backend.engine_key(onnx_sha256=sha, tensorrt_version="11.0.0", gpu_name="GPU", compute_capability="9.0",
                                     precision="fp16", profile={"min": 1, "opt": 16, "max": 64})
        trt_backend.write_sidecar(engine, key, tiny_onnx.tiny_metadata(crop_size=32).replace(precision="fp16"))

    class FakeTRT:
        name, precision = "tensorrt", "fp16"

        def __init__(self, path):
            self.path, self.metadata = path, trt_backend.read_sidecar(path)[1]

    sidecar(file_sha256(onnx_path))
    # TensorRT absent here: auto passes the engine over and runs ONNX Runtime.
    assert open_backend(onnx_path).name.startswith("onnxruntime")
    monkeypatch.setattr(trt_backend, "TensorRTBackend", FakeTRT)
    assert open_backend(onnx_path).name == "tensorrt"
    assert open_backend(onnx_path, device="cpu").name == "onnxruntime-cpu"
    sidecar("f" * 64)  # an engine from another export of the model is never picked
    assert open_backend(onnx_path).name.startswith("onnxruntime")
