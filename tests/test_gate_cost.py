"""benchmarks/gate_cost.py: `liverstage bench`'s gate column with each code of the gate, the
kernels in use put back afterwards. No timed assertions: the figures that count come from the
demo's models (README: the gate's cost)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def gate_cost(benchmark_module):
    return benchmark_module("gate_cost")


def test_report_has_both_codes_per_backend(gate_cost, gated_model, tmp_path, capsys):
    from liverstage.runtime.ood import gate_kernels

    before = gate_kernels()
    out = tmp_path / "cost.json"
    assert gate_cost.main(["--model", str(gated_model), "--backends", "onnx,onnx-int8", "--iters", "3",
                           "--rounds", "2", "--json", str(out)]) == 0
    assert gate_kernels() == before  # the kernels in use are put back
    report = json.loads(out.read_text())
    assert report["codes"] == (["compiled", "numpy"] if before == "compiled" else ["numpy"])
    assert set(report["backends"]) == {"onnx"} and "onnx-int8" in report["skipped"]  # no X.int8.onnx beside it
    entry = report["backends"]["onnx"]
    assert len(entry["model_ms"]) == 2 * len(report["codes"]) and min(entry["model_ms"]) > 0
    for i, code in enumerate(report["codes"]):
        assert len(entry[code]["gate_ms"]) == 2 and min(entry[code]["gate_ms"]) > 0
        for round_, (gate_ms, share) in enumerate(zip(entry[code]["gate_ms"], entry[code]["share"])):
            model_ms = entry["model_ms"][round_ * len(report["codes"]) + i]  # the model timed beside it
            assert share == pytest.approx(gate_ms / model_ms)
    printed = capsys.readouterr()
    assert "numpy gate ms" in printed.out and "onnx-int8: skipped" in printed.err


def test_model_without_gate_is_refused(gate_cost, tiny_model):
    with pytest.raises(SystemExit, match="carries no out-of-distribution gate"):
        gate_cost.main(["--model", str(tiny_model), "--backends", "onnx", "--iters", "1", "--rounds", "1"])
