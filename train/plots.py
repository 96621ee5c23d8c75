"""Figures: the paper's Fig. 2 (analytic), and per-run pictures of a trained model.

Per run (written next to the run's files by `plot_run`):
- `confusion.png`: the test confusion matrix (counts, and shares of each true stage);
- `curves.png`: training curves from `history.csv`;
- `angles.png`: for each test crop, the angle between its embedding and its own class weight, and
  the angle to the nearest other class weight. This is the paper's claim (intra-class compactness,
  inter-class discrepancy) made visible: a margin loss should pull the first histogram towards 0
  and push the second towards 90 degrees and beyond. The angles come from the `cos_*` columns of
  `predictions.csv` (cosine of the embedding to each class weight), so no model needs loading.

Matplotlib is used through `matplotlib.figure.Figure` (no pyplot global state, no display), and
every file is written atomically.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..runtime.atomic import atomic_path
from ..runtime.errors import InputError
from ..runtime.stages import STAGES

FIG2_SCALES = (2.0, 5.0, 10.0, 20.0, 30.0, 64.0)
FIG2_MARGINS = (0.2, 0.3, 0.4, 0.5, 0.6)
FIG2_FIXED_MARGIN = 0.5
FIG2_FIXED_SCALE = 30.0


# --------------------------------------------------------------------------------------------
# Fig. 2: P(theta) = e^{s cos(theta+m)} / (e^{s cos(theta+m)} + C - 1)
# --------------------------------------------------------------------------------------------
def margin_probability(theta, *, scale: float, margin: float, num_classes: int = 3) -> np.ndarray:
    """Target-class probability of the paper's section 2.2 (other classes at 90 degrees).

    Evaluated as the logistic function of s cos(theta + m) - log(C - 1), which is the same
    expression without overflowing exp for large s.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    z = scale * np.cos(np.asarray(theta, dtype=np.float64) + margin) - math.log(num_classes - 1)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), stable for any z


def margin_curves(*, scales: Sequence[float] = FIG2_SCALES, margins: Sequence[float] = FIG2_MARGINS,
                  fixed_margin: float = FIG2_FIXED_MARGIN, fixed_scale: float = FIG2_FIXED_SCALE,
                  num_classes: int = 3, n_points: int = 181) -> list[dict]:
    """Fig. 2's curves as records: one per (panel, scale, margin) with theta and P arrays.

    Left panel: each s in `scales` at m = `fixed_margin`; right panel: each m in `margins` at
    s = `fixed_scale`; theta from 0 to pi/2 in `n_points` steps.
    """
    if n_points < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    if not scales or not margins:
        raise ValueError("margin curves need at least one scale and one margin")
    theta = np.linspace(0.0, math.pi / 2.0, n_points)
    curves = []
    for s in scales:
        curves.append({"panel": "scale", "scale": float(s), "margin": float(fixed_margin), "theta": theta,
                       "p": margin_probability(theta, scale=s, margin=fixed_margin, num_classes=num_classes)})
    for m in margins:
        curves.append({"panel": "margin", "scale": float(fixed_scale), "margin": float(m), "theta": theta,
                       "p": margin_probability(theta, scale=fixed_scale, margin=m, num_classes=num_classes)})
    return curves


def write_margin_curves_csv(path, curves: list[dict], *, num_classes: int = 3) -> Path:
    """Long-format CSV: panel, num_classes, scale, margin, theta_rad, theta_deg, p."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["panel", "num_classes", "scale", "margin", "theta_rad", "theta_deg", "p"])
        for c in curves:
            for t, p in zip(c["theta"], c["p"]):
                writer.writerow([c["panel"], num_classes, f"{c['scale']:g}", f"{c['margin']:g}",
                                 f"{t:.10g}", f"{math.degrees(t):.10g}", f"{p:.10g}"])
    return path


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols) if ncols > 1 else fig.subplots()
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise InputError(f"figure path {path} must end in .png, .pdf or .svg")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lower().lstrip("."))
    return path


def plot_margin_curves(path, curves: list[dict], *, num_classes: int = 3, title: str | None = None) -> Path:
    """Draw Fig. 2 (two panels) from `margin_curves(...)` records."""
    fig, (left, right) = _new_figure(10.0, 4.0, ncols=2)
    for ax, panel in ((left, "scale"), (right, "margin")):
        rows = [c for c in curves if c["panel"] == panel]
        for c in rows:
            label = f"s = {c['scale']:g}" if panel == "scale" else f"m = {c['margin']:g}"
            ax.plot(np.degrees(c["theta"]), c["p"], label=label)
        fixed = (f"m = {rows[0]['margin']:g}" if panel == "scale" else f"s = {rows[0]['scale']:g}") if rows else ""
        ax.set_title(f"various {'s' if panel == 'scale' else 'm'}, {fixed}, C = {num_classes}")
        ax.set_xlabel(r"$\theta_{y}$ (degrees)")
        ax.set_ylabel(r"$P_{y}$")
        ax.set_xlim(0, 90)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or r"Fig. 2: $P = e^{s\cos(\theta+m)} / (e^{s\cos(\theta+m)} + C - 1)$")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Per-run figures
# --------------------------------------------------------------------------------------------
def confusion_from_labels(labels, predicted, *, num_classes: int = len(STAGES)) -> np.ndarray:
    """Counts [true, predicted]."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return cm


