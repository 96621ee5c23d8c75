"""The runtime never imports torch: predict and bench run in a fresh interpreter where it cannot."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import nibabel as nib

BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name == "torchvision":
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _NoTorch())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_runtime_modules_import_without_torch():
    proc = _run("""
        import liverstage.runtime.cli, liverstage.runtime.predict, liverstage.runtime.report
        import liverstage.runtime.bench, liverstage.runtime.dicom, liverstage.runtime.backends.onnx
        import liverstage.runtime.serve.service, liverstage.runtime.serve.scp, liverstage.runtime.serve.sender
        import sys
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_predict_and_bench_without_torch(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (30, 30, 6)).astype(np.float32)
    data[8:22, 8:22, :] += 300
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 4.0, 1.0])), tmp_path / "v.nii.gz")
    report = tmp_path / "r.json"
    bench_json = tmp_path / "b.json"
    proc = _run(f"""
        import sys
        from liverstage.runtime.cli import main
        for argv in (["predict", {str(tmp_path / "v.nii.gz")!r}, "--model", {str(tiny_model)!r},
                      "--bbox", "8,8,0,22,22,6", "--report", {str(report)!r}, "--quiet"],
                     ["bench", "--model", {str(tiny_model)!r}, "--backends", "onnx,torch", "--batch-sizes", "2",
                      "--warmup", "1", "--iters", "2", "--json", {str(bench_json)!r}]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv[0], exc.code)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    assert json.loads(report.read_text())["results"][0]["stage"] in ("A", "B", "C")
    bench = json.loads(bench_json.read_text())
    torch_rows = [r for r in bench["results"] if r["backend"] == "torch"]
    assert torch_rows and torch_rows[0]["skipped"] and "torch" in torch_rows[0]["skipped"]
