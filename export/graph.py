"""The deployed inference graph: the trained network with its margin stripped.

Training shapes the embedding with a margin head (softmax, ASM, AMCL, DR-AMCL); the deployed
model answers with the cosine between the crop's L2-normalised embedding and each stage's
L2-normalised weight row, i.e. cos(theta) computed as a matmul. There is no acos and no margin in
this graph (acos has an infinite gradient at +-1 and is not needed to rank stages).

Outputs (in this order): `cosine` [N, C], `probs` [N, C], `embedding` [N, D] (normalised),
`early_stats` [N, 2E]: the mean and standard deviation over the image of each of the E channels
of the backbone's early stage (train/backbones.py `early_stage`, read at every `early_row_step`-th
row; the out-of-distribution gate's third detector, runtime/ood.py) and, only while exporting, `feature` [N, D]: the raw pooled
backbone feature, and `early` [N, E, H, W]: the early stage's activation. The exporter uses
the `feature` tensor to find the head (every node downstream of it) and `early` to find the
statistics (every node downstream of it that the feature does not need), keeps both in float32
in FP16 and INT8 models, and then drops `feature` and `early` from the graph outputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from liverstage.runtime.model_meta import EARLY_TENSOR, OUTPUT_NAMES  # the runtime reads the stage by this name too

FEATURE_TENSOR = "feature"
GRAPH_OUTPUTS = OUTPUT_NAMES
EXPORT_ONLY = (FEATURE_TENSOR, EARLY_TENSOR)
# Below this a feature norm is treated as zero (an all-zero ReLU feature); float32 only.
NORM_EPS = 1e-12


# The statistics read every `early_row_step`-th row of the stage, at least this many rows.
EARLY_MIN_ROWS = 28


def early_row_step(height: int) -> int:
    """The row step the early-stage statistics read the stage with: the largest power of two that
    leaves at least EARLY_MIN_ROWS rows (1 up to 55 rows: the 64-px demo model's 16-row stage is
    read whole; 2 for a 224-px crop's 56 rows, read at rows 0, 2, ..., 54).

    Why: the statistics' cost grows with the stage's size while what they measure does not: a
    channel's mean and deviation over 28 evenly spaced full rows (1,568 positions at 224 px) are
    those of the whole stage up to sampling noise, because neighbouring rows of an early
    feature map are strongly correlated. Rows and not a grid: whole rows are contiguous in
    every layout the backends use, so the row slice is a cheap copy (ONNX Runtime int8, 224 px,
    batch 16: 0.3 ms for every 2nd row, 2.1 ms for every 2nd row and column). Per-node profiles,
    same model and batch: ONNX Runtime int8 +4.2 -> +2.6 ms of 86 ms, OpenVINO int8 +1.7 -> +0.6
    ms of 65-72 ms (README: the gate's cost). Why not fewer rows: every 4th row (14 rows) cost
    less still (+1.5 ms on ONNX Runtime int8) but moved single patients' early distances by up
    to 10 % and flagged 2-3 of the 100 fresh phantoms of benchmarks/ood_eval.py where the whole
    stage flags 1; every 2nd row flags the same 1. The image part of the gate (runtime/ood.py)
    reads the crop itself at every row, so a pattern aligned with the skipped rows is still
    seen there."""
    if height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    step = 1
    while height // (2 * step) >= EARLY_MIN_ROWS:
        step *= 2
    return step


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """[N, E, H, W] -> [N, 2E]: each channel's mean and population standard deviation over the
    stage, read at every `early_row_step(H)`-th row, from two means of the rows read: of the
    values (ReduceMean) and of their squares (Mul, ReduceMean), std = sqrt(max(E[x^2] - mean^2, 0)).

    Why this form: the two-pass one (mean, then the mean of the centred squares) made two
    temporaries the size of the stage's activation, and on the CPU backends that was most of the
    statistics' cost (per-node profiles at batch 16, ResNet18 224 px, demo model: ONNX Runtime
    int8 4.4 -> 3.3 ms, OpenVINO int8 5.4 -> 2.4 ms with one pass, docs/architecture.md). The
    sum of squares then came from a root sum of squares (ReduceL2) and that kernel of ONNX
    Runtime is slow: on the 224-px stage's rows read ([16, 64, 28, 56], 2 threads) ReduceL2 took
    0.69 ms where Mul + ReduceMean took 0.25 ms and ReduceMean alone 0.10 ms (0.11 / 0.07 / 0.04
    ms on the 64-px stage), so the squares are made once and averaged by the fast kernel.
    Why it stays accurate: the statistics are float32 in every precision
    (onnx_export.float32_island), so the cancellation in E[x^2] - mean^2 leaves an error in the
    deviation of at most about sqrt(float32 epsilon) = 3.5e-4 times the channel's root mean
    square: small against the norm of the vector the gate normalises (runtime/ood.py), also
    for a bright, nearly constant channel."""
    step = early_row_step(int(x.shape[2]))
    if step > 1:
        x = x[:, :, ::step, :]
    mean = x.mean(dim=(2, 3))
    mean_square = (x * x).mean(dim=(2, 3))
    variance = mean_square - mean * mean
    return torch.cat([mean, torch.sqrt(torch.clamp(variance, min=0.0))], dim=1)


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
        from liverstage.train.backbones import early_stage  # noqa: PLC0415

        trunk_model = net.trunk.model
        self.early_stage, channels = early_stage(trunk_model)
        self.early_stats_dim = 2 * channels
        self._early: list[torch.Tensor] = []
        trunk_model.get_submodule(self.early_stage).register_forward_hook(
            lambda _module, _inputs, output: self._early.append(output))
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
        self._early.clear()
        feature = self.net(image)
        early = self._early[-1]
        self._early.clear()
        embedding = l2_normalise(feature)
        cosine = embedding @ self.class_weight_t
        if self.probs_source == "cosine":
            logits = cosine * (self.scale / self.temperature)
        else:
            logits = (feature @ self.linear_weight_t + self.linear_bias) / self.temperature
        probs = torch.softmax(logits, dim=1)
        stats = channel_stats(early)
        if self.with_feature:
            return cosine, probs, embedding, stats, feature, early
        return cosine, probs, embedding, stats


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
