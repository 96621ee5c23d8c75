"""A tiny liverstage-shaped ONNX model built with onnx.helper (no torch), for fast runtime tests.

Graph (same interface as an exported model): image [N,1,S,S] -> AveragePool to a grid x grid map
-> flatten -> MatMul -> embedding [N,D] -> L2 normalise -> MatMul with L2-normalised class
weights -> cosine [N,3]; probs = Softmax(scale * cosine). The weights are random but fixed by the
seed, so the model gives different, deterministic answers for different crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from liverstage.runtime.model_meta import ModelMetadata
from liverstage.runtime.spec import PreprocessSpec


def tiny_metadata(*, crop_size: int = 32, ood: dict | None = None,
                  embedding_dim: int = 8, scale: float = 30.0, extra: dict | None = None) -> ModelMetadata:
    return ModelMetadata(
        class_names=("A", "B", "C"),
        preprocess=PreprocessSpec(crop_size=crop_size),
        backbone="tiny-test",
        loss="amcl",
        scale=scale,
        margin=0.5,
        temperature=1.0,
        probs_source="cosine",
        precision="fp32",
        embedding_dim=embedding_dim,
        checkpoint_sha256="0" * 64,
        versions={"test": "1"},
        ood=ood,
        extra=dict(extra or {}),
    )



def build_tiny_onnx(path: str | Path, *, crop_size: int = 32, grid: int = 4, embedding_dim: int = 8,
                    seed: int = 0, metadata: ModelMetadata | None = None, with_metadata: bool = True,
                    scale: float = 30.0) -> Path:
    """Write the tiny model to `path`; `with_metadata=False` writes one without our metadata."""
    if crop_size % grid:
        raise ValueError("crop_size must be a multiple of grid")
    rng = np.random.default_rng(seed)
    k = crop_size // grid
    w_embed = rng.standard_normal((grid * grid, embedding_dim)).astype(np.float32)
    w_cls = rng.standard_normal((3, embedding_dim)).astype(np.float32)
    w_cls_t = (w_cls / np.linalg.norm(w_cls, axis=1, keepdims=True)).T.astype(np.float32)
    inits = [
        numpy_helper.from_array(w_embed, "w_embed"),
        numpy_helper.from_array(w_cls_t, "w_cls_t"),
        numpy_helper.from_array(np.array([-1, grid * grid], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_embed"], ["raw"]),
        helper.make_node("Mul", ["raw", "raw"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axis1"], ["sumsq"], keepdims=1),
        helper.make_node("Sqrt", ["sumsq"], ["norm0"]),
        helper.make_node("Max", ["norm0", "eps"], ["norm"]),
        helper.make_node("Div", ["raw", "norm"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w_cls_t"], ["cosine"]),
        helper.make_node("Mul", ["cosine", "scale"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_liverstage",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, crop_size, crop_size])],
        [helper.make_tensor_value_info("cosine", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", embedding_dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="liverstage-tests")
    model.ir_version = 8
    if with_metadata:
        meta = metadata or tiny_metadata(crop_size=crop_size, embedding_dim=embedding_dim, scale=scale)
        helper.set_model_props(model, {"liverstage": meta.to_json()})
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
