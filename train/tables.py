"""The paper's tables from an experiment's per-run metrics, plus two tables the paper lacks.

Input: a list of `RunResult` (one per run x method), whose `metrics` come from
`train.metrics.compute_metrics` applied to the run's predictions.csv. Output (markdown + CSV):

- table1: Acc, MR: A->C, MR: C->A                    (the paper's Table 1)
- table2: F: A, F: B, F: C                            (the paper's Table 2)
- table3: accuracy per margin, rows AMCL / DR-AMCL    (the paper's Table 3; several margins only)
- table4: quadratic kappa, patient-level accuracy, AUC (B+C vs A), AUC (C vs A+B)   (extras)
- table5: each margin method minus the same backbone's softmax baseline, paired by run, with a
  95 % Student t interval over runs (see train/stats.py for why t and not the bootstrap).

Every cell is the mean +- sample standard deviation (ddof = 1) over runs. As in the paper, the best
mean per column is marked within each backbone's group of rows (bold in markdown, `*_best` in CSV);
for the mis-staging rates lower is better. Ties at the displayed precision are all marked.
A run where a metric is undefined (NaN: e.g. MR C->A when its test set has no C crop) is left out
of that cell's mean; `n_runs` in the CSV is the largest count in the row.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..runtime.atomic import write_text
from .config import LOSSES, MARGIN_LOSSES
from .stats import paired_comparison

LOSS_LABELS = {"softmax": "", "asm": "+ASM", "amcl": "+AMCL", "dr-amcl": "+DR-AMCL"}
BACKBONE_LABELS = {"vgg16": "VGG16", "resnet18": "ResNet18", "resnet50": "ResNet50",
                   "resnet34": "ResNet34", "resnet101": "ResNet101", "vgg11": "VGG11", "vgg19": "VGG19"}
DIGITS = 4


@dataclass(frozen=True)
class Column:
    key: str            # metric key in compute_metrics' dict
    header: str         # as in the paper
    higher_is_better: bool = True


TABLE1 = (Column("accuracy", "Acc"), Column("mr_a_to_c", "MR: A→C", False),
          Column("mr_c_to_a", "MR: C→A", False))
TABLE2 = (Column("f1_A", "F: A"), Column("f1_B", "F: B"), Column("f1_C", "F: C"))
TABLE4 = (Column("kappa_quadratic", "κ (quadratic)"), Column("patient_accuracy", "Patient acc"),
          Column("auc_b_or_c_vs_a", "AUC B+C vs A"), Column("auc_c_vs_ab", "AUC C vs A+B"))
PAIRED = (Column("accuracy", "Δ Acc"), Column("kappa_quadratic", "Δ κ"), Column("f1_C", "Δ F: C"),
          Column("patient_accuracy", "Δ Patient acc"))


@dataclass
class RunResult:
    """One trained (run, backbone, loss, margin) with its test metrics."""

    run: int
    backbone: str
    loss: str
    margin: float | None      # None for losses without a margin (softmax, asm)
    run_dir: str
    metrics: dict = field(default_factory=dict)

    @property
    def method(self) -> tuple:
        return (self.backbone, self.loss, self.margin)

    def to_dict(self) -> dict:
        return asdict(self)


def method_label(backbone: str, loss: str, margin: float | None, *, show_margin: bool = False) -> str:
    """'ResNet18+DR-AMCL' (paper style); with show_margin, ' (m=0.45)' is appended."""
    name = BACKBONE_LABELS.get(backbone, backbone) + LOSS_LABELS.get(loss, f"+{loss}")
    if show_margin and margin is not None:
        name += f" (m={margin:.2f})"
    return name


def _method_sort_key(method: tuple, backbone_order: Sequence[str]) -> tuple:
    backbone, loss, margin = method
    b = backbone_order.index(backbone) if backbone in backbone_order else len(backbone_order)
    l = LOSSES.index(loss) if loss in LOSSES else len(LOSSES)
    return (b, backbone, l, loss, -1.0 if margin is None else margin)


def methods_in_order(results: Sequence[RunResult], backbone_order: Sequence[str] = ()) -> list[tuple]:
    order = list(backbone_order) or list(dict.fromkeys(r.backbone for r in results))
    return sorted({r.method for r in results}, key=lambda m: _method_sort_key(m, order))


def _value(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def summarise(results: Sequence[RunResult], method: tuple, key: str) -> tuple[float, float, int]:
    """(mean, sample std, n) of one metric over the runs of one method; NaN where undefined."""
    vals = np.array([_value(r.metrics, key) for r in results if r.method == method], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return math.nan, math.nan, 0
    std = float(vals.std(ddof=1)) if vals.size > 1 else math.nan
    return float(vals.mean()), std, int(vals.size)


def _fmt(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(std):
        return f"{mean:.{DIGITS}f}"
    return f"{mean:.{DIGITS}f} ± {std:.{DIGITS}f}"


def _signed(value: float) -> str:
    """'+0.0123' / '-0.0123', and never '-0.0000'."""
    return f"{round(value, DIGITS) + 0.0:+.{DIGITS}f}"


def _best_flags(means: list[float], groups: list[str], higher: bool) -> list[bool]:
    """Mark the best rounded mean of each group (ties all marked)."""
    flags = [False] * len(means)
    for g in dict.fromkeys(groups):
        idx = [i for i, gg in enumerate(groups) if gg == g and math.isfinite(means[i])]
        if len(idx) < 2:
            continue  # a group of one row has nothing to compare against
        rounded = {i: round(means[i], DIGITS) for i in idx}
        best = max(rounded.values()) if higher else min(rounded.values())
        for i in idx:
            flags[i] = rounded[i] == best
    return flags


@dataclass
class Table:
    """A rendered table: title, header, rows of cell strings, and the CSV records behind them."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    csv_header: list[str]
    csv_rows: list[list]

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.csv_header)
        for row in self.csv_rows:
            writer.writerow(["" if isinstance(v, float) and not math.isfinite(v) else v for v in row])
        return buf.getvalue()

    def write(self, out_dir) -> list[Path]:
        out_dir = Path(out_dir)
        md, cs = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        write_text(md, self.markdown())
        write_text(cs, self.csv_text())
        return [md, cs]


