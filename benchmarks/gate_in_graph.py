"""What the out-of-distribution gate would cost as ONNX nodes inside the model, against what it
costs now (the `early_stats` output in the graph, runtime/ood.py's numpy after it). A design
option measured; the runtime does not use it.

    python benchmarks/gate_in_graph.py --model liverstage-demo/model.onnx [--batch 16] [--threads 2] [--reps 8]

Why: the gate's numpy part is a few dozen small operations whose fixed cost (about 0.5 ms per
batch) does not shrink with the crop, so on the 64-px demo's int8 and bf16 models the gate misses
its <= 5 % target (README: the gate's cost). One proposed way out is to run the whole gate inside
the graph, where the backend's kernels would replace numpy's per-call overhead. This script
appends the whole gate to the exported model as ONNX nodes built from the gate in its metadata:
the image descriptor (AveragePool levels, ReduceMean, Slice and Sub for the neighbour
differences, the histogram as the share of pixels at or above each bin edge, the layout as two
MatMuls with runtime/ood.py's `layout_matrix`), the standardisation, and for each part its kNN
(MatMul with the bank, TopK); one more output, `ood_distances` [N, 3] (embedding, early, image).
Before timing, those distances are checked against runtime/ood.py's for the same crops and model
outputs (ONNX Runtime, float32; a pixel exactly on a bin edge could fall on the other side, hence
a tolerance, not equality); the script stops if they disagree.

Then, on each backend (as benchmarks/gate_cost.py: its sessions, settings and profiles), three
models timed alternately in blocks of 10 runs, `--reps` times: without the gate (the reference),
as exported (its in-graph part; plus the numpy part, p50 on its outputs), and with the whole gate
in the graph (nothing left after it but reading three numbers per crop). Every share is of the
model without the gate, timed in the same run; the profiled figure is the net change of the
per-node time outside convolutions, as in gate_cost.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gate_cost import (BACKENDS, in_graph_profiled, numpy_part_ms, parse_command_line, timed_and_profiled, timed_share,
                       without_gate_output, write_report)
from liverstage.runtime.backends import open_backend
from liverstage.runtime.model_meta import INPUT_NAME
from liverstage.runtime.ood import (HISTOGRAM_BINS, LAYOUT_BLOCKS, NORM_EPS, PARTS, SPHERE_PARTS, TEXTURE_SCALES,
                                    OodGate, descriptor_factor, gate_kernels, layout_matrix)

DISTANCES_OUTPUT = "ood_distances"
AGREEMENT_RTOL = 1e-3


class GraphBuilder:
    """Nodes and constants appended to a graph, each output named by a running number."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []

    def _name(self, prefix: str) -> str:
        return f"gate_{prefix}{len(self.nodes) + len(self.constants)}"

    def const(self, value) -> str:
        name = self._name("c")
        self.constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def floats(self, value) -> str:
        return self.const(np.asarray(value, dtype=np.float32))

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attributes) -> str | list[str]:
        names = [self._name("t") + f"_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attributes))
        return names[0] if outputs == 1 else names

    def reduce(self, op_type: str, x: str, axes: list[int]) -> str:
        """A reduction keeping its axes: before opset 18 they are an attribute, from 18 an input."""
        if self.opset >= 18:
            return self.op(op_type, [x, self.ints(*axes)], keepdims=1)
        return self.op(op_type, [x], axes=axes, keepdims=1)


def descriptor_nodes(g: GraphBuilder, image: str, gate: OodGate, crop_size: int) -> str:
    """runtime/ood.py `image_descriptor` then the gate's standardisation, as nodes: [N, 1, S, S] -> [N, 84]."""
    hw = [2, 3]
    factor = descriptor_factor(crop_size)
    x = g.op("AveragePool", [image], kernel_shape=[factor, factor], strides=[factor, factor]) if factor > 1 else image
    levels, sizes = [x], [crop_size // factor]
    for _ in TEXTURE_SCALES[1:]:
        if sizes[-1] >= 4:
            levels.append(g.op("AveragePool", [levels[-1]], kernel_shape=[2, 2], strides=[2, 2]))
            sizes.append(sizes[-1] // 2)
        else:
            levels.append(levels[-1])
            sizes.append(sizes[-1])
    centred = g.op("Sub", [x, g.reduce("ReduceMean", x, hw)])
    variance = g.reduce("ReduceMean", g.op("Mul", [centred, centred]), hw)
    spread = g.op("Max", [g.op("Sqrt", [variance]), g.floats(1e-6)])
    texture = []
    for level in levels:
        means = []
        for axis in (2, 3):
            ahead = g.op("Slice", [level, g.ints(1), g.ints(2**31 - 1), g.ints(axis)])
            behind = g.op("Slice", [level, g.ints(0), g.ints(-1), g.ints(axis)])
            means.append(g.reduce("ReduceMean", g.op("Abs", [g.op("Sub", [ahead, behind])]), hw))
        texture.append(g.op("Div", [g.op("Add", means), spread]))
    texture = g.op("Reshape", [g.op("Concat", texture + [spread], axis=1), g.ints(-1, len(TEXTURE_SCALES) + 1)])
    low, high = gate.clip
    width = max(high - low, 1e-6) / HISTOGRAM_BINS
    edges = (low + width * np.arange(1, HISTOGRAM_BINS)).astype(np.float32).reshape(1, -1, 1, 1)
    at_or_above = g.op("Cast", [g.op("GreaterOrEqual", [levels[1], g.floats(edges)])], to=TensorProto.FLOAT)
    shares = g.op("Reshape", [g.reduce("ReduceMean", at_or_above, hw), g.ints(-1, HISTOGRAM_BINS - 1)])
    differences = np.zeros((HISTOGRAM_BINS - 1, HISTOGRAM_BINS), dtype=np.float32)  # bin j = share >= edge j - share >= edge j+1
    for edge in range(1, HISTOGRAM_BINS):
        differences[edge - 1, edge] += 1.0
        differences[edge - 1, edge - 1] -= 1.0
    first_bin = np.eye(1, HISTOGRAM_BINS, dtype=np.float32)[0]  # every pixel is at or above edge 0
    histogram = g.op("Add", [g.op("MatMul", [shares, g.floats(differences)]), g.floats(first_bin)])
    coarse_size, coarse = next(((s, lv) for s, lv in zip(reversed(sizes), reversed(levels)) if s >= LAYOUT_BLOCKS),
                               (sizes[0], x))
    rows = layout_matrix(coarse_size)
    blocks = g.op("MatMul", [g.op("MatMul", [g.floats(rows), coarse]), g.floats(np.ascontiguousarray(rows.T))])
    layout = g.op("Reshape", [blocks, g.ints(-1, LAYOUT_BLOCKS**2)])
    descriptor = g.op("Concat", [layout, histogram, texture], axis=1)
    return g.op("Mul", [g.op("Sub", [descriptor, g.floats(gate.image_mean)]), g.floats(1.0 / gate.image_scale)])


def kth_largest(g: GraphBuilder, values: str, k: int) -> str:
    top, _ = g.op("TopK", [values, g.ints(k)], outputs=2, axis=1)
    return g.op("Slice", [top, g.ints(k - 1), g.ints(k), g.ints(1)])  # [N, 1]


def with_whole_gate(path: Path, folder: Path) -> Path:
    """The model at `path` with the whole gate of its metadata appended and its distances as the
    output DISTANCES_OUTPUT, saved in `folder`."""
    backend = open_backend(path, threads=1)
    gate = OodGate.from_metadata(backend.metadata, source=str(path))
    if gate is None:
        raise SystemExit(f"{path}: carries no out-of-distribution gate")
    model = onnx.load(str(path))
    g = GraphBuilder(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
    distances = {}
    for part, output in SPHERE_PARTS.items():
        norm = g.op("Sqrt", [g.reduce("ReduceSumSquare", output, [1])])
        coordinates = g.op("Div", [g.op("MatMul", [output, g.floats(gate.bases[part])]), g.op("Max", [norm, g.floats(NORM_EPS)])])
        cosine = kth_largest(g, g.op("MatMul", [coordinates, g.floats(gate._sphere_banks_t[part])]), gate.k[part])
        squared = g.op("Sub", [g.floats(2.0), g.op("Mul", [g.floats(2.0), cosine])])
        distances[part] = g.op("Sqrt", [g.op("Clip", [squared, g.floats(0.0), g.floats(4.0)])])
    features = descriptor_nodes(g, INPUT_NAME, gate, backend.metadata.preprocess.crop_size)
    bank_t, bank_sq = gate._image_bank
    # -|f - b|^2 = 2 f.b - |b|^2 - |f|^2: the k-th largest of 2 f.b - |b|^2 is |f|^2 less the k-th smallest squared distance
    closeness = g.op("Sub", [g.op("MatMul", [features, g.floats(2.0 * bank_t)]), g.floats(bank_sq)])
    squared = g.op("Sub", [g.reduce("ReduceSumSquare", features, [1]), kth_largest(g, closeness, gate.k["image"])])
    distances["image"] = g.op("Sqrt", [g.op("Relu", [squared])])
    g.nodes.append(helper.make_node("Concat", [distances[part] for part in PARTS], [DISTANCES_OUTPUT], axis=1))
    model.graph.node.extend(g.nodes)
    model.graph.initializer.extend(g.constants)
    model.graph.output.append(helper.make_tensor_value_info(DISTANCES_OUTPUT, TensorProto.FLOAT, [None, len(PARTS)]))
    onnx.checker.check_model(model)
    out = folder / f"{path.stem}.whole-gate.onnx"
    onnx.save(model, str(out))
    return out


def disagreement(path: Path, whole: Path, batch: np.ndarray) -> float:
    """The largest relative difference between the in-graph distances and runtime/ood.py's on the
    same crops (ONNX Runtime, float32)."""
    import onnxruntime as ort  # noqa: PLC0415

    session = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {INPUT_NAME: batch})))
    gate = OodGate.from_metadata(open_backend(path, threads=1).metadata)
    expected = gate.scores(outputs, batch)
    in_graph = outputs[DISTANCES_OUTPUT].astype(np.float64)
    return max(float(np.max(np.abs(in_graph[:, i] - getattr(expected, part)) / np.maximum(getattr(expected, part), 1e-6)))
               for i, part in enumerate(PARTS))


def measure(name: str, models: dict[str, Path], batch: np.ndarray, args) -> dict:
    """model ms and the two designs' in-graph shares, timed and profiled, on one backend."""
    times, profiles = timed_and_profiled(name, models, batch, args)
    row: dict = {"backend": name, "model_ms": float(np.median(np.concatenate(times["plain"]))) * 1e3}
    for label in ("exported", "whole"):
        row[f"{label}_timed"], row[f"{label}_timed_blocks"] = timed_share(times, label, "plain")
        total, changes = in_graph_profiled(profiles[label], profiles["plain"])
        row[f"{label}_profiled"] = total / row["model_ms"]
        row[f"{label}_changes"] = [[kind, round(delta, 4)] for delta, kind in changes]
    return row


def main(argv: list[str] | None = None) -> int:
    args, names, paths = parse_command_line(argv, __doc__.split("\n\n")[0])
    kinds = sorted({BACKENDS[n][0] for n in names})
    size = open_backend(paths[kinds[0]], threads=1).metadata.preprocess.crop_size
    batch = np.random.default_rng(0).standard_normal((args.batch, 1, size, size)).astype(np.float32)  # as `liverstage bench`
    rows = []
    with tempfile.TemporaryDirectory(prefix="liverstage-gate-in-graph-") as tmp:
        models, numpy_ms, agreement = {}, {}, {}
        for kind in kinds:
            models[kind] = {"plain": without_gate_output(paths[kind], Path(tmp)), "exported": paths[kind],
                            "whole": with_whole_gate(paths[kind], Path(tmp))}
            agreement[kind] = disagreement(paths[kind], models[kind]["whole"], batch)
            if agreement[kind] > AGREEMENT_RTOL:
                raise SystemExit(f"{paths[kind]}: the in-graph distances differ from runtime/ood.py's by "
                                 f"{agreement[kind]:.2e} (relative): not timed")
            numpy_ms[kind] = numpy_part_ms(open_backend(paths[kind], threads=args.threads), batch, 50)[gate_kernels()]
        print(f"{args.model} ({size} px), batch {args.batch}, {args.threads} threads; shares of the model without the "
              f"gate, timed in this run; in-graph distances agree with runtime/ood.py's to "
              + ", ".join(f"{agreement[k]:.1e} ({k})" for k in kinds))
        print(f"{'backend':14s} {'model ms':>9s} {'now: in graph + numpy = total (timed / profiled)':>50s} "
              f"{'whole gate in graph (timed [blocks] / profiled)':>48s}")
        for name in names:
            kind = BACKENDS[name][0]
            row = measure(name, models[kind], batch, args)
            row["numpy_part"] = numpy_ms[kind] / row["model_ms"]
            row["now_timed"] = row["exported_timed"] + row["numpy_part"]
            row["now_profiled"] = row["exported_profiled"] + row["numpy_part"]
            row["agreement"] = agreement[kind]
            lo, hi = row["whole_timed_blocks"]
            print(f"{name:14s} {row['model_ms']:9.2f} {100 * row['exported_timed']:+9.1f} % + {100 * row['numpy_part']:4.1f} % = "
                  f"{100 * row['now_timed']:5.1f} % / {100 * row['now_profiled']:5.1f} %"
                  f" {100 * row['whole_timed']:+17.1f} % [{100 * lo:+5.1f},{100 * hi:+5.1f}] / {100 * row['whole_profiled']:5.1f} %")
            print(f"{'':14s} whole gate, largest changes (ms): "
                  + ", ".join(f"{k} {d:+.3f}" for k, d in row["whole_changes"][:4]))
            rows.append(row)
    write_report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
