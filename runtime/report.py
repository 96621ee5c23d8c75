"""Everything `predict` writes: the JSON report, the per-crop CSV, the stdout table, the PNG.

Report schema (every file is written atomically):
    {"liverstage_version",
     "model": {"path", "sha256", "backend", "precision"},
     "results": [{"input", "stage", "stage_name", "probabilities": {"A", "B", "C"}, "uncertain",
                  "uncertain_reason", "ood_score", "ood_threshold", "region", "region_side",
                  "air_share", "crops": [{"slice", "bbox", "probabilities", "max_cosine", "ood_score"}],
                  "timing_s": {"load", "preprocess", "inference", "ood", "total"}, "warnings": [...],
                  "series": {...} (DICOM inputs only: the staged series, `dicom_study.series_record`)}],
     "errors": [{"input", "error"}]}
`slice` is the crop's axial index and `bbox` its square box [x0, y0, x1, y1] (half-open), both
in the volume's closest-canonical (RAS) voxel grid, which is what the crops were cut from.
`stage` and `probabilities` are the model's answer whatever the gate says; read them as a stage
only where `uncertain` is false. `ood_score` (volume: the median of its crops') is the
out-of-distribution gate's score, above `ood_threshold` (1) atypical; both are null for a model
without a gate, whose results are all uncertain (runtime/ood.py). `region_side` is the liver
region's centroid relative to the body's midline in half body widths, positive on the patient's
right; below 0 the result is uncertain; null where the midline is unknown (runtime/laterality.py).
`region` says how the liver region was given: "mask", "bbox" or "auto" (--roi auto).
`air_share` is the share of the volume's voxels at or below -500 (air in a CT's Hounsfield units;
an MR magnitude image has none); from 0.01 the result is uncertain (runtime/intensity.py).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .atomic import atomic_path, write_json, write_text
from .errors import InputError
from .provenance import file_sha256  # noqa: F401  (re-exported: predict reports hash the model)
from .stages import STAGE_NAMES, STAGES

if TYPE_CHECKING:  # pragma: no cover
    from .predict import PredictRun, VolumeResult


def _r(x: float, nd: int = 6) -> float:
    return round(float(x), nd)


def _crop_ood(result: "VolumeResult") -> list[float | None]:
    scores = result.ood_scores
    return [None] * len(result.slices) if scores is None else [_r(v) for v in scores.score]


def result_to_dict(result: "VolumeResult") -> dict[str, Any]:
    verdict = result.verdict
    crops = [
        {
            "slice": int(result.slices[i]),
            "bbox": [int(v) for v in result.boxes[i]],
            "probabilities": {s: _r(p) for s, p in zip(STAGES, result.probs[i])},
            "max_cosine": _r(result.cosine[i].max()),
            "ood_score": ood,
        }
        for i, ood in enumerate(_crop_ood(result))
    ]
    ood = verdict.ood
    out = {
        "input": result.input,
        "stage": verdict.stage,
        "stage_name": STAGE_NAMES[verdict.stage],
        "probabilities": {s: _r(p) for s, p in verdict.probabilities.items()},
        "uncertain": verdict.uncertain,
        "uncertain_reason": ood.reason,
        "ood_score": None if ood.score is None else _r(ood.score),
        "ood_threshold": ood.threshold,
        "region": result.region,
        "region_side": None if result.region_side is None else _r(result.region_side),
        "air_share": None if result.air_share is None else _r(result.air_share),
        "crops": crops,
        "timing_s": {k: _r(v, 4) for k, v in result.timing.items()},
        "warnings": list(result.warnings),
    }
    if result.series is not None:
        out["series"] = dict(result.series)
    return out


def build_report(run: "PredictRun") -> dict[str, Any]:
    return {
        "liverstage_version": __version__,
        "model": dict(run.model),
        "results": [result_to_dict(r) for r in run.results],
        "errors": [{"input": inp, "error": err} for inp, err in run.errors],
    }


def write_report(path: str | Path, run: "PredictRun") -> dict[str, Any]:
    report = build_report(run)
    write_json(path, report)
    return report


def write_crops_csv(path: str | Path, run: "PredictRun") -> None:
    """One row per crop: input, slice, box, predicted stage, probabilities, cosines, max cosine, OOD score."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["input", "slice", "x0", "y0", "x1", "y1", "predicted",
                     *[f"prob_{s}" for s in STAGES], *[f"cos_{s}" for s in STAGES], "max_cosine", "ood_score"])
    for r in run.results:
        for i, ood in enumerate(_crop_ood(r)):
            writer.writerow([r.input, int(r.slices[i]), *[int(v) for v in r.boxes[i]],
                             STAGES[int(np.argmax(r.probs[i]))],
                             *[f"{p:.6f}" for p in r.probs[i]], *[f"{c:.6f}" for c in r.cosine[i]],
                             f"{r.cosine[i].max():.6f}", "" if ood is None else f"{ood:.6f}"])
    write_text(path, buf.getvalue())