def _n_runs_note(results: Sequence[RunResult]) -> str:
    n = len({r.run for r in results})
    return f"mean ± std over {n} run{'s' if n != 1 else ''} (patient-level splits)"


def metric_table(name: str, title: str, results: Sequence[RunResult], columns: Sequence[Column], *,
                 backbone_order: Sequence[str] = (), methods: Sequence[tuple] | None = None) -> Table:
    """Rows = methods (paper layout), columns = metrics, mean ± std, best per backbone marked."""
    methods = list(methods) if methods is not None else methods_in_order(results, backbone_order)
    margins = {m[2] for m in methods if m[2] is not None}
    show_margin = len(margins) > 1
    stats = {(m, c.key): summarise(results, m, c.key) for m in methods for c in columns}
    groups = [m[0] for m in methods]
    flags = {c.key: _best_flags([stats[(m, c.key)][0] for m in methods], groups, c.higher_is_better)
             for c in columns}
    rows, csv_rows = [], []
    for i, m in enumerate(methods):
        label = method_label(*m, show_margin=show_margin)
        row, crow = [label], [label, m[0], m[1], "" if m[2] is None else m[2],
                               max(stats[(m, c.key)][2] for c in columns)]
        for c in columns:
            mean, std, _ = stats[(m, c.key)]
            cell = _fmt(mean, std)
            row.append(f"**{cell}**" if flags[c.key][i] else cell)
            crow += [mean, std, flags[c.key][i]]
        rows.append(row)
        csv_rows.append(crow)
    csv_header = ["method", "backbone", "loss", "margin", "n_runs"]
    for c in columns:
        csv_header += [f"{c.key}_mean", f"{c.key}_std", f"{c.key}_best"]
    lower = [c.header for c in columns if not c.higher_is_better]
    note = f"{_n_runs_note(results)}; best per backbone in bold"
    if lower:
        note += f" (lower is better for {', '.join(lower)})"
    return Table(name, f"{title} — {note}.", ["Methods"] + [c.header for c in columns], rows,
                 csv_header, csv_rows)


def margin_table(results: Sequence[RunResult], *, backbone_order: Sequence[str] = (),
                 key: str = "accuracy") -> Table | None:
    """Table 3: rows (backbone, AMCL / DR-AMCL), columns margins, cells accuracy; None if < 2 margins."""
    margin_methods = [m for m in methods_in_order(results, backbone_order) if m[1] in MARGIN_LOSSES]
    margins = sorted({m[2] for m in margin_methods if m[2] is not None})
    if len(margins) < 2:
        return None
    row_keys = list(dict.fromkeys((m[0], m[1]) for m in margin_methods))
    multi_backbone = len({b for b, _ in row_keys}) > 1
    means = {(rk, mg): summarise(results, (rk[0], rk[1], mg), key) for rk in row_keys for mg in margins}
    groups = [rk[0] for rk in row_keys]
    flags = {mg: _best_flags([means[(rk, mg)][0] for rk in row_keys], groups, True) for mg in margins}
    rows, csv_rows = [], []
    for i, rk in enumerate(row_keys):
        label = (method_label(rk[0], rk[1], None) if multi_backbone
                 else LOSS_LABELS.get(rk[1], rk[1]).lstrip("+"))
        row, crow = [label], [label, rk[0], rk[1]]
        for mg in margins:
            mean, std, _ = means[(rk, mg)]
            cell = _fmt(mean, std)
            row.append(f"**{cell}**" if flags[mg][i] else cell)
            crow += [mean, std, flags[mg][i]]
        rows.append(row)
        csv_rows.append(crow)
    csv_header = ["method", "backbone", "loss"]
    for mg in margins:
        csv_header += [f"m{mg:.2f}_mean", f"m{mg:.2f}_std", f"m{mg:.2f}_best"]
    backbones = ", ".join(BACKBONE_LABELS.get(b, b) for b in dict.fromkeys(groups))
    title = (f"Table 3. Accuracy on {backbones} with different angular margins m — "
             f"{_n_runs_note(results)}; best per margin (and backbone) in bold.")
    return Table("table3", title, ["m"] + [f"{mg:.2f}" for mg in margins], rows, csv_header, csv_rows)


