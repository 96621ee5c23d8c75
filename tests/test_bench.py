"""`liverstage bench` core: percentiles, FLOP counting from the ONNX graph, the report's shape.

No timed assertions: speed targets are measured by benchmarks/bench_runtime.py.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from liverstage.runtime.bench import BenchConfig, count_flops, percentiles, run_bench, sibling, time_calls
from liverstage.runtime.cli import main
from liverstage.runtime.errors import InputError


def test_percentiles_match_definition():
    samples = list(range(1, 101))  # 1..100
    p = percentiles(samples)
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert p["mean"] == pytest.approx(50.5)
    with pytest.raises(ValueError):
        percentiles([])


def test_time_calls_counts_warmup_and_iters():
    calls = []
    out = time_calls(lambda: calls.append(1), warmup=3, iters=5)
    assert len(calls) == 8 and len(out) == 5 and all(t >= 0 for t in out)


def test_flops_of_tiny_model(tiny_model):
    # Per crop: MatMul [1,16]x[16,8] + MatMul [1,8]x[8,3]; pooling and softmax are not counted.
    assert count_flops(tiny_model) == 2 * 16 * 8 + 2 * 8 * 3


def test_flops_of_conv_and_gemm(tmp_path):
    w = numpy_helper.from_array(np.zeros((4, 2, 3, 3), np.float32), "w")           # Cout 4, Cin 2, 3x3
    g = numpy_helper.from_array(np.zeros((5, 4 * 8 * 8), np.float32), "g")          # Gemm transB
    shape = numpy_helper.from_array(np.array([-1, 4 * 8 * 8], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["c", "shape"], ["f"]),
         helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=[w, g, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    conv = 2 * (4 * 8 * 8) * (2 * 3 * 3)   # every output: Cin*kh*kw multiply-adds
    gemm = 2 * 5 * 256
    assert count_flops(tmp_path / "m.onnx") == conv + gemm


def test_sibling_names(tmp_path):
    assert sibling(tmp_path / "r18.onnx", ".int8.onnx") == tmp_path / "r18.int8.onnx"
    assert sibling(tmp_path / "r18.onnx", ".engine") == tmp_path / "r18.engine"


def test_run_bench_rows_and_skips(tmp_path, tiny_model, tiny_onnx):
    int8 = tiny_onnx.build_tiny_onnx(tmp_path / "q.onnx", seed=1)  # stands in for an int8 file
    cfg = BenchConfig(model=tiny_model, backends=("onnx", "onnx-int8", "trt"), batch_sizes=(1, 4),
                      warmup=1, iters=3, threads=1, int8_model=int8)
    result = run_bench(cfg)
    rows = [r for r in result["results"] if not r["skipped"]]
    assert [(r["backend"], r["batch_size"]) for r in rows] == [("onnx", 1), ("onnx", 4), ("onnx-int8", 1), ("onnx-int8", 4)]
    for r in rows:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["crops_per_s"] == pytest.approx(r["batch_size"] / (r["p50_ms"] / 1e3))
        assert r["gflops"] == pytest.approx(result["flops_per_crop"] * r["batch_size"] / (r["p50_ms"] / 1e3) / 1e9)
        assert r["speedup_vs_torch"] is None  # no torch row in this run
    trt = next(r for r in result["results"] if r["backend"] == "trt")
    assert "engine" in trt["skipped"]
    assert result["machine"]["matmul_peak_gflops"] > 0 and result["machine"]["threads"] == 1


def test_bench_cli_json_and_end_to_end(tmp_path, tiny_model, capsys):
    import nibabel as nib

    data = np.random.default_rng(0).normal(100, 10, (40, 40, 8)).astype(np.float32)
    data[10:30, 12:32, :] += 300
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.2, 4.0, 1.0])), tmp_path / "v.nii.gz")
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tiny_model), "--backends", "onnx", "--batch-sizes", "2", "--warmup", "1",
              "--iters", "3", "--threads", "1", "--input", str(tmp_path / "v.nii.gz"), "--json", str(out)])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "warm-up 1, timed iterations 3, threads 1" in printed and "ratio" in printed
    result = json.loads(out.read_text())
    e2e = result["end_to_end"]
    assert e2e["crops"] > 0 and e2e["ratio"] == pytest.approx(e2e["end_to_end_s"] / e2e["model_only_s"])


def test_bench_bad_options(tmp_path, tiny_model, capsys):
    with pytest.raises(InputError, match="unknown tpu"):
        BenchConfig(model=tiny_model, backends=("tpu",)).validate()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tiny_model), "--batch-sizes", "1,x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("liverstage: error:") and "--batch-sizes" in err and len(err.splitlines()) == 1


class _FakeRunner:
    """Stands in for a backend: a name that says where it runs, and a fixed amount of work."""

    precision = "fp32"

    def __init__(self, name: str, repeats: int) -> None:
        self.name, self.repeats = name, repeats

    def run(self, images):
        for _ in range(self.repeats):
            np.sort(np.random.default_rng(0).random(20000))


def test_torch_reference_runs_on_each_device_a_backend_runs_on(tmp_path, tiny_model, monkeypatch):
    """A TensorRT row is compared with PyTorch on the GPU, an ONNX Runtime CPU row with PyTorch on the CPU."""
    from liverstage.runtime import bench as bench_mod

    asked = []

    def fake_open(kind, cfg, metadata, *, torch_device="cpu"):
        if kind == "torch":
            asked.append(torch_device)
            return _FakeRunner("torch-eager" if torch_device == "cpu" else "torch-eager-cuda", 4), tmp_path, None
        return _FakeRunner({"onnx": "onnxruntime-cpu", "trt": "tensorrt"}[kind], 1), tmp_path, None

    monkeypatch.setattr(bench_mod, "_open", fake_open)
    cfg = BenchConfig(model=tiny_model, backends=("onnx", "trt", "torch"), batch_sizes=(2,), warmup=0, iters=3)
    rows = {(r["backend"], r["device"]): r for r in run_bench(cfg)["results"]}
    assert sorted(asked) == ["cpu", "cuda"]
    assert set(rows) == {("onnx", "cpu"), ("trt", "cuda"), ("torch", "cpu"), ("torch", "cuda")}
    for kind, device in (("onnx", "cpu"), ("trt", "cuda")):
        reference = rows["torch", device]["p50_ms"]
        assert rows[kind, device]["speedup_vs_torch"] == pytest.approx(reference / rows[kind, device]["p50_ms"])
    # The CPU's matmul peak says nothing about a GPU row.
    assert rows["trt", "cuda"]["fraction_of_peak"] is None and rows["onnx", "cpu"]["fraction_of_peak"] is not None


def test_torch_reference_on_a_missing_gpu_is_a_skipped_row(tmp_path, tiny_model, monkeypatch):
    pytest.importorskip("torch")
    import torch

    from liverstage.train.reference import TorchEager
    from liverstage.runtime.errors import BackendUnavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        TorchEager(tmp_path / "missing.pt", None, "cuda")


@pytest.mark.gpu
def test_torch_reference_on_the_gpu_matches_the_cpu(tmp_path):
    import torch

    from liverstage.train.reference import TorchEager
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.checkpoint import save_checkpoint
    from liverstage.train.model import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pt", build_model("resnet18", "amcl").eval(),
                           preprocess=PreprocessSpec(crop_size=32), args={}, splits={}, manifest=None, epoch=0)
    images = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
    on_gpu, on_cpu = TorchEager(ckpt, None, "cuda"), TorchEager(ckpt, None, "cpu")
    assert on_gpu.name == "torch-eager-cuda" and on_cpu.name == "torch-eager"
    for key in ("probs", "cosine"):
        assert np.allclose(on_gpu.run(images)[key], on_cpu.run(images)[key], atol=1e-4)


def test_bench_command_passes_the_pytorch_reference_in(tmp_path, tiny_model, run_cli):
    """The runtime's bench takes its PyTorch reference from the command (train.reference.TorchEager)."""
    pytest.importorskip("torch")
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.checkpoint import save_checkpoint
    from liverstage.train.model import build_model

    ckpt = save_checkpoint(tmp_path / "model.pt", build_model("resnet18", "amcl").eval(),
                           preprocess=PreprocessSpec(crop_size=32), args={}, splits={}, manifest=None, epoch=0)
    code, _, err = run_cli(["bench", "--model", tiny_model, "--backends", "onnx,torch", "--checkpoint", ckpt,
                            "--batch-sizes", "2", "--warmup", "0", "--iters", "2", "--json", tmp_path / "b.json",
                            "--quiet"])
    assert code == 0, err
    rows = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert rows["torch"]["skipped"] is None and rows["torch"]["runner"] == "torch-eager"
    assert rows["onnx"]["speedup_vs_torch"] == pytest.approx(rows["torch"]["p50_ms"] / rows["onnx"]["p50_ms"])
