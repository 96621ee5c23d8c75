"""`liverstage plot`: the paper's Fig. 2 (analytic) and a trained run's figures.

    liverstage plot margin-curves --out fig2.png [--csv fig2.csv] [--scales 2,5,10,20,30,64]
                                  [--margins 0.2,0.3,0.4,0.5,0.6] [--fixed-margin 0.5] [--fixed-scale 30]
    liverstage plot run RUN_OR_EXPERIMENT_DIR [--title TEXT]

matplotlib is imported inside the commands only.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputError


def parse_floats(text: str, *, option: str, positive: bool = False) -> list[float]:
    """'2,5,10' -> [2.0, 5.0, 10.0]; InputError naming the option on anything else."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise InputError(f"{option} needs at least one number, got {text!r}")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise InputError(f"{option}: {item!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise InputError(f"{option}: {item!r} is not a finite number")
        if positive and value <= 0:
            raise InputError(f"{option}: {item!r} must be positive")
        values.append(value)
    return values


def _check_figure_path(path: Path, option: str) -> None:
    if path.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise InputError(f"{option} {path} must end in .png, .pdf or .svg")


def register(app: typer.Typer) -> None:
    plot_app = typer.Typer(
        help="Figures: the paper's Fig. 2 margin curves, and a trained run's pictures.",
        no_args_is_help=True,
    )

    @plot_app.command("margin-curves")
    def margin_curves_command(
        out: Path = typer.Option(..., "--out", help="Figure file (.png, .pdf or .svg)."),
        csv_path: Path | None = typer.Option(None, "--csv", help="Also write the curve values as CSV."),
        scales: str = typer.Option("2,5,10,20,30,64", "--scales", help="Scales s for the left panel."),
        margins: str = typer.Option("0.2,0.3,0.4,0.5,0.6", "--margins", help="Margins m for the right panel."),
        fixed_margin: float = typer.Option(0.5, "--fixed-margin", help="m used in the left panel."),
        fixed_scale: float = typer.Option(30.0, "--fixed-scale", help="s used in the right panel."),
        classes: int = typer.Option(3, "--classes", min=2, help="Number of classes C."),
        points: int = typer.Option(181, "--points", min=2, help="Samples of theta in [0, pi/2]."),
    ) -> None:
        """Fig. 2: P(theta) = e^{s cos(theta+m)} / (e^{s cos(theta+m)} + C - 1), theta in [0, pi/2]."""
        _check_figure_path(out, "--out")
        scale_list = parse_floats(scales, option="--scales", positive=True)
        margin_list = parse_floats(margins, option="--margins")
        if fixed_scale <= 0:
            raise InputError(f"--fixed-scale must be positive, got {fixed_scale}")
        from liverstage.train import plots  # noqa: PLC0415

        curves = plots.margin_curves(scales=scale_list, margins=margin_list, fixed_margin=fixed_margin,
                                     fixed_scale=fixed_scale, num_classes=classes, n_points=points)
        plots.plot_margin_curves(out, curves, num_classes=classes)
        typer.echo(f"wrote {out}")
        if csv_path is not None:
            plots.write_margin_curves_csv(csv_path, curves, num_classes=classes)
            typer.echo(f"wrote {csv_path}")

    @plot_app.command("run")
    def run_command(
        path: Path = typer.Argument(..., help="A run directory (with predictions.csv) or an experiment directory."),
        title: str | None = typer.Option(None, "--title", help="Figure title (default: the run's folder name)."),
    ) -> None:
        """Redraw confusion.png, curves.png and angles.png next to each run's predictions.csv."""
        if not path.is_dir():
            raise InputError(f"{path} is not a directory")
        from liverstage.train import plots  # noqa: PLC0415

        run_dirs = [path] if (path / "predictions.csv").is_file() else list(plots.iter_run_dirs(path))
        if not run_dirs:
            raise InputError(f"no predictions.csv in or under {path}")
        for run_dir in run_dirs:
            for written in plots.plot_run(run_dir, title=title):
                typer.echo(f"wrote {written}")

    app.add_typer(plot_app, name="plot")
