"""Float32 ONNX -> FP16 ONNX with float32 inputs/outputs and a float32 head.

A 2048-d ReLU feature's sum of squares overflows FP16 (max 65504) and F.normalize's eps rounds to
zero in FP16, so everything downstream of the raw `feature` tensor (L2 normalisation, cosine
matmul, softmax, the softmax baseline's linear layer) stays float32, as one island entered
through one explicit Cast. This is also what TensorRT 11 needs: its networks are strongly typed,
so an FP16 engine is built from an FP16 ONNX model whose float32 parts are explicit.

How: the backbone (every node up to `feature`) is cut out as its own model and converted with
onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True), so it takes a
float32 image and returns a float32 feature; the original float32 head nodes and initializers
are then appended unchanged. (Blocking the head nodes in the converter instead is not enough: it
rounds every blocked node's *output* back to FP16 between nodes, so the sum of squares still
overflows. onnxconverter-common's converter gave a model onnxruntime refused here.)
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .graph import FEATURE_TENSOR
from .onnx_export import ensure_node_names, float32_island

HEAD_SUFFIX = "__fp32"


def _used_names(nodes) -> set[str]:
    return {name for node in nodes for name in node.input if name}


def topological_order(nodes, available: set[str]) -> list:
    """Nodes in an order where every input is produced before use (the converter appends its
    input Casts at the end of the list; ONNX requires sorted graphs)."""
    pending = list(nodes)
    ordered = []
    available = set(available) | {""}
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in available})[:3]
            raise ValueError(f"FP16 graph has unresolved inputs {missing}")
        pending = rest
    return ordered


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return an FP16 copy of a float32 liverstage model (IO and head in float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415

    model = onnx.ModelProto.FromString(model.SerializeToString())  # keep the caller's copy intact
    ensure_node_names(model)
    graph = model.graph
    head_names = set(float32_island(model))
    backbone_nodes = [n for n in graph.node if n.name not in head_names]
    head_nodes = [n for n in graph.node if n.name in head_names]
    produced = {out for n in backbone_nodes for out in n.output}
    if FEATURE_TENSOR not in produced:
        raise ValueError(f"the {FEATURE_TENSOR!r} tensor is not produced by the backbone")
    crossing = [name for name in dict.fromkeys(i for n in head_nodes for i in n.input) if name in produced]

    # 1. the backbone alone: image (float32) -> feature (float32), converted to FP16 inside.
    backbone_used = _used_names(backbone_nodes)
    backbone = helper.make_model(
        helper.make_graph(
            backbone_nodes, "backbone", list(graph.input),
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in crossing],
            initializer=[t for t in graph.initializer if t.name in backbone_used],
        ),
        opset_imports=list(model.opset_import), ir_version=model.ir_version,
    )
    backbone16 = convert_float_to_float16(backbone, keep_io_types=True, disable_shape_infer=False)

    # 2. the float32 head, appended unchanged (initializers renamed where the backbone has the name).
    taken = {t.name for t in backbone16.graph.initializer} | {o for n in backbone16.graph.node for o in n.output}
    head_init = {t.name: t for t in graph.initializer if t.name in _used_names(head_nodes)}
    rename = {name: name + HEAD_SUFFIX for name in head_init if name in taken}
    for node in head_nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    head_initializers = []
    for name, tensor in head_init.items():
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = rename.get(name, name)
        head_initializers.append(copy)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    del out.graph.initializer[:]
    out.graph.initializer.extend(list(backbone16.graph.initializer) + head_initializers)
    known = {t.name for t in out.graph.initializer} | {v.name for v in out.graph.input}
    out.graph.node.extend(topological_order(list(backbone16.graph.node) + head_nodes, known))
    del out.graph.value_info[:]
    head_values = {o for n in head_nodes for o in n.output}
    out.graph.value_info.extend([v for v in backbone16.graph.value_info if v.name not in crossing])
    out.graph.value_info.extend([v for v in graph.value_info if v.name in head_values])
    onnx.checker.check_model(out)
    return out
