"""The deployed inference graph: the trained network with its margin stripped.

Training shapes the embedding with a margin head (softmax, ASM, AMCL, DR-AMCL); the deployed
model answers with the cosine between the crop's L2-normalised embedding and each stage's
L2-normalised weight row, i.e. cos(theta) computed as a matmul. There is no acos and no margin in
this graph (acos has an infinite gradient at +-1 and is not needed to rank stages).

Outputs (in this order): `cosine` [N, C], `probs` [N, C], `embedding` [N, D] (normalised) and,
only while exporting, `feature` [N, D]: the raw pooled backbone feature. The exporter uses the
`feature` tensor to find the head (every node downstream of it), keeps it in float32 in FP16 and
INT8 models, and then drops `feature` from the graph outputs. Nothing else is read from inside
the backbone: the out-of-distribution gate (runtime/ood.py) reads the embedding and the crop.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from liverstage.runtime.model_meta import OUTPUT_NAMES

FEATURE_TENSOR = "feature"
GRAPH_OUTPUTS = OUTPUT_NAMES
EXPORT_ONLY = (FEATURE_TENSOR,)
# Below this a feature norm is treated as zero (an all-zero ReLU feature); float32 only.
NORM_EPS = 1e-12


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """Row-wise x / max(||x||, eps), written out so the ONNX graph has plain, blockable nodes."""
    norm = torch.sqrt(torch.sum(x * x, dim=1, keepdim=True))
    return x / torch.clamp(norm, min=NORM_EPS)


class InferenceGraph(nn.Module):
    """Backbone -> raw feature -> L2 normalise -> cosine against normalised class weights.

    probs_source "cosine": probs = softmax(scale * cosine / temperature) (angular losses).
    probs_source "linear": probs = softmax((W feature + b) / temperature), the softmax baseline's
    linear classifier (Eq. 1, = net.class_logits); `cosine` is still the cosine to its normalised
    rows.
    """

    def __init__(self, net: nn.Module, *, scale: float, temperature: float = 1.0,
                 probs_source: str = "cosine", with_feature: bool = True) -> None:
        super().__init__()
        if probs_source not in ("cosine", "linear"):
            raise ValueError(f"probs_source must be 'cosine' or 'linear', got {probs_source!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.net = net
        self.scale = float(scale)
        self.temperature = float(temperature)
        self.probs_source = probs_source
        self.with_feature = with_feature
        weight = net.head.weight.detach().to(torch.float32)
        # Normalised once here, so the graph holds a constant [D, C] matrix and no weight norm.
        self.register_buffer("class_weight_t", l2_normalise(weight).t().contiguous())
        if probs_source == "linear":
            # The softmax baseline's classifier (Eq. 1), copied as plain buffers: W x + b.
            bias = getattr(net.head, "bias", None)
            if bias is None:
                raise ValueError("probs_source 'linear' needs a head with a bias (the softmax baseline)")
            self.register_buffer("linear_weight_t", weight.t().contiguous())
            self.register_buffer("linear_bias", bias.detach().to(torch.float32).clone())

    def forward(self, image: torch.Tensor):
        feature = self.net(image)
        embedding = l2_normalise(feature)
        cosine = embedding @ self.class_weight_t
        if self.probs_source == "cosine":
            logits = cosine * (self.scale / self.temperature)
        else:
            logits = (feature @ self.linear_weight_t + self.linear_bias) / self.temperature
        probs = torch.softmax(logits, dim=1)
        if self.with_feature:
            return cosine, probs, embedding, feature
        return cosine, probs, embedding


def probs_source_for(loss: str) -> str:
    """The softmax baseline's probabilities come from its linear classifier; all others from cosine."""
    return "linear" if loss == "softmax" else "cosine"


@torch.no_grad()
def torch_reference(graph: InferenceGraph, images, *, batch_size: int = 64) -> dict:
    """PyTorch float32 outputs of `graph` on numpy images [N, 1, S, S] -> dict of numpy arrays."""
    import numpy as np  # noqa: PLC0415

    graph.eval()
    parts: dict[str, list] = {name: [] for name in (*GRAPH_OUTPUTS, *EXPORT_ONLY)}
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32))
        outputs = graph(batch)
        for name, value in zip((*GRAPH_OUTPUTS, *EXPORT_ONLY), outputs):
            parts[name].append(value.numpy())
    return {name: np.concatenate(values) for name, values in parts.items() if values}