def paired_rows(results: Sequence[RunResult], *, backbone_order: Sequence[str] = (),
                columns: Sequence[Column] = PAIRED, seed: int = 0) -> list[dict]:
    """For each non-softmax method: per-metric paired comparison with the same backbone's softmax."""
    out = []
    for m in methods_in_order(results, backbone_order):
        backbone, loss, margin = m
        if loss == "softmax":
            continue
        base = (backbone, "softmax", None)
        by_run = {r.run: r for r in results if r.method == m}
        base_by_run = {r.run: r for r in results if r.method == base}
        runs = sorted(set(by_run) & set(base_by_run))
        if not runs:
            continue
        entry = {"method": method_label(*m), "backbone": backbone, "loss": loss, "margin": margin,
                 "baseline": method_label(*base), "runs": runs, "metrics": {}}
        for c in columns:
            a = [_value(by_run[r].metrics, c.key) for r in runs]
            b = [_value(base_by_run[r].metrics, c.key) for r in runs]
            ok = [i for i in range(len(runs)) if math.isfinite(a[i]) and math.isfinite(b[i])]
            if not ok:
                continue
            entry["metrics"][c.key] = paired_comparison([a[i] for i in ok], [b[i] for i in ok], seed=seed)
        out.append(entry)
    return out


def paired_table(paired: list[dict], *, columns: Sequence[Column] = PAIRED) -> Table | None:
    """Table 5: mean paired difference [95 % t interval] per metric."""
    if not paired:
        return None
    show_margin = len({p["margin"] for p in paired if p["margin"] is not None}) > 1
    rows, csv_rows = [], []
    for p in paired:
        label = method_label(p["backbone"], p["loss"], p["margin"], show_margin=show_margin)
        row = [f"{label} − {p['baseline']}", str(len(p["runs"]))]
        crow = [label, p["baseline"], p["backbone"], p["loss"], "" if p["margin"] is None else p["margin"],
                len(p["runs"])]
        for c in columns:
            cmp_ = p["metrics"].get(c.key)
            if cmp_ is None:
                row.append("n/a")
                crow += [math.nan, math.nan, math.nan]
                continue
            t = cmp_["t"]
            if t["low"] is None:
                row.append(_signed(t["mean"]))
            else:
                # a zero-width interval (identical differences in every run) is no evidence: not bold
                mark = "**" if (t["low"] > 0 or t["high"] < 0) and t["high"] > t["low"] else ""
                row.append(f"{mark}{_signed(t['mean'])} [{_signed(t['low'])}, {_signed(t['high'])}]{mark}")
            crow += [t["mean"], math.nan if t["low"] is None else t["low"],
                     math.nan if t["high"] is None else t["high"]]
        rows.append(row)
        csv_rows.append(crow)
    csv_header = ["method", "baseline", "backbone", "loss", "margin", "n_runs"]
    for c in columns:
        csv_header += [f"d_{c.key}_mean", f"d_{c.key}_t95_low", f"d_{c.key}_t95_high"]
    title = ("Table 5. Paired difference from the same backbone's softmax baseline (same test patients "
             "in each run): mean [95 % Student t interval over runs]; bold where the interval excludes 0.")
    return Table("table5", title, ["Method − baseline", "runs"] + [c.header for c in columns], rows,
                 csv_header, csv_rows)


def build_tables(results: Sequence[RunResult], *, backbone_order: Sequence[str] = (),
                 seed: int = 0) -> tuple[list[Table], list[dict]]:
    """All tables for an experiment, and the paired comparisons behind table 5."""
    tables = [
        metric_table("table1", "Table 1. Overall accuracy and mis-staging rates", results, TABLE1,
                     backbone_order=backbone_order),
        metric_table("table2", "Table 2. F-score of each fibrosis stage", results, TABLE2,
                     backbone_order=backbone_order),
    ]
    t3 = margin_table(results, backbone_order=backbone_order)
    if t3 is not None:
        tables.append(t3)
    tables.append(metric_table("table4", "Table 4 (beyond the paper). Quadratic weighted kappa, "
                               "patient-level accuracy and AUCs", results, TABLE4, backbone_order=backbone_order))
    paired = paired_rows(results, backbone_order=backbone_order, seed=seed)
    t5 = paired_table(paired)
    if t5 is not None:
        tables.append(t5)
    return tables, paired
