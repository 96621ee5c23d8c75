"""`liverstage synth`: write a cohort of synthetic liver phantoms (not patients) + manifest."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputError


def check_replaceable(out: Path, *, marker: str, what: str) -> None:
    """Refuse to replace a non-empty folder that is not an earlier output of ours."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / marker).exists():
            raise InputError(f"{out} exists, is not empty and is not a liverstage {what} folder; pick a new --out")


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth_command(
        out: Path = typer.Argument(..., help="Folder to write (replaced whole if it is an earlier phantom cohort)."),
        patients: int = typer.Option(117, "--patients", "-n", min=1, max=100000, help="Number of phantoms."),
        seed: int = typer.Option(0, "--seed", min=0, help="Random seed; the same seed gives the same cohort."),
        in_plane: int = typer.Option(224, "--in-plane", min=32, max=1024, help="In-plane matrix size (voxels)."),
        slices: int = typer.Option(47, "--slices", min=6, max=1000, help="Mean slice count (varies +-15 % per phantom)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Write synthetic liver PHANTOMS (not patients): NIfTI volumes, liver masks, manifest.csv.

        Stage mix as in the paper (about 33/45/22 % A/B/C); stage signs (surface nodularity,
        reticular septa, caudate-to-right-lobe ratio, spleen size) overlap between stages.
        """
        from rich.console import Console  # noqa: PLC0415
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415

        from liverstage.phantoms import PHANTOM_NOTE, stage_plan, synth_cohort  # noqa: PLC0415

        check_replaceable(out, marker="PHANTOMS_NOT_PATIENTS.txt", what="phantom")
        console = Console(stderr=True)
        with Progress(TextColumn("phantoms"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, disable=quiet, transient=True) as progress:
            task = progress.add_task("synth", total=patients)
            manifest = synth_cohort(out, patients=patients, seed=seed, in_plane=in_plane, slices=slices,
                                    progress=lambda done, total: progress.update(task, completed=done))
        plan = stage_plan(patients, seed)
        counts = ", ".join(f"{s} {plan.count(s)}" for s in ("A", "B", "C"))
        typer.echo(f"wrote {patients} phantoms ({counts}) to {out}")
        typer.echo(f"manifest: {manifest}")
        typer.echo(PHANTOM_NOTE)
