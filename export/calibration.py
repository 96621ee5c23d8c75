"""The softmax temperature, fitted at export time from real crops.

Temperature (optional): with C = 3 and s = 30 the softmax saturates, so a model's probabilities
are overconfident. T is fitted on labelled validation crops by minimising the negative
log-likelihood of softmax(logits / T) (Guo et al. 2017, "On Calibration of Modern Neural
Networks"), with LBFGS over log T. It changes probabilities, never the predicted stage.
"""

from __future__ import annotations

import math

import numpy as np

T_MIN, T_MAX = 0.05, 100.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> float:
    """T minimising NLL of softmax(logits / T) on (logits [N, C], labels [N]); 1.0 if N == 0."""
    import torch  # noqa: PLC0415

    if len(labels) == 0:
        return 1.0
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    value = float(log_t.detach().exp())
    if not math.isfinite(value):
        return 1.0
    return float(min(max(value, T_MIN), T_MAX))


def base_logits(graph, reference: dict) -> np.ndarray:
    """Logits before temperature for crops whose `torch_reference(graph, ...)` is `reference`:
    scale * cosine (angular heads) or W feature + b (the softmax baseline)."""
    if graph.probs_source == "cosine":
        return graph.scale * reference["cosine"].astype(np.float64)
    weight_t = graph.linear_weight_t.detach().double().numpy()
    bias = graph.linear_bias.detach().double().numpy()
    return reference["feature"].astype(np.float64) @ weight_t + bias


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / T) (for reporting the fit)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())
