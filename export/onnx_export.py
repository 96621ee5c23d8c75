"""torch -> ONNX (float32) for the inference graph, plus small ONNX graph utilities.

The exporter is torch.onnx.export with dynamo=True (the default exporter in torch >= 2.9), a
dynamic batch dimension and opset 18. The graph keeps the raw backbone feature as a named tensor
(`feature`) so that FP16 / INT8 conversion can find the head; it is not a graph output.
"""

from __future__ import annotations

import io
import warnings
from typing import Iterable

import onnx

from liverstage.runtime.errors import ModelError
from liverstage.runtime.model_meta import INPUT_NAME, METADATA_KEY, ModelMetadata

from .graph import EXPORT_ONLY, GRAPH_OUTPUTS, InferenceGraph

OPSET = 18
MAX_BATCH_DIM = 4096


def export_fp32(graph: InferenceGraph, *, crop_size: int) -> onnx.ModelProto:
    """Export `graph` (with its `feature` output) to an in-memory float32 ONNX model.

    Input `image` float32 [N, 1, S, S] with N dynamic; outputs cosine, probs, embedding. The
    `feature` tensor keeps its name inside the graph but is removed from the outputs.
    """
    import torch  # noqa: PLC0415

    graph = graph.eval()
    if not graph.with_feature:
        raise ValueError("export_fp32 needs InferenceGraph(with_feature=True)")
    example = torch.zeros(2, 1, crop_size, crop_size, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH_DIM)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, (example,), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[INPUT_NAME], output_names=[*GRAPH_OUTPUTS, *EXPORT_ONLY],
            dynamic_shapes=({0: batch},), optimize=True,
        )
    model = program.model_proto
    _name_batch_dim(model, "N")
    drop_outputs(model, EXPORT_ONLY)
    check_graph(model)
    return model


def _name_batch_dim(model: onnx.ModelProto, name: str) -> None:
    """Give the dynamic first dimension of every graph input/output one readable name."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def drop_outputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    names = set(names)
    keep = [out for out in model.graph.output if out.name not in names]
    del model.graph.output[:]
    model.graph.output.extend(keep)


def downstream_nodes(model: onnx.ModelProto, tensor: str) -> list[str]:
    """Names of every node that (transitively) consumes `tensor`; the exported head."""
    reached = {tensor}
    names = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(name in reached for name in node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


def float32_island(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that stay float32 in FP16 and INT8 models: the head (everything
    downstream of `feature`). Its norm is a sum of squares over many values, which overflows
    FP16 on bright inputs, and the gate's distances need the embedding in float32."""
    from .graph import FEATURE_TENSOR  # noqa: PLC0415

    head = downstream_nodes(model, FEATURE_TENSOR)
    if not head:
        raise ValueError(f"cannot find the head (downstream of {FEATURE_TENSOR!r}) in this graph")
    return head


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give unnamed nodes unique names (node block/exclude lists work by name)."""
    seen = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in seen:
                candidate += "_"
            node.name = candidate
            seen.add(candidate)


def op_types(model: onnx.ModelProto) -> set[str]:
    ops = set()
    for node in model.graph.node:
        ops.add(node.op_type)
    for function in model.functions:
        ops.update(node.op_type for node in function.node)
    return ops


def check_graph(model: onnx.ModelProto) -> None:
    """Contract checks on an exported graph: IO names and no Acos anywhere (no margin)."""
    if "Acos" in op_types(model):
        raise ModelError("exported graph contains an Acos node; the inference head must be cos(theta) only")
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(GRAPH_OUTPUTS):
        raise ModelError(f"exported graph has inputs {inputs} and outputs {outputs}; "
                         f"expected [{INPUT_NAME!r}] and {list(GRAPH_OUTPUTS)}")


def set_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Store ModelMetadata JSON under metadata_props['liverstage'] (replacing any previous one)."""
    keep = [prop for prop in model.metadata_props if prop.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = metadata.to_json()
    model.producer_name = "liverstage"


def get_metadata(model: onnx.ModelProto, *, source: str = "model") -> ModelMetadata:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return ModelMetadata.from_json(prop.value, source=source)
    raise ModelError(f"{source}: no liverstage metadata in this ONNX model")


def to_bytes(model: onnx.ModelProto) -> bytes:
    """Serialise a (< 2 GB) model to one self-contained byte string."""
    buffer = io.BytesIO()
    onnx.save_model(model, buffer)
    return buffer.getvalue()
