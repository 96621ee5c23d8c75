"""compute_metrics on hand-checked cases, including a stage absent from the test set."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from liverstage.runtime.jsonsafe import json_safe
from liverstage.train.metrics import METRIC_KEYS, compute_metrics


def _onehot_probs(pred, confident=0.8):
    p = np.full((len(pred), 3), (1 - confident) / 2)
    p[np.arange(len(pred)), pred] = confident
    return p


def test_hand_checked_example():
    # true:  A A A A  B B B  C C C
    # pred:  A A B C  B B A  C C A
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 2, 1, 1, 0, 2, 2, 0]
    pids = ["p1", "p1", "p2", "p2", "p3", "p3", "p3", "p4", "p4", "p4"]
    m = compute_metrics(labels, _onehot_probs(pred), pids)
    assert set(METRIC_KEYS) <= set(m)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["confusion"] == [[2, 1, 1], [1, 2, 0], [1, 0, 2]]
    assert m["mr_a_to_c"] == pytest.approx(1 / 4)
    assert m["mr_c_to_a"] == pytest.approx(1 / 3)
    # A: precision 2/4 (predicted A: 2 right of 4), recall 2/4 -> F1 0.5
    assert m["precision_A"] == pytest.approx(0.5) and m["recall_A"] == pytest.approx(0.5)
    assert m["f1_A"] == pytest.approx(0.5)
    # B: precision 2/3, recall 2/3; C: precision 2/3, recall 2/3
    assert m["f1_B"] == pytest.approx(2 / 3) and m["f1_C"] == pytest.approx(2 / 3)
    # Patients: p1 (A, A) right; p2 true A, mean probs tie B vs C -> argmax B, wrong; p3 B right; p4 C right.
    assert m["patient_accuracy"] == pytest.approx(3 / 4)
    assert m["n_crops"] == 10 and m["n_patients"] == 4
    # Quadratic kappa by its definition: 1 - sum(w*O) / sum(w*E), w_ij = (i-j)^2 / 4.
    o = np.array(m["confusion"], float)
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    w = np.array([[(i - j) ** 2 / 4 for j in range(3)] for i in range(3)])
    assert m["kappa_quadratic"] == pytest.approx(1 - (w * o).sum() / (w * e).sum())


def test_aucs_use_the_right_scores():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20 + [2] * 20)
    probs = rng.dirichlet(np.ones(3), size=60)
    m = compute_metrics(labels, probs, [f"p{i // 5}" for i in range(60)])
    assert m["auc_b_or_c_vs_a"] == pytest.approx(roc_auc_score(labels >= 1, probs[:, 1] + probs[:, 2]))
    assert m["auc_c_vs_ab"] == pytest.approx(roc_auc_score(labels == 2, probs[:, 2]))
    perfect = compute_metrics(labels, _onehot_probs(labels), [f"p{i // 5}" for i in range(60)])
    assert perfect["auc_c_vs_ab"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["kappa_quadratic"] == 1.0


def test_absent_stage_gives_nan_not_a_crash():
    labels = [0, 0, 1, 1]  # no C in the test set
    m = compute_metrics(labels, _onehot_probs([0, 2, 1, 1]), ["a", "a", "b", "b"])
    assert math.isnan(m["auc_c_vs_ab"]) and math.isnan(m["mr_c_to_a"])
    assert m["mr_a_to_c"] == pytest.approx(0.5)
    assert m["recall_C"] == 0.0 and m["f1_C"] == 0.0
    js = json_safe(m)
    assert js["auc_c_vs_ab"] is None and js["mr_c_to_a"] is None
    only_a = compute_metrics([0, 0], _onehot_probs([0, 0]), ["a", "b"])
    assert math.isnan(only_a["auc_b_or_c_vs_a"]) and math.isnan(only_a["kappa_quadratic"])


def test_shape_errors():
    with pytest.raises(ValueError):
        compute_metrics([0, 1], np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(ValueError):
        compute_metrics([], np.zeros((0, 3)), [])


def test_bootstrap_intervals_resample_patients_not_crops():
    # 10 patients: one with 90 crops all wrong, nine with one crop each, all right.
    labels = [0] * 90 + [1] * 9
    pred = [2] * 90 + [1] * 9
    pids = ["big"] * 90 + [f"p{i}" for i in range(9)]
    m = compute_metrics(labels, _onehot_probs(pred), pids)
    low, high = m["accuracy_ci95"]["low"], m["accuracy_ci95"]["high"]
    assert low <= m["accuracy"] <= high
    # Resampling crops would give about 0.09 +- 0.06; resampling patients sees that the big
    # patient may be drawn zero times (accuracy 1) or several times (accuracy near 0).
    assert high == pytest.approx(1.0) and low < 0.05
    p_low, p_high = m["patient_accuracy_ci95"]["low"], m["patient_accuracy_ci95"]["high"]
    assert m["patient_accuracy"] == pytest.approx(0.9)
    assert p_low < 0.9 < p_high <= 1.0


def test_bootstrap_interval_is_a_point_when_every_crop_is_right():
    labels = [0, 0, 1, 1, 2, 2]
    m = compute_metrics(labels, _onehot_probs(labels), ["a", "a", "b", "b", "c", "c"])
    assert m["accuracy_ci95"] == {"low": 1.0, "high": 1.0}
    assert m["patient_accuracy_ci95"] == {"low": 1.0, "high": 1.0}


def test_bootstrap_interval_is_undefined_with_one_test_patient():
    m = json_safe(compute_metrics([0, 0, 1], _onehot_probs([0, 1, 1]), ["p", "p", "p"]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy_ci95"] == {"low": None, "high": None}
