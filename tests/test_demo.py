"""`liverstage demo` (the README's first command) end to end, at its smallest settings."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def test_demo_runs_every_step_and_stages_a_held_out_phantom(tmp_path, run_cli):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(["demo", "--out", out_dir, "--patients", 12, "--epochs", 1, "--crop-size", 32])
    assert code == 0, err
    for name in ("phantoms/manifest.csv", "run/model.pt", "run/metrics.json", "model.onnx", "model.int8.onnx",
                 "MODEL_CARD.md", "report.json", "summary.png", "bench.json"):
        assert (out_dir / name).is_file(), name
    report = json.loads((out_dir / "report.json").read_text())
    assert not report["errors"]
    (result,) = report["results"]
    assert result["stage"] in ("A", "B", "C")
    from liverstage.train.checkpoint import read_checkpoint  # noqa: PLC0415

    test_patients = read_checkpoint(out_dir / "run" / "model.pt").splits.test
    assert any(pid in result["input"] for pid in test_patients), "the demo must stage a held-out patient"
    assert "not patients" in out

    # a second demo into the same folder replaces it; a foreign non-empty folder is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["demo", "--out", foreign, "--patients", 12, "--epochs", 1])
    assert code != 0 and "not an earlier demo folder" in err and len(err.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "keep me"
