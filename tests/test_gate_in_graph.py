"""benchmarks/gate_in_graph.py: the whole gate appended as ONNX nodes gives runtime/ood.py's
distances, and the report holds both designs' shares. No timed assertions: the figures that count
come from the demo's models (README: gate cost)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest


@pytest.fixture(scope="module")
def gate_in_graph(benchmark_module):
    return benchmark_module("gate_in_graph")


def test_whole_gate_in_graph_gives_the_runtime_gates_distances(gate_in_graph, gated_model, cohort_crops, tmp_path):
    whole = gate_in_graph.with_whole_gate(gated_model, tmp_path)
    outputs = [o.name for o in onnx.load(str(whole)).graph.output]
    assert outputs[-1] == "ood_distances" and outputs[:-1] == [o.name for o in onnx.load(str(gated_model)).graph.output]
    phantoms = np.concatenate([crops for _, _, crops in cohort_crops[:3]])  # in distribution, inside the clip range
    noise = np.random.default_rng(1).standard_normal((8,) + phantoms.shape[1:]).astype(np.float32)
    for batch in (phantoms, noise):
        assert gate_in_graph.disagreement(gated_model, whole, batch) < gate_in_graph.AGREEMENT_RTOL


def test_report_has_both_designs(gate_in_graph, gated_model, tmp_path, capsys):
    out = tmp_path / "in-graph.json"
    assert gate_in_graph.main(["--model", str(gated_model), "--backends", "onnx,onnx-int8", "--reps", "2",
                               "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["backend"] == "onnx" and row["model_ms"] > 0 and row["agreement"] < gate_in_graph.AGREEMENT_RTOL
    assert row["now_timed"] == pytest.approx(row["exported_timed"] + row["numpy_part"])
    assert row["now_profiled"] == pytest.approx(row["exported_profiled"] + row["numpy_part"])
    assert any(kind == "TopK" for kind, _ in row["whole_changes"])  # the gate's own nodes are in the profile
    assert not any(kind == "TopK" for kind, _ in row["exported_changes"])
    printed = capsys.readouterr()
    assert "whole gate" in printed.out and "no int8 model" in printed.err
