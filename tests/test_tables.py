"""Experiment tables (mean ± std, best marks, paper layout) and the paired statistics behind them."""

import csv
import io
import math

import numpy as np
import pytest

from liverstage.train import stats
from liverstage.train.tables import RunResult, build_tables, margin_table, method_label

KEYS = ("accuracy", "mr_a_to_c", "mr_c_to_a", "f1_A", "f1_B", "f1_C", "kappa_quadratic",
        "patient_accuracy", "auc_b_or_c_vs_a", "auc_c_vs_ab")


def _results(margins=(0.5,), runs=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for run in range(runs):
        for backbone in ("resnet18", "vgg16"):  # deliberately not in paper order
            methods = [("softmax", None)] + [(l, m) for l in ("dr-amcl", "amcl") for m in margins]
            for loss, margin in methods:
                metrics = {k: float(rng.uniform(0, 1)) for k in KEYS}
                out.append(RunResult(run, backbone, loss, margin, f"runs/{run}/{backbone}-{loss}", metrics))
    return out


def _rows(table):
    return list(csv.DictReader(io.StringIO(table.csv_text())))


def test_table1_layout_means_stds_and_best_marks():
    results = _results()
    tables, _ = build_tables(results, backbone_order=["vgg16", "resnet18"])
    t1 = tables[0]
    assert t1.name == "table1"
    labels = [r[0] for r in t1.rows]
    assert labels == ["VGG16", "VGG16+AMCL", "VGG16+DR-AMCL", "ResNet18", "ResNet18+AMCL", "ResNet18+DR-AMCL"]
    assert t1.header == ["Methods", "Acc", "MR: A→C", "MR: C→A"]
    rows = _rows(t1)
    for row in rows:
        method = (row["backbone"], row["loss"], float(row["margin"]) if row["margin"] else None)
        vals = [r.metrics["accuracy"] for r in results if (r.backbone, r.loss, r.margin) == method]
        assert float(row["accuracy_mean"]) == pytest.approx(np.mean(vals))
        assert float(row["accuracy_std"]) == pytest.approx(np.std(vals, ddof=1))
        assert row["n_runs"] == "3"
    # best per backbone: highest accuracy, lowest mis-staging rate
    for backbone in ("vgg16", "resnet18"):
        group = [r for r in rows if r["backbone"] == backbone]
        best_acc = max(group, key=lambda r: float(r["accuracy_mean"]))
        best_mr = min(group, key=lambda r: float(r["mr_a_to_c_mean"]))
        assert [r["accuracy_best"] for r in group].count("True") == 1 and best_acc["accuracy_best"] == "True"
        assert best_mr["mr_a_to_c_best"] == "True"
    md = t1.markdown()
    assert md.count("**") == 2 * (2 * 3) + 2  # one bold cell per column per backbone, plus the title
    assert "lower is better" in md and "over 3 runs" in md


def test_table2_and_extras_and_no_table3_for_a_single_margin():
    tables, paired = build_tables(_results())
    names = [t.name for t in tables]
    assert names == ["table1", "table2", "table4", "table5"]
    assert tables[1].header == ["Methods", "F: A", "F: B", "F: C"]
    assert "Patient acc" in tables[2].header and "κ (quadratic)" in tables[2].header
    assert len(paired) == 4  # AMCL and DR-AMCL for two backbones


def test_table3_margin_sweep():
    results = _results(margins=(0.4, 0.45, 0.5), runs=2)
    t3 = margin_table([r for r in results if r.backbone == "resnet18"])
    assert t3.header == ["m", "0.40", "0.45", "0.50"]
    assert [r[0] for r in t3.rows] == ["AMCL", "DR-AMCL"]
    rows = _rows(t3)
    for row in rows:
        vals = [r.metrics["accuracy"] for r in results
                if r.backbone == "resnet18" and r.loss == row["loss"] and r.margin == 0.45]
        assert float(row["m0.45_mean"]) == pytest.approx(np.mean(vals))
    for m in ("0.40", "0.45", "0.50"):
        flags = [r[f"m{m}_best"] for r in rows]
        means = [float(r[f"m{m}_mean"]) for r in rows]
        assert flags[int(np.argmax(means))] == "True"
    # tables 1/2 label margin rows when several margins are present
    tables, _ = build_tables(results)
    assert "ResNet18+AMCL (m=0.45)" in [r[0] for r in tables[0].rows]


def test_paired_table_matches_scipy_paired_t_test():
    from scipy import stats as sps

    results = _results(runs=5, seed=3)
    _, paired = build_tables(results)
    entry = next(p for p in paired if p["backbone"] == "vgg16" and p["loss"] == "amcl")
    a = [r.metrics["accuracy"] for r in sorted(results, key=lambda r: r.run)
         if (r.backbone, r.loss) == ("vgg16", "amcl")]
    b = [r.metrics["accuracy"] for r in sorted(results, key=lambda r: r.run)
         if (r.backbone, r.loss) == ("vgg16", "softmax")]
    t = entry["metrics"]["accuracy"]["t"]
    d = np.subtract(a, b)
    lo, hi = sps.t.interval(0.95, df=4, loc=d.mean(), scale=sps.sem(d))
    assert (t["mean"], t["low"], t["high"]) == pytest.approx((d.mean(), lo, hi))
    # the 95 % interval excludes 0 exactly when the paired t test rejects at 5 %
    p = sps.ttest_rel(a, b).pvalue
    assert (t["low"] > 0 or t["high"] < 0) == (p < 0.05)


def test_t_interval_excludes_zero_for_a_consistent_gain_and_covers_the_mean():
    d = [0.05, 0.06, 0.04, 0.055, 0.045, 0.05]
    iv = stats.t_interval(d)
    assert iv.low < np.mean(d) < iv.high and iv.low > 0
    noisy = stats.t_interval([0.1, -0.1, 0.05, -0.08])
    assert noisy.low < 0 < noisy.high


def test_bootstrap_interval_is_seeded_contains_the_mean_and_is_narrower_than_the_range():
    rng = np.random.default_rng(1)
    d = rng.normal(0.02, 0.03, size=6)
    a = stats.bootstrap_interval(d, seed=7)
    b = stats.bootstrap_interval(d, seed=7)
    assert a == b
    assert a.low <= d.mean() <= a.high
    assert d.min() <= a.low and a.high <= d.max()
    cmp_ = stats.paired_comparison(d + 1.0, np.ones(6))
    assert cmp_["differences"] == pytest.approx(d.tolist())
    assert cmp_["t"]["mean"] == pytest.approx(d.mean())


def test_weighted_bootstrap_is_the_weighted_mean_and_equal_weights_change_nothing():
    values = np.array([1.0, 0.0, 0.5, 0.25])
    counts = np.array([90.0, 1.0, 4.0, 5.0])
    iv = stats.bootstrap_interval(values, weights=counts, n_resamples=500)
    assert iv.mean == pytest.approx((values * counts).sum() / counts.sum())
    assert iv.low <= iv.mean <= iv.high
    plain = stats.bootstrap_interval(values, n_resamples=500)
    assert stats.bootstrap_interval(values, weights=np.full(4, 3.0), n_resamples=500) == plain
    with pytest.raises(ValueError, match="weights"):
        stats.bootstrap_interval(values, weights=[1.0, 0.0, 1.0, 1.0])


def test_intervals_with_one_run_have_no_bounds_and_bad_input_is_refused():
    iv = stats.t_interval([0.1])
    assert iv.mean == 0.1 and math.isnan(iv.low) and iv.to_dict()["low"] is None
    with pytest.raises(ValueError, match="same runs"):
        stats.paired_differences([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        stats.t_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_interval([0.1, 0.2], confidence=1.5)


def test_table_write_is_atomic_and_complete(tmp_path):
    tables, _ = build_tables(_results())
    written = [p for t in tables for p in t.write(tmp_path)]
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.iterdir())
    assert (tmp_path / "table1.md").read_text().startswith("**Table 1.")


def test_method_label():
    assert method_label("resnet50", "dr-amcl", 0.5) == "ResNet50+DR-AMCL"
    assert method_label("resnet50", "amcl", 0.45, show_margin=True) == "ResNet50+AMCL (m=0.45)"
    assert method_label("efficientnet_b0", "softmax", None) == "efficientnet_b0"


def test_paired_table_signs_and_zero_width_intervals():
    from liverstage.train.tables import paired_table

    cmp_same = stats.paired_comparison([0.5, 0.5], [0.6, 0.6])       # identical differences
    cmp_zero = stats.paired_comparison([0.5, 0.4], [0.5, 0.4])       # no difference at all
    p = [{"backbone": "resnet18", "loss": "amcl", "margin": 0.5, "baseline": "ResNet18", "runs": [0, 1],
          "metrics": {"accuracy": cmp_same, "kappa_quadratic": cmp_zero}}]
    row = paired_table(p).rows[0]
    assert row[2] == "-0.1000 [-0.1000, -0.1000]"  # not bold: a zero-width interval is no evidence
    assert row[3] == "+0.0000 [+0.0000, +0.0000]"  # never "-0.0000"
