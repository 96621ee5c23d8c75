"""The paper's metrics (and a few beyond it), one module for training, `evaluate` and experiments.

`compute_metrics(labels, probs, patient_ids)`:
- accuracy, per-stage precision / recall / F1 (scikit-learn), confusion matrix (rows = true);
- mr_a_to_c = share of stage-A crops predicted C, mr_c_to_a = share of C crops predicted A
  (the paper's mis-staging rates);
- kappa_quadratic: Cohen's kappa with quadratic weights (stages are ordered);
- patient_accuracy: each patient's stage = argmax of the mean probability over their crops;
- auc_b_or_c_vs_a (stage >= B) and auc_c_vs_ab (stage C), from P(B)+P(C) and P(C);
- accuracy_ci95, patient_accuracy_ci95: {"low", "high"}, a 95 % percentile bootstrap over test
  *patients* (2000 resamples, fixed seed). Why patients: crops of one patient are correlated,
  so resampling crops would give a falsely narrow interval. One test split of two dozen
  patients has a wide interval, and the model card shows it beside the figure.

A class absent from the test set does not crash anything: its precision / recall / F1 are 0
(scikit-learn's zero_division=0), a mis-staging rate with no crops of its source stage is NaN,
and an AUC whose positive or negative set is empty is NaN. metrics.json holds them
as null (runtime/jsonsafe.py, the one NaN policy).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from liverstage.runtime.stages import STAGES

from .stats import bootstrap_interval

METRIC_KEYS = (
    "accuracy", "f1_A", "f1_B", "f1_C", "precision_A", "precision_B", "precision_C",
    "recall_A", "recall_B", "recall_C", "mr_a_to_c", "mr_c_to_a", "kappa_quadratic",
    "patient_accuracy", "auc_b_or_c_vs_a", "auc_c_vs_ab", "confusion", "n_crops", "n_patients",
    "accuracy_ci95", "patient_accuracy_ci95",
)
BOOTSTRAP_RESAMPLES = 2000


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive.astype(int), score))


def _rate(confusion: np.ndarray, true: int, predicted: int) -> float:
    total = confusion[true].sum()
    return float(confusion[true, predicted] / total) if total else float("nan")


def compute_metrics(labels: Sequence[int], probs: np.ndarray, patient_ids: Sequence[str]) -> dict[str, Any]:
    """Metrics over crops (and patients); see the module docstring for each key."""
    from sklearn.metrics import (  # noqa: PLC0415
        accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    pids = np.asarray([str(x) for x in patient_ids])
    k = len(STAGES)
    if y.ndim != 1 or p.shape != (len(y), k) or len(pids) != len(y):
        raise ValueError(f"need labels [N], probs [N, {k}], patient_ids [N]; got {y.shape}, {p.shape}, {pids.shape}")
    if len(y) == 0:
        raise ValueError("no crops to evaluate")
    classes = list(range(k))
    pred = p.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    confusion = confusion_matrix(y, pred, labels=classes)
    if len(np.unique(np.concatenate([y, pred]))) > 1:
        kappa = float(cohen_kappa_score(y, pred, labels=classes, weights="quadratic"))
    else:
        kappa = float("nan")  # one class in truth and prediction: kappa is undefined (0/0)
    out: dict[str, Any] = {"accuracy": float(accuracy_score(y, pred))}
    for i, stage in enumerate(STAGES):
        out[f"f1_{stage}"] = float(f1[i])
    for i, stage in enumerate(STAGES):
        out[f"precision_{stage}"] = float(precision[i])
    for i, stage in enumerate(STAGES):
        out[f"recall_{stage}"] = float(recall[i])
    a, c = STAGES.index("A"), STAGES.index("C")
    out["mr_a_to_c"] = _rate(confusion, a, c)
    out["mr_c_to_a"] = _rate(confusion, c, a)
    out["kappa_quadratic"] = kappa
    # Patient level: mean probability over the patient's crops; a patient has one stage.
    unique = sorted(set(pids.tolist()))
    patient_hit = np.zeros(len(unique))
    crops_correct = np.zeros(len(unique))
    crops_total = np.zeros(len(unique))
    for i, pid in enumerate(unique):
        sel = pids == pid
        patient_hit[i] = p[sel].mean(axis=0).argmax() == np.bincount(y[sel], minlength=k).argmax()
        crops_correct[i] = (pred[sel] == y[sel]).sum()
        crops_total[i] = sel.sum()
    out["patient_accuracy"] = float(patient_hit.mean())
    out["auc_b_or_c_vs_a"] = _auc(y >= STAGES.index("B"), p[:, STAGES.index("B"):].sum(axis=1))
    out["auc_c_vs_ab"] = _auc(y == c, p[:, c])
    out["confusion"] = confusion.astype(int).tolist()
    out["n_crops"] = int(len(y))
    out["n_patients"] = len(unique)
    out["accuracy_ci95"] = _patient_interval(crops_correct / crops_total, weights=crops_total)
    out["patient_accuracy_ci95"] = _patient_interval(patient_hit)
    return out


def _patient_interval(per_patient: np.ndarray, *, weights: np.ndarray | None = None) -> dict[str, float]:
    """{"low", "high"}: NaN (None in JSON) with a single test patient."""
    interval = bootstrap_interval(per_patient, weights=weights, n_resamples=BOOTSTRAP_RESAMPLES)
    return {"low": interval.low, "high": interval.high}
