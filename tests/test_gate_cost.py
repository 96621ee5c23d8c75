"""benchmarks/gate_cost.py: the model without `early_stats` is the model minus the statistics'
nodes, and the report holds every share for each backend asked. No timed assertions: the figures
that count come from the demo's models (README: gate cost)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest


@pytest.fixture(scope="module")
def gate_cost(benchmark_module):
    return benchmark_module("gate_cost")


def test_without_gate_output_cuts_only_the_statistics(gate_cost, gated_model, tmp_path):
    cut = gate_cost.without_gate_output(gated_model, tmp_path)
    full, stripped = onnx.load(str(gated_model)), onnx.load(str(cut))
    assert [o.name for o in stripped.graph.output] == [o.name for o in full.graph.output if o.name != "early_stats"]
    gone = {n.name or n.output[0] for n in full.graph.node} - {n.name or n.output[0] for n in stripped.graph.node}
    gone_ops = sorted(n.op_type for n in full.graph.node if (n.name or n.output[0]) in gone)
    assert "Conv" in gone_ops and "ReduceMean" in gone_ops  # the early stage feeds nothing else here
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    a = dict(zip([o.name for o in full.graph.output], ort.InferenceSession(str(gated_model)).run(None, {"image": x})))
    b = dict(zip([o.name for o in stripped.graph.output], ort.InferenceSession(str(cut)).run(None, {"image": x})))
    for name, value in b.items():  # the other outputs are untouched
        np.testing.assert_array_equal(value, a[name])


def test_report_has_every_share(gate_cost, gated_model, tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert gate_cost.main(["--model", str(gated_model), "--backends", "onnx,onnx-int8", "--reps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["backend"] == "onnx" and row["model_ms"] > 0 and row["numpy_part_ms"] > 0
    assert row["total_timed"] == pytest.approx(row["in_graph_timed"] + row["numpy_part"])
    assert row["total_profiled"] == pytest.approx(row["in_graph_profiled"] + row["numpy_part"])
    assert any(kind == "ReduceMean" for kind, _ in row["in_graph_changes"])  # the statistics' own nodes are seen
    from liverstage.runtime.ood import gate_kernels

    assert row["gate_kernels"] == gate_kernels()  # the numpy reference code is timed beside compiled kernels
    assert (row["numpy_code_part_ms"] is not None and row["numpy_code_part_ms"] > 0) is (gate_kernels() == "compiled")
    printed = capsys.readouterr()
    assert "onnx" in printed.out and "no int8 model" in printed.err  # the tiny model has no X.int8.onnx


def test_model_without_early_stats_is_refused(gate_cost, gated_model, tmp_path):
    cut = gate_cost.without_gate_output(gated_model, tmp_path)
    with pytest.raises(SystemExit, match="has no early_stats output"):
        gate_cost.without_gate_output(cut, tmp_path / "again")
