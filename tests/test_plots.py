"""Fig. 2 curves against the formula, per-run figures, and the `liverstage plot` CLI."""

import csv
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from liverstage.runtime.cli import main  # noqa: E402
from liverstage.train import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _p_direct(theta, s, m, c=3):
    e = math.exp(s * math.cos(theta + m))
    return e / (e + c - 1)


@pytest.mark.parametrize("s,m", [(2.0, 0.5), (5.0, 0.5), (30.0, 0.2), (30.0, 0.6), (64.0, 0.5)])
def test_margin_probability_matches_closed_forms(s, m):
    # theta = 0: P = e^{s cos m} / (e^{s cos m} + C - 1)
    assert plots.margin_probability(0.0, scale=s, margin=m) == pytest.approx(_p_direct(0.0, s, m), rel=1e-12)
    # theta + m = pi/2: the target logit equals the others' (cos = 0), so P = 1/C for every s
    assert plots.margin_probability(math.pi / 2 - m, scale=s, margin=m) == pytest.approx(1 / 3, abs=1e-12)
    assert plots.margin_probability(math.pi / 2 - m, scale=s, margin=m, num_classes=5) == pytest.approx(0.2)
    # theta = pi/2: e^{-s sin m} / (e^{-s sin m} + 2)
    q = math.exp(-s * math.sin(m))
    assert plots.margin_probability(math.pi / 2, scale=s, margin=m) == pytest.approx(q / (q + 2), rel=1e-9)


def test_margin_curves_are_monotone_decreasing_and_bounded():
    for c in plots.margin_curves(n_points=91):
        p = c["p"]
        assert np.all(np.diff(p) <= 0), (c["panel"], c["scale"], c["margin"])
        assert np.all((p >= 0) & (p <= 1))
    # larger margin -> lower probability at the same angle (right panel)
    right = [c for c in plots.margin_curves(n_points=11) if c["panel"] == "margin"]
    right.sort(key=lambda c: c["margin"])
    for a, b in zip(right, right[1:]):
        assert np.all(b["p"][1:-1] < a["p"][1:-1])


def test_margin_curves_cli_writes_png_and_csv_matching_formula(tmp_path):
    png, csv_path = tmp_path / "fig2.png", tmp_path / "fig2.csv"
    with pytest.raises(SystemExit) as exc:
        main(["plot", "margin-curves", "--out", str(png), "--csv", str(csv_path), "--points", "19"])
    assert exc.value.code == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader(open(csv_path)))
    # 6 scales + 5 margins, 19 points each
    assert len(rows) == 11 * 19
    assert {(r["panel"], float(r["scale"]), float(r["margin"])) for r in rows} >= {
        ("scale", 2.0, 0.5), ("scale", 64.0, 0.5), ("margin", 30.0, 0.2), ("margin", 30.0, 0.6)}
    for r in rows[::7]:
        theta = float(r["theta_rad"])
        assert float(r["theta_deg"]) == pytest.approx(math.degrees(theta))
        assert float(r["p"]) == pytest.approx(_p_direct(theta, float(r["scale"]), float(r["margin"])),
                                              rel=1e-7, abs=1e-12)
    assert min(float(r["theta_rad"]) for r in rows) == 0.0
    assert max(float(r["theta_rad"]) for r in rows) == pytest.approx(math.pi / 2)


@pytest.mark.parametrize("args,needle", [
    (["--out", "fig.txt"], "must end in .png"),
    (["--out", "fig.png", "--scales", "2,abc"], "--scales"),
    (["--out", "fig.png", "--scales", "-1"], "positive"),
])
def test_margin_curves_cli_rejects_bad_options(tmp_path, capsys, args, needle):
    args = [a if not a.startswith("fig") else str(tmp_path / a) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["plot", "margin-curves", *args])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_angles_from_cosines_on_known_geometry():
    # class weights in a plane at 0, 90 and 180 degrees; embeddings at known angles
    weights = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    emb_deg = np.array([30.0, 100.0, 170.0, 80.0])
    labels = np.array([0, 1, 2, 0])
    emb = np.stack([np.cos(np.radians(emb_deg)), np.sin(np.radians(emb_deg))], axis=1)
    own, other = plots.angles_from_cosines(emb @ weights.T, labels)
    np.testing.assert_allclose(own, [30.0, 10.0, 10.0, 80.0], atol=1e-9)
    np.testing.assert_allclose(other, [60.0, 80.0, 80.0, 10.0], atol=1e-9)


def test_confusion_from_labels_matches_sklearn():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    np.testing.assert_array_equal(plots.confusion_from_labels(y, p), confusion_matrix(y, p, labels=[0, 1, 2]))


def _fake_run(run_dir, n=30, seed=0):
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    labels = rng.integers(0, 3, n)
    cos = rng.uniform(-0.3, 0.9, (n, 3))
    logits = 30 * cos
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    with open(run_dir / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "slice", "label", "predicted", "prob_A", "prob_B", "prob_C",
                    "cos_A", "cos_B", "cos_C"])
        for i in range(n):
            w.writerow([f"P{i % 6}", i, "ABC"[labels[i]], "ABC"[int(probs[i].argmax())], *probs[i], *cos[i]])
    with open(run_dir / "history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "train_loss", "train_accuracy", "seconds"])
        for e in range(1, 4):
            w.writerow([e, 1.0 / e, 0.3 * e, 2.0])


def test_plot_run_cli_draws_three_figures_for_every_run(tmp_path):
    _fake_run(tmp_path / "exp" / "runs" / "0" / "a")
    _fake_run(tmp_path / "exp" / "runs" / "1" / "a", seed=1)
    with pytest.raises(SystemExit) as exc:
        main(["plot", "run", str(tmp_path / "exp")])
    assert exc.value.code == 0
    for r in ("0", "1"):
        for name in plots.RUN_FIGURES:
            assert (tmp_path / "exp" / "runs" / r / "a" / name).read_bytes()[:8] == PNG_MAGIC


def test_plot_run_cli_refuses_a_folder_without_predictions(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plot", "run", str(tmp_path)])
    assert exc.value.code == 2
    assert "no predictions.csv" in capsys.readouterr().err
