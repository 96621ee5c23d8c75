"""`liverstage demo` (the README's first command) end to end, at its smallest settings."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from liverstage.runtime.cli import main  # noqa: E402


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_runs_every_step_and_stages_a_held_out_phantom(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(["demo", "--out", out_dir, "--patients", 12, "--epochs", 1, "--crop-size", 32], capsys)
    assert code == 0, err
    for name in ("phantoms/manifest.csv", "run/model.pt", "run/metrics.json", "model.onnx", "model.int8.onnx",
                 "MODEL_CARD.md", "report.json", "summary.png", "bench.json"):
        assert (out_dir / name).is_file(), name
    report = json.loads((out_dir / "report.json").read_text())
    assert not report["errors"]
    (result,) = report["results"]
    assert result["stage"] in ("A", "B", "C")
    import torch  # noqa: PLC0415

    test_patients = torch.load(out_dir / "run" / "model.pt", map_location="cpu", weights_only=True)["splits"]["test"]
    assert any(pid in result["input"] for pid in test_patients), "the demo must stage a held-out patient"
    assert "not patients" in out

    # a second demo into the same folder replaces it; a foreign non-empty folder is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["demo", "--out", foreign, "--patients", 12, "--epochs", 1], capsys)
    assert code != 0 and "not an earlier demo folder" in err and len(err.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "keep me"