def print_table(run: "PredictRun", console=None) -> None:
    """A short summary table on stdout (rich): an uncertain volume shows "uncertain", not a stage."""
    from rich.console import Console  # noqa: PLC0415
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = console or Console()
    table = Table(title=f"liverstage predict ({run.model['backend']}, {run.model['precision']})")
    for col in ("input", "stage", "P(A/B/C)", "crops", "OOD score", "s"):
        table.add_column(col, justify="left" if col in ("input", "stage") else "right", overflow="fold")
    for r in run.results:
        v = r.verdict
        score = "n/a" if v.ood.score is None else f"{v.ood.score:.2f}"
        if v.uncertain:
            stage, probs = "[yellow]uncertain[/yellow]", "-"
        else:
            stage, probs = f"{v.stage} {STAGE_NAMES[v.stage]}", "/".join(f"{v.probabilities[s]:.2f}" for s in STAGES)
        table.add_row(escape(Path(r.input).name), stage, probs, str(len(r.slices)), score, f"{r.timing['total']:.2f}")
    for inp, _err in run.errors:
        table.add_row(escape(Path(inp).name), "[red]error[/red]", "", "", "", "")
    console.print(table)
    for r in run.results:
        for warning in r.warnings:
            console.print(f"[yellow]warning[/yellow] {escape(r.input)}: {escape(warning)}",
                          highlight=False, markup=True, soft_wrap=True)
        if r.verdict.uncertain:
            console.print(f"[yellow]uncertain[/yellow] {escape(r.input)}: {escape(r.verdict.ood.reason or '')}",
                          highlight=False, markup=True, soft_wrap=True)
    for inp, err in run.errors:
        console.print(f"[red]error[/red] {escape(inp)}: {escape(err)}", highlight=False, markup=True, soft_wrap=True)


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
        from matplotlib.patches import Rectangle  # noqa: PLC0415
    except ImportError:
        raise InputError("drawing the summary picture needs matplotlib: pip install 'liverstage[plot]'") from None
    return Figure, FigureCanvasAgg, Rectangle


def summary_picture_rgb(r: "VolumeResult") -> np.ndarray:
    """The volume's summary picture as uint8 [H, W, 3]: the mid crop's slice with its ROI box, and
    each crop's stage per slice.

    One drawing for `--png` and the DICOM secondary capture, so both show the same picture. It uses
    matplotlib's object API (no pyplot state), so it is safe to call from several threads.
    """
    Figure, FigureCanvasAgg, Rectangle = _import_matplotlib()
    if r.preview is None:
        raise InputError(f"{r.input}: no preview slice was kept, so there is nothing to draw (Predictor(keep_preview=True))")
    fig = Figure(figsize=(10, 4.2), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax_img, ax_plot = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    colours = {"A": "tab:green", "B": "tab:orange", "C": "tab:red"}
    pv = r.preview
    # Canonical RAS [x, y]: transpose so y runs up the page and x across it.
    ax_img.imshow(pv.image.T, cmap="gray", origin="lower", interpolation="nearest")
    x0, y0, x1, y1 = pv.box
    ax_img.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               edgecolor=colours[r.verdict.stage], linewidth=1.5))
    ax_img.invert_xaxis()  # radiological view: the patient's right on the left, anterior up
    ax_img.set_title(f"{Path(r.input).name}\naxial slice {pv.slice}, crop box (radiological view)", fontsize=9)
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    order = np.argsort(r.slices)
    for k, s in enumerate(STAGES):
        ax_plot.plot(r.slices[order], r.probs[order, k], "-o", ms=3, color=colours[s], label=f"P({s})")
    predicted = np.argmax(r.probs[order], axis=1)
    ax_plot.scatter(r.slices[order], np.full(len(order), 1.06), c=[colours[STAGES[p]] for p in predicted],
                    marker="s", s=18, clip_on=False)
    v = r.verdict
    note = " - UNCERTAIN" if v.uncertain else ""
    ax_plot.set_title(f"stage {v.stage} ({STAGE_NAMES[v.stage]}), mean P = {v.probability:.2f}{note}\n"
                      "squares: each crop's stage", fontsize=9)
    ax_plot.set_xlabel("axial slice")
    ax_plot.set_ylabel("probability")
    ax_plot.set_ylim(0, 1.1)
    ax_plot.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    canvas.draw()
    return np.array(canvas.buffer_rgba(), dtype=np.uint8)[:, :, :3]


def write_png(path: str | Path, run: "PredictRun") -> None:
    """One row per volume: each volume's `summary_picture_rgb`, stacked top to bottom."""
    from PIL import Image  # noqa: PLC0415

    results = [r for r in run.results if r.preview is not None]
    if not results:
        raise InputError("--png: no volume was staged, nothing to draw")
    picture = np.concatenate([summary_picture_rgb(r) for r in results], axis=0)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
