"""OpenVINO backend, backend/precision choice, compiled-model cache, bench rows, and no network."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from liverstage.runtime.backends import open_backend
from liverstage.runtime.backends import openvino as ov_backend
from liverstage.runtime.backends.choice import bf16_verdict, choose_backend
from liverstage.runtime.backends.openvino import OpenVINOBackend, cache_root
from liverstage.runtime.errors import BackendUnavailable, InputError, ModelError

# Not pytest.importorskip("openvino"): a plain `import openvino` loads its telemetry, which sends
# an event on import unless a consent file says no. Only liverstage's import_openvino imports it.
if not ov_backend.openvino_installed():
    pytest.skip("OpenVINO is not installed (pip install 'liverstage[openvino]')", allow_module_level=True)

needs_bf16 = pytest.mark.skipif(not ov_backend.native_bf16(), reason="this CPU has no native bf16 (AVX512_BF16 or AMX)")
ALLOWED = {"n_crops": 40, "stage_agreement": 1.0, "max_abs_delta_cosine": 0.004}
REFUSED = {"n_crops": 40, "stage_agreement": 0.97, "max_abs_delta_cosine": 0.004}


def _images(n=7, size=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, size, size)).astype(np.float32)


def _model(tmp_path, tiny_onnx, name="m.onnx", *, bf16=None, precision="fp32", checkpoint="0" * 64, seed=0):
    extra = {"openvino_bf16": bf16} if bf16 is not None else {}
    meta = tiny_onnx.tiny_metadata(crop_size=32, extra=extra).replace(precision=precision, checkpoint_sha256=checkpoint)
    return tiny_onnx.build_tiny_onnx(tmp_path / name, crop_size=32, metadata=meta, seed=seed)


def test_fp32_matches_onnxruntime_and_carries_the_same_metadata(tiny_model):
    ort = open_backend(tiny_model, device="cpu")
    ov = OpenVINOBackend(tiny_model, precision="fp32", threads=1)
    assert (ov.name, ov.precision) == ("openvino-cpu", "fp32")
    assert ov.metadata == ort.metadata
    images = _images()
    got, want = ov.run(images), ort.run(images)
    assert set(got) == {"cosine", "probs", "embedding"}
    for name in got:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)
    first = ov.run(images[:1])["cosine"]  # outputs are copies: a later run does not overwrite them
    ov.run(images[3:])
    np.testing.assert_allclose(first, want["cosine"][:1], atol=1e-5)


def test_throughput_hint_splits_batches_in_order(tiny_model):
    latency = OpenVINOBackend(tiny_model, hint="latency")
    throughput = OpenVINOBackend(tiny_model, hint="throughput")
    images = _images(9)
    for name, value in throughput.run(images).items():
        np.testing.assert_allclose(value, latency.run(images)[name], atol=1e-6)
    with pytest.raises(ValueError, match="hint"):
        OpenVINOBackend(tiny_model, hint="fast")


def test_bad_files_are_model_errors(tmp_path, tiny_onnx):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage" * 8)
    with pytest.raises(ModelError, match="junk.onnx: not an ONNX model OpenVINO can read"):
        OpenVINOBackend(junk)
    plain = tiny_onnx.build_tiny_onnx(tmp_path / "plain.onnx", with_metadata=False)
    with pytest.raises(ModelError, match="plain.onnx: ONNX model without liverstage metadata"):
        OpenVINOBackend(plain)


@needs_bf16
def test_auto_precision_follows_the_parity_record(tmp_path, tiny_onnx):
    allowed = choose_backend(_model(tmp_path, tiny_onnx, "ok.onnx", bf16=ALLOWED), device="cpu")
    assert (allowed.name, allowed.precision) == ("openvino-cpu", "bf16")
    assert "allows bf16" in allowed.reason and "100.00 %" in allowed.reason
    fp32 = OpenVINOBackend(allowed.path, precision="fp32")
    delta = np.abs(allowed.run(_images())["cosine"] - fp32.run(_images())["cosine"]).max()
    assert 0 < delta < 0.02  # bf16 arithmetic really ran, and stays close

    refused = _model(tmp_path, tiny_onnx, "no.onnx", bf16=REFUSED)
    chosen = choose_backend(refused, device="cpu")
    assert chosen.precision == "fp32" and "does not allow bf16" in chosen.reason
    with pytest.raises(ModelError, match="--precision bf16 refused: .*stage agreement 97.00 %"):
        choose_backend(refused, precision="bf16")

    unmeasured = _model(tmp_path, tiny_onnx, "none.onnx")
    chosen = choose_backend(unmeasured, device="cpu")
    assert chosen.precision == "fp32" and "no bf16 parity record" in chosen.reason
    asked = choose_backend(unmeasured, precision="bf16")
    assert asked.precision == "bf16" and "unchecked" in asked.reason


def test_cpu_without_native_bf16(tmp_path, tiny_onnx, monkeypatch):
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    assert not ov_backend.native_bf16()
    model = _model(tmp_path, tiny_onnx, bf16=ALLOWED)
    chosen = choose_backend(model, device="cpu")
    assert chosen.precision == "fp32" and "no native bf16" in chosen.reason
    with pytest.raises(BackendUnavailable, match=r"^\S+m.onnx: bf16 needs a CPU with native bf16 \(AVX512_BF16 or AMX\)"):
        choose_backend(model, precision="bf16")


def test_bf16_verdict_rule(tiny_onnx):
    meta = tiny_onnx.tiny_metadata()
    for record, state in ((ALLOWED, "allowed"), (REFUSED, "refused"), ({**ALLOWED, "max_abs_delta_cosine": 0.021}, "refused"),
                          ({**ALLOWED, "stage_agreement": 0.995}, "allowed"), ({"reason": "no bf16 here"}, "unmeasured")):
        assert bf16_verdict(meta.replace(extra={"openvino_bf16": record}))[0] == state


def test_int8_runs_the_sibling_from_the_same_checkpoint(tmp_path, tiny_onnx):
    fp32 = _model(tmp_path, tiny_onnx, "r18.onnx")
    with pytest.raises(ModelError, match="needs the int8 model r18.int8.onnx beside it"):
        choose_backend(fp32, precision="int8")
    _model(tmp_path, tiny_onnx, "r18.int8.onnx", precision="int8", seed=1)
    for backend in ("openvino", "onnx"):
        chosen = choose_backend(fp32, backend=backend, precision="int8", device="cpu")
        assert chosen.path.name == "r18.int8.onnx" and chosen.precision == "int8"
    assert choose_backend(tmp_path / "r18.int8.onnx").precision == "int8"  # auto keeps the file's precision
    with pytest.raises(ModelError, match="--precision fp32 asked, but this model is int8"):
        choose_backend(tmp_path / "r18.int8.onnx", precision="fp32")
    _model(tmp_path, tiny_onnx, "r18.int8.onnx", precision="int8", checkpoint="f" * 64)
    with pytest.raises(ModelError, match="another checkpoint than r18.onnx"):
        choose_backend(fp32, precision="int8")


@pytest.mark.parametrize("options, message", [
    ({"backend": "tpu"}, "--backend must be one of auto, onnx, openvino, trt"),
    ({"precision": "fp16"}, "--precision must be one of auto, fp32, bf16, int8"),
    ({"hint": "fast"}, "--hint must be one of latency, throughput"),
    ({"backend": "onnx", "precision": "bf16"}, "needs OpenVINO"),
    ({"backend": "openvino", "device": "cuda"}, "runs on the CPU"),
    ({"backend": "trt", "device": "cpu"}, "needs a CUDA GPU"),
    ({"threads": 0}, "--threads must be a positive integer"),
])
def test_bad_options_are_input_errors(tiny_model, options, message):
    with pytest.raises(InputError, match=message):
        choose_backend(tiny_model, **options)


def test_backend_choice_without_openvino(tiny_model, monkeypatch):
    monkeypatch.setattr(ov_backend, "openvino_installed", lambda: False)
    chosen = choose_backend(tiny_model, device="cpu")
    assert chosen.name == "onnxruntime-cpu" and "OpenVINO is not installed" in chosen.reason
    with pytest.raises(BackendUnavailable, match="--precision bf16 needs OpenVINO"):
        choose_backend(tiny_model, precision="bf16")


def test_compiled_model_cache_is_keyed_per_model(tmp_path, tiny_onnx, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache" / "liverstage" / "openvino"
    first = _model(tmp_path, tiny_onnx, "a.onnx")
    backend = OpenVINOBackend(first)
    assert backend.cache_dir.parent == cache_root()
    key = json.loads((backend.cache_dir / "key.json").read_text())
    assert key == {"model_sha256": backend.sha256, "openvino": backend.openvino_version, "cpu": ov_backend.cpu_identity()}
    assert any(p.suffix == ".blob" for p in backend.cache_dir.iterdir()), "OpenVINO wrote no compiled blob"
    assert OpenVINOBackend(first).cache_dir == backend.cache_dir
    other = OpenVINOBackend(_model(tmp_path, tiny_onnx, "b.onnx", seed=3))
    assert other.cache_dir != backend.cache_dir and other.cache_dir.parent == cache_root()
    # A cache folder that cannot be made turns the cache off; the model still runs.
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    uncached = OpenVINOBackend(first)
    assert uncached.cache_dir is None and uncached.run(_images(2))["probs"].shape == (2, 3)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as XDG says
    assert cache_root() == ov_backend.Path.home() / ".cache" / "liverstage" / "openvino"


def test_predict_reports_backend_precision_and_reason(tmp_path, tiny_model, small_volume_path, run_cli):
    vol, mask = small_volume_path
    reports = {}
    for backend in ("openvino", "onnx"):
        reports[backend] = tmp_path / f"{backend}.json"
        code, out, err = run_cli(["predict", vol, "--model", tiny_model, "--mask", mask, "--backend", backend,
                                  "--precision", "fp32", "--threads", "1", "--report", reports[backend]])
        assert code == 0, err
        assert f"ran {'openvino' if backend == 'openvino' else 'onnxruntime'}-cpu fp32" in out
    ov, ort = (json.loads(reports[b].read_text()) for b in ("openvino", "onnx"))
    assert ov["model"]["backend"] == "openvino-cpu" and ov["model"]["precision"] == "fp32"
    assert "--backend openvino" in ov["model"]["reason"]
    assert ov["results"][0]["stage"] == ort["results"][0]["stage"]
    for a, b in zip(ov["results"][0]["crops"], ort["results"][0]["crops"]):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    code, _, err = run_cli(["predict", vol, "--model", tiny_model, "--backend", "onnx", "--precision", "bf16",
                            "--report", tmp_path / "bad.json"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs OpenVINO" in err
    assert not (tmp_path / "bad.json").exists()


def test_bench_rows_for_openvino(tmp_path, tiny_onnx):
    from liverstage.runtime.bench import BenchConfig, run_bench

    model = _model(tmp_path, tiny_onnx, "r.onnx", bf16=ALLOWED)
    _model(tmp_path, tiny_onnx, "r.int8.onnx", precision="int8", seed=1)
    cfg = BenchConfig(model=model, backends=("onnx", "openvino", "openvino-bf16", "openvino-int8"), batch_sizes=(2,),
                      warmup=1, iters=2, threads=1)
    rows = {r["backend"]: r for r in run_bench(cfg)["results"]}
    expected = {"openvino": "fp32", "openvino-int8": "int8"}
    if ov_backend.native_bf16():
        expected["openvino-bf16"] = "bf16"
    else:
        assert "native bf16" in rows["openvino-bf16"]["skipped"]
    for kind, precision in expected.items():
        row = rows[kind]
        assert row["skipped"] is None and row["runner"] == "openvino-cpu" and row["precision"] == precision
        assert set(row) == set(rows["onnx"]), "openvino rows have the same columns as the onnx row"
        assert row["model"].endswith("r.int8.onnx" if kind == "openvino-int8" else "r.onnx")


NO_NETWORK = textwrap.dedent("""
    import importlib.abc, json, os, socket, sys

    LOG = os.environ["NETWORK_LOG"]

    def refuse(what):
        def call(*args, **kwargs):
            with open(LOG, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "call": what, "args": repr(args)[:200]}) + "\\n")
            raise OSError(f"network blocked in this test: {what}")
        return call

    socket.getaddrinfo = refuse("getaddrinfo")
    socket.gethostbyname = refuse("gethostbyname")
    socket.create_connection = refuse("create_connection")
    socket.socket.connect = refuse("socket.connect")
    socket.socket.connect_ex = refuse("socket.connect_ex")
    socket.socket.sendto = refuse("socket.sendto")

    class _Block(importlib.abc.MetaPathFinder):  # and no onnxruntime: OpenVINO reads the metadata itself
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("onnxruntime", "torch"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Block())
""")


def test_no_network_and_no_telemetry_while_predicting(tmp_path, tiny_model, small_volume_path):
    """predict with OpenVINO, in a fresh interpreter whose network calls are recorded and refused."""
    vol, mask = small_volume_path
    log, report = tmp_path / "network.log", tmp_path / "r.json"
    code = NO_NETWORK + textwrap.dedent(f"""
        from liverstage.runtime.cli import main
        try:
            main(["predict", {str(vol)!r}, "--model", {str(tiny_model)!r}, "--mask", {str(mask)!r},
                  "--backend", "openvino", "--report", {str(report)!r}, "--quiet"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        import openvino.tools.ovc  # the converter, which is what uses telemetry: it must get the no-op stub
        assert sys.modules["openvino_telemetry"] is None, "the telemetry package was loaded"
        assert "onnxruntime" not in sys.modules
        print("ok")
    """)
    env = {**os.environ, "NETWORK_LOG": str(log), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
    assert not log.exists(), f"network calls were attempted: {log.read_text()}"
    assert json.loads(report.read_text())["model"]["backend"] == "openvino-cpu"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_socket_system_call_while_predicting(tmp_path, tiny_model, small_volume_path):
    """The same with every process and thread traced by strace: not one socket is even opened
    (this also covers OpenVINO's C++ side, which the Python patch above cannot see)."""
    vol, mask = small_volume_path
    trace = tmp_path / "trace.txt"
    cmd = ["strace", "-f", "-qq", "-e", "trace=socket,connect,sendto,sendmsg", "-o", str(trace),
           sys.executable, "-c", "from liverstage.runtime.cli import main; main()", "predict", str(vol),
           "--model", str(tiny_model), "--mask", str(mask), "--backend", "openvino", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert trace.read_text() == "", f"socket system calls: {trace.read_text()[:2000]}"


def test_bf16_record_without_openvino_or_native_bf16(tiny_model, monkeypatch):
    from liverstage.export.openvino_parity import measure_bf16

    lines: list[str] = []
    images = _images(6)
    monkeypatch.setattr(ov_backend, "openvino_installed", lambda: False)
    assert measure_bf16(tiny_model.read_bytes(), images, None, echo=lines.append) is None
    assert "not measured (OpenVINO is not installed" in lines[-1]
    monkeypatch.setattr(ov_backend, "openvino_installed", lambda: True)
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2"}))
    record = measure_bf16(tiny_model.read_bytes(), images, None, echo=lines.append)
    assert record["reason"] == "the export ran on a CPU without native bf16" and "stage_agreement" not in record


@needs_bf16
@pytest.mark.slow
def test_export_records_bf16_parity_and_predict_follows_it(tmp_path, small_volume_path, run_cli):
    """A real fp32 export measures OpenVINO bf16 against fp32 on its parity crops, writes the record into
    the metadata, PATH.parity.json and the model card, and `predict` then runs bf16 because of it."""
    torch = pytest.importorskip("torch")
    from liverstage.export.api import ExportOptions, export_checkpoint
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.checkpoint import save_checkpoint
    from liverstage.train.model import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pt", build_model("resnet18", "amcl").eval(),
                           preprocess=PreprocessSpec(crop_size=32), args={}, splits={}, manifest=None, epoch=0)
    lines: list[str] = []
    result = export_checkpoint(ckpt, tmp_path / "model.onnx", ExportOptions(precision="fp32"), echo=lines.append)
    record = result.metadata.extra["openvino_bf16"]
    assert record["n_crops"] == result.parity["n_crops"] > 0 and record["reference"] == "openvino fp32"
    assert 0 < record["max_abs_delta_cosine"] < 0.02 and record["allowed"] == (record["stage_agreement"] >= 0.995)
    assert ov_backend.read_metadata(tmp_path / "model.onnx").extra["openvino_bf16"] == record
    assert json.loads(result.parity_path.read_text())["openvino_bf16"] == record
    assert "in OpenVINO bf16 against OpenVINO fp32" in (tmp_path / "MODEL_CARD.md").read_text()
    assert any(line.startswith("OpenVINO bf16 vs fp32") for line in lines)

    vol, mask = small_volume_path
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", vol, "--model", tmp_path / "model.onnx", "--mask", mask, "--report", report,
                            "--quiet"])
    assert code == 0, err
    model = json.loads(report.read_text())["model"]
    assert model["backend"] == "openvino-cpu"
    assert model["precision"] == ("bf16" if record["allowed"] else "fp32") and "parity record" in model["reason"]


@needs_bf16
def test_bf16_runs_the_backbone_in_bf16(tmp_path):
    """Under bf16 the exported ResNet runs in bf16 up to its pooled feature (the stem's max-pool
    included): the graph reads nothing from inside the backbone, so OpenVINO keeps no f32 stage
    there (gate format 2's early-stage statistics did), and the embedding stays close to f32's."""
    torch = pytest.importorskip("torch")
    from liverstage.export.graph import InferenceGraph  # noqa: PLC0415
    from liverstage.export.onnx_export import export_fp32  # noqa: PLC0415
    from liverstage.train.model import build_model  # noqa: PLC0415

    torch.manual_seed(0)
    net = build_model("resnet18", "amcl").eval()
    model = export_fp32(InferenceGraph(net, scale=net.scale), crop_size=64)
    path = tmp_path / "r18.onnx"
    import onnx  # noqa: PLC0415

    onnx.save(model, str(path))
    core = ov_backend.import_openvino().Core()
    bf16_model = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    pools = [op for op in bf16_model.get_runtime_model().get_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Pooling"]
    max_pool = [op for op in pools if "max_pool" in op.get_friendly_name()]  # the stem's
    assert len(max_pool) == 1 and max_pool[0].get_rt_info()["runtimePrecision"].astype(str) == "bf16"
    images = np.abs(_images(4, 64))
    f32 = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"image": images})
    bf16 = bf16_model({"image": images})
    assert np.abs(bf16["embedding"] - f32["embedding"]).max() < 5e-2
