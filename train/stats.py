"""Paired comparisons over repeated splits: is a gain larger than split-to-split noise?

Every method in an experiment sees the same patient-level splits, so method X and the softmax
baseline form pairs (one pair per run). We summarise the paired differences d_r = X_r - base_r
with a confidence interval for their mean.

Two intervals are offered:

- `t_interval`: the Student t interval mean(d) +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n). This is the
  one shown in the experiment tables. With the paper's six runs (or fewer) it is the honest
  choice: it widens properly when n is tiny (t_{0.975,1} = 12.7 for two runs).
- `bootstrap_interval`: the percentile interval of the mean over resampled runs (paired: the run
  index is resampled, so each resample keeps X and baseline together), with a fixed seed so the
  numbers are reproducible. It is reported in results.json as a cross-check; with very few runs it
  is known to be too narrow (few distinct resamples), which is why the tables use the t interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from liverstage.runtime.jsonsafe import json_safe

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Interval:
    """Mean of the paired differences and its confidence interval (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    method: str  # "t" or "bootstrap"

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def _as_1d(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per run (1-D), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values: {arr.tolist()}")
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def paired_differences(values, baseline) -> np.ndarray:
    """d_r = values_r - baseline_r for runs r (both must list the same runs in the same order)."""
    a = _as_1d(values, "values")
    b = _as_1d(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same runs: {a.size} values vs {b.size} baseline values")
    return a - b


def t_interval(diffs, *, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Student t confidence interval for the mean of `diffs`."""
    _check_confidence(confidence)
    d = _as_1d(diffs, "diffs")
    n = d.size
    if n == 0:
        raise ValueError("no differences to summarise")
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, confidence, "t")
    from scipy import stats  # noqa: PLC0415  (scipy comes with scikit-learn)

    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence, "t")


def bootstrap_interval(diffs, *, weights=None, confidence: float = DEFAULT_CONFIDENCE,
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Interval:
    """Percentile bootstrap interval for the mean of paired differences (fixed seed).

    The same resampling serves metrics.py's intervals over test patients: there the values are
    per-patient accuracies and `weights` their crop counts, so each resample's statistic is the
    crop-weighted mean (= crop accuracy of the resampled patients).
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    d = _as_1d(diffs, "diffs")
    n = d.size
    if n == 0:
        raise ValueError("no differences to summarise")
    w = np.ones_like(d) if weights is None else _as_1d(weights, "weights")
    if w.shape != d.shape or not (w > 0).all():
        raise ValueError(f"weights must be positive, one per value; got {w.shape} for {d.shape}")
    mean = float((d * w).sum() / w.sum())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, confidence, "bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    means = (d * w)[idx].sum(axis=1) / w[idx].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # The percentile interval of means always brackets the sample mean up to float rounding;
    # make that exact so "the interval contains the observed mean" holds without tolerance.
    return Interval(mean, float(min(low, mean)), float(max(high, mean)), n, confidence, "bootstrap")


def paired_comparison(values, baseline, *, confidence: float = DEFAULT_CONFIDENCE,
                      seed: int = DEFAULT_SEED) -> dict:
    """Both intervals for values - baseline, as a JSON-ready dict."""
    d = paired_differences(values, baseline)
    return {
        "differences": d.tolist(),
        "t": t_interval(d, confidence=confidence).to_dict(),
        "bootstrap": bootstrap_interval(d, confidence=confidence, seed=seed).to_dict(),
    }