def _wrap(title: str, width: int) -> str:
    """Titles carry an experiment's whole setting (its --note): break them instead of clipping."""
    return textwrap.fill(title, width=width) if title else title


def plot_confusion(path, confusion, *, class_names: Sequence[str] = STAGES, title: str = "") -> Path:
    """Confusion matrix: colour = share of the true stage, text = count and share."""
    cm = np.asarray(confusion, dtype=np.float64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1.0)
    fig, ax = _new_figure(4.2, 3.8)
    im = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(class_names)), labels=list(class_names))
    ax.set_yticks(range(len(class_names)), labels=list(class_names))
    ax.set_xlabel("predicted stage")
    ax.set_ylabel("true stage")
    ax.set_title(_wrap(title, 48), fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of true stage")
    return _save(fig, path)


def _numeric_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for key in rows[0]:
        try:
            cols[key] = np.array([float(r[key]) if r[key] not in ("", None) else np.nan for r in rows])
        except (TypeError, ValueError):
            continue
    return cols


def plot_training_curves(path, history: list[dict], *, title: str = "") -> Path:
    """Loss (left) and every accuracy-like column (right) per epoch from history.csv rows."""
    if not history:
        raise InputError("history is empty: nothing to plot")
    cols = _numeric_columns(history)
    epoch = cols.get("epoch", np.arange(1, len(history) + 1, dtype=np.float64))
    fig, (left, right) = _new_figure(9.0, 3.6, ncols=2)
    for key, values in cols.items():
        if key == "epoch" or np.all(np.isnan(values)):
            continue
        if "loss" in key:
            left.plot(epoch, values, marker="o", ms=3, label=key)
        elif any(tag in key for tag in ("acc", "f1", "kappa")):
            right.plot(epoch, values, marker="o", ms=3, label=key)
    left.set_title("loss")
    right.set_title("metrics")
    right.set_ylim(-0.02, 1.02)
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    for ax in (left, right):
        if len(epoch) <= 12:
            ax.set_xticks(epoch)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(float(np.nanmin(epoch)) - 0.5, float(np.nanmax(epoch)) + 0.5)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(_wrap(title, 100), fontsize=10)
    return _save(fig, path)


def angles_from_cosines(cosines, labels) -> tuple[np.ndarray, np.ndarray]:
    """(angle to own class weight, angle to nearest other class weight) in degrees, per crop."""
    cos = np.clip(np.asarray(cosines, dtype=np.float64), -1.0, 1.0)
    labels = np.asarray(labels, dtype=np.int64)
    if cos.ndim != 2 or cos.shape[0] != labels.shape[0]:
        raise ValueError(f"cosines must be [N, C] with N = {labels.shape[0]}, got {cos.shape}")
    rows = np.arange(cos.shape[0])
    own = cos[rows, labels]
    other = cos.copy()
    other[rows, labels] = -np.inf
    nearest_other = other.max(axis=1)
    return np.degrees(np.arccos(own)), np.degrees(np.arccos(nearest_other))


def plot_angle_distributions(path, own_deg, other_deg, *, title: str = "") -> Path:
    """Left: histograms of the angle to the own class weight and to the nearest other class weight.
    Right: their difference (nearest other - own), the angular margin each crop actually has;
    below 0 the crop is closer to another class's weight than to its own."""
    own_deg = np.asarray(own_deg, dtype=np.float64)
    other_deg = np.asarray(other_deg, dtype=np.float64)
    fig, (ax, bx) = _new_figure(10.0, 3.6, ncols=2)
    bins = np.linspace(0.0, 180.0, 61)
    ax.hist(own_deg, bins=bins, alpha=0.6, color="tab:green",
            label=f"own class (median {np.median(own_deg):.1f}°)" if own_deg.size else "own class")
    ax.hist(other_deg, bins=bins, alpha=0.6, color="tab:red",
            label=f"nearest other class (median {np.median(other_deg):.1f}°)" if other_deg.size else "other")
    ax.axvline(90.0, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle between test embedding and class weight (degrees)")
    ax.set_ylabel("test crops")
    ax.legend(fontsize=8)
    ax.set_title("compactness (green near 0) and discrepancy (red far)", fontsize=9)
    gap = other_deg - own_deg
    lim = max(10.0, float(np.ceil(np.abs(gap).max() / 10.0) * 10.0)) if gap.size else 90.0
    bx.hist(gap, bins=np.linspace(-lim, lim, 41), color="tab:blue", alpha=0.7)
    bx.axvline(0.0, color="black", lw=0.8)
    if gap.size:
        bx.axvline(float(np.median(gap)), color="tab:blue", lw=1.2, ls="--",
                   label=f"median {np.median(gap):.1f}°; {np.mean(gap > 0):.0%} of crops > 0")
        bx.legend(fontsize=8)
    bx.set_xlabel("nearest other angle - own angle (degrees)")
    bx.set_ylabel("test crops")
    bx.set_title("angular margin per test crop", fontsize=9)
    fig.suptitle(_wrap(title, 100), fontsize=10)
    return _save(fig, path)


def read_predictions(path) -> dict:
    """predictions.csv -> patient_ids, slices, labels, predicted, probs [N,C], cosines [N,C]."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputError(f"{path} has no rows")
    needed = ["patient_id", "label", "predicted"] + [f"prob_{s}" for s in STAGES]
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise InputError(f"{path} lacks column(s) {', '.join(missing)}")

    def _label(value: str) -> int:
        value = value.strip()
        return STAGES.index(value) if value in STAGES else int(value)

    out = {
        "patient_ids": [r["patient_id"] for r in rows],
        "slices": [r.get("slice", "") for r in rows],
        "labels": np.array([_label(r["label"]) for r in rows], dtype=np.int64),
        "predicted": np.array([_label(r["predicted"]) for r in rows], dtype=np.int64),
        "probs": np.array([[float(r[f"prob_{s}"]) for s in STAGES] for r in rows], dtype=np.float64),
    }
    if all(f"cos_{s}" in rows[0] for s in STAGES):
        out["cosines"] = np.array([[float(r[f"cos_{s}"]) for s in STAGES] for r in rows], dtype=np.float64)
    return out


def read_history(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


RUN_FIGURES = ("confusion.png", "curves.png", "angles.png")


def plot_run(run_dir, *, title: str | None = None, out_dir=None) -> list[Path]:
    """Draw a run's three figures from its predictions.csv and history.csv (no torch needed)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    if title is None:
        title = run_dir.name
        meta = run_dir / "metrics.json"
        if meta.is_file():
            try:
                acc = json.loads(meta.read_text()).get("accuracy")
                if isinstance(acc, (int, float)):
                    title = f"{title} (test acc {acc:.3f})"
            except (OSError, ValueError):
                pass
    pred = read_predictions(run_dir / "predictions.csv")
    written = [plot_confusion(out_dir / "confusion.png", confusion_from_labels(pred["labels"], pred["predicted"]),
                              title=title)]
    history_path = run_dir / "history.csv"
    if history_path.is_file():
        history = read_history(history_path)
        if history:
            written.append(plot_training_curves(out_dir / "curves.png", history, title=title))
    if "cosines" in pred:
        own, other = angles_from_cosines(pred["cosines"], pred["labels"])
        written.append(plot_angle_distributions(out_dir / "angles.png", own, other, title=title))
    return written


def plot_paired_accuracy(path, results, *, key: str = "accuracy", title: str = "") -> Path:
    """One line per run across the methods (paired), with the mean over runs as black diamonds.

    `results` are train.tables.RunResult records. Lines that rise together show a gain that holds
    split by split; crossing lines show split-to-split noise.
    """
    from .tables import method_label, methods_in_order  # noqa: PLC0415

    methods = methods_in_order(results)
    show_margin = len({m[2] for m in methods if m[2] is not None}) > 1
    labels = [method_label(*m, show_margin=show_margin) for m in methods]
    runs = sorted({r.run for r in results})
    fig, ax = _new_figure(max(4.5, 1.1 * len(methods) + 1.5), 3.8)
    x = np.arange(len(methods))
    for run in runs:
        by_method = {r.method: r.metrics.get(key) for r in results if r.run == run}
        y = np.array([float(by_method.get(m, np.nan) if by_method.get(m) is not None else np.nan)
                      for m in methods])
        ax.plot(x, y, marker="o", ms=3, lw=0.8, alpha=0.6, label=f"run {run}")
    means = [np.nanmean([float(r.metrics.get(key, np.nan)) for r in results if r.method == m]) for m in methods]
    ax.plot(x, means, ls="none", marker="D", color="black", ms=6, label="mean")
    ax.set_xticks(x, labels=labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(_wrap(title, 60), fontsize=9)
    return _save(fig, path)


def iter_run_dirs(root) -> Iterable[Path]:
    """Every directory under `root` (itself included) that holds a predictions.csv."""
    root = Path(root)
    for p in sorted(root.rglob("predictions.csv")):
        yield p.parent
