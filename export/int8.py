"""Float32 ONNX -> INT8 ONNX for CPUs: onnxruntime's static QDQ quantisation.

Per-channel signed int8 weights, unsigned uint8 activations (the "U8S8" scheme) calibrated
(MinMax) on real training crops. U8S8 rather than onnxruntime's S8S8 default: on x86 CPUs
without VNNI (this project's 2-core CI machine among them) ONNX Runtime runs only part of the
S8S8 convolutions as integer kernels, and a ResNet18 at 224 px, batch 16, took 432 ms with S8S8
against 120 ms with U8S8 (fp32: 272 ms), same process, same input. The head
(L2 normalisation, cosine matmul, softmax: every node downstream of `feature`) and the
early-stage statistics stay in float (onnx_export.float32_island): quantising a unit vector and
a 3-row weight matrix saves nothing and costs agreement, and the statistics are sums of squares.
The model is first run through onnxruntime's quant_pre_process (shape inference + graph
optimisation), as onnxruntime's quantisation guide recommends. After quantisation the statistics
are rewritten to read the quantised stage itself (`stats_from_quantised_stage`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from liverstage.runtime.model_meta import EARLY_STATS_OUTPUT, INPUT_NAME

from .onnx_export import ensure_node_names, float32_island, upstream_nodes


class CropReader:
    """onnxruntime CalibrationDataReader over crops [N, 1, S, S], in small batches."""

    def __init__(self, images: np.ndarray, *, batch_size: int = 16) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.batch_size = batch_size
        self._start = 0

    def get_next(self):
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start:self._start + self.batch_size]
        self._start += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._start = 0


def to_int8(model: onnx.ModelProto, calibration_images: np.ndarray) -> onnx.ModelProto:
    """Return a QDQ INT8 copy of a float32 liverstage model, calibrated on `calibration_images`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    if len(calibration_images) == 0:
        raise ValueError("INT8 calibration needs at least one crop")

    class _Reader(CropReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="liverstage-int8-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        prepared = Path(tmp) / "prepared.onnx"
        quantised = Path(tmp) / "int8.onnx"
        onnx.save_model(model, source)
        # ONNX's own shape inference, not ONNX Runtime's symbolic one: the symbolic one lacks
        # rules for some reductions (it failed on the ReduceL2 graph.channel_stats once used);
        # the only dynamic dimension here is the batch, which ONNX's inference carries as N.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        prepared_model = onnx.load_model(prepared)
        ensure_node_names(prepared_model)
        head = float32_island(prepared_model)
        onnx.save_model(prepared_model, prepared)
        quantize_static(
            str(prepared), str(quantised), _Reader(calibration_images),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=head,
        )
        out = stats_from_quantised_stage(onnx.load_model(quantised))
    # quant_pre_process drops nothing we rely on, but keep the original metadata/producer fields.
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def stats_from_quantised_stage(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite the early-stage statistics of a QDQ model to read the stage's uint8 codes: the rows
    read (the same Slice), Cast to float32, the mean of the codes and of their squares, and only
    then the stage's scale and zero point on the [N, E] results:
    mean = scale * (mean(c) - zero_point), std = scale * sqrt(max(mean(c * c) - mean(c)^2, 0)).

    Why: quantize_static leaves the statistics reading the stage through its DequantizeLinear,
    and ONNX Runtime gives every consumer edge of a DequantizeLinear its own copy (three for
    x and x * x), so the stage's rows were dequantised three times (ResNet18, 224 px, batch 16,
    2 threads, per-node profiles: DequantizeLinear +1.2-1.4 ms of the model's 75-79 ms; paired
    with the same model quantised without this rewrite, benchmarks/gate_cost.py --int8-model,
    the gate's profiled total 4.0-4.1 % -> 3.3-3.8 % of the model on ONNX Runtime, 3.1-3.5 %
    either way on OpenVINO).
    The variance is shift-invariant, so the zero point is not subtracted from every code.
    Accuracy: the codes (0-255) and their squares are exact in float32 and the zero point and
    scale are applied once, so the statistics differ from the dequantised form only by the
    float32 rounding of the means (on the demo models about 1e-6 of the largest statistic);
    the gate is fitted at export on this model's own statistics (ood_fit), so its banks and
    threshold match what it computes."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    initialisers = {tensor.name: tensor for tensor in graph.initializer}
    stats_nodes, dequantise = [], None
    pending, seen = [EARLY_STATS_OUTPUT], set()
    while pending:  # back from early_stats to the stage's DequantizeLinear
        node = producer.get(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Constant":  # the Slice's bounds may be Constant nodes: kept, reused
            continue
        if node.op_type == "DequantizeLinear":
            if dequantise is not None and dequantise is not node:
                raise ValueError("the early-stage statistics read more than one DequantizeLinear")
            dequantise = node
            continue
        stats_nodes.append(node)
        pending.extend(node.input)
    if dequantise is None:
        raise ValueError("the early-stage statistics do not read a quantised stage (no DequantizeLinear)")
    shared = {node.name for node in stats_nodes} & {
        name for output in graph.output if output.name != EARLY_STATS_OUTPUT for name in upstream_nodes(model, output.name)}
    if shared:
        raise ValueError(f"the early-stage statistics share nodes with the other outputs: {sorted(shared)[:3]}")
    codes, scale_name, zero_name = (list(dequantise.input) + [""])[:3]
    if scale_name not in initialisers or zero_name not in initialisers:
        raise ValueError("the early stage's scale and zero point are not constants")
    scale = numpy_helper.to_array(initialisers[scale_name])
    zero_point = numpy_helper.to_array(initialisers[zero_name])
    if scale.size != 1 or zero_point.size != 1:
        raise ValueError("the early stage is not quantised per tensor")
    slices = [node for node in stats_nodes if node.op_type == "Slice"]
    if len(slices) > 1 or (slices and slices[0].input[0] != dequantise.output[0]):
        raise ValueError("unexpected row slice in the early-stage statistics")

    def constant(name: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    graph.initializer.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "early_codes_axes"))
    new_nodes, read = [], codes
    if slices:
        new_nodes.append(helper.make_node("Slice", [codes, *slices[0].input[1:]], ["early_codes_rows"],
                                          name="early_codes_slice"))
        read = "early_codes_rows"
    new_nodes += [
        helper.make_node("Cast", [read], ["early_codes"], to=TensorProto.FLOAT, name="early_codes_cast"),
        helper.make_node("ReduceMean", ["early_codes", "early_codes_axes"], ["early_codes_mean"], keepdims=0,
                         name="early_codes_mean"),
        helper.make_node("Mul", ["early_codes", "early_codes"], ["early_codes_square"], name="early_codes_square"),
        helper.make_node("ReduceMean", ["early_codes_square", "early_codes_axes"], ["early_codes_mean_square"],
                         keepdims=0, name="early_codes_mean_square"),
        helper.make_node("Mul", ["early_codes_mean", "early_codes_mean"], ["early_codes_mean_2"],
                         name="early_codes_mean_2"),
        helper.make_node("Sub", ["early_codes_mean_square", "early_codes_mean_2"], ["early_codes_variance"],
                         name="early_codes_variance"),
        helper.make_node("Max", ["early_codes_variance", constant("early_codes_zero", 0.0)],
                         ["early_codes_variance_clamped"], name="early_codes_clamp"),
        helper.make_node("Sqrt", ["early_codes_variance_clamped"], ["early_codes_std"], name="early_codes_sqrt"),
        helper.make_node("Mul", ["early_codes_std", constant("early_stage_scale", scale.reshape(()))],
                         ["early_codes_std_scaled"], name="early_codes_std_scaled"),
        helper.make_node("Sub", ["early_codes_mean", constant("early_stage_zero_point", zero_point.reshape(()))],
                         ["early_codes_centred"], name="early_codes_centre"),
        helper.make_node("Mul", ["early_codes_centred", "early_stage_scale"],
                         ["early_codes_mean_scaled"], name="early_codes_mean_scaled"),
        helper.make_node("Concat", ["early_codes_mean_scaled", "early_codes_std_scaled"], [EARLY_STATS_OUTPUT], axis=1,
                         name="early_codes_concat"),
    ]
    removed = {node.name for node in stats_nodes}
    kept = [node for node in graph.node if node.name not in removed]
    if not any(dequantise.output[0] in node.input for node in kept if node is not dequantise):
        kept.remove(dequantise)
    produced = {out for node in kept for out in node.output}
    clash = produced & {out for node in new_nodes for out in node.output}
    if clash:
        raise ValueError(f"tensor names already in the graph: {sorted(clash)}")
    used = {name for node in kept + new_nodes for name in node.input}
    stale_info = [info for info in graph.value_info if info.name not in produced]
    for info in stale_info:
        graph.value_info.remove(info)
    del graph.node[:]
    graph.node.extend(kept + new_nodes)  # the new nodes read only the codes and constants: still sorted
    stale = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in stale:
        graph.initializer.remove(tensor)
    onnx.checker.check_model(model)
    return model
