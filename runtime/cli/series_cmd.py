"""`liverstage series`: list every DICOM series under a study folder and whether it would be staged."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import InputError


def _transfer_syntax_names(uids) -> str:
    from pydicom.uid import UID  # noqa: PLC0415

    return ", ".join(UID(u).name for u in uids)


def register(app: typer.Typer) -> None:
    @app.command("series")
    def series_command(
        study: Path = typer.Argument(..., help="A DICOM study folder (searched recursively; non-DICOM files are ignored)."),
        as_json: bool = typer.Option(False, "--json", help="Print the series as JSON on stdout instead of a table."),
    ) -> None:
        """List every DICOM series found (headers only) and whether `predict` would stage it, and why not.

        The rules: MR; ImageType ORIGINAL\\PRIMARY; not a localizer or scout (image type or
        description); one consistent geometry; axial within 15 degrees; at least 8 slices.
        """
        from ..dicom import quiet_pydicom_warnings  # noqa: PLC0415
        from ..dicom_study import scan_dicom  # noqa: PLC0415

        quiet_pydicom_warnings()

        if not study.exists():
            raise InputError(f"study folder not found: {study}")
        if not study.is_dir():
            raise InputError(f"not a folder: {study}")
        series = scan_dicom(study)
        if as_json:
            typer.echo(json.dumps([s.to_dict() for s in series], indent=2))
            return
        if not series:
            raise InputError(f"{study}: no DICOM images found")
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        studies = list(dict.fromkeys(s.study_instance_uid for s in series))
        console = Console()
        for uid in studies:
            table = Table(title=f"study {uid or '(no StudyInstanceUID)'} in {study}", title_justify="left")
            for col in ("number", "description", "modality", "orientation", "slices/frames", "transfer syntax",
                        "image type", "staged"):
                table.add_column(col, justify="right" if col in ("number", "slices/frames") else "left",
                                 overflow="fold")
            for s in (s for s in series if s.study_instance_uid == uid):
                count = str(s.n_instances) if s.n_frames == s.n_instances else f"{s.n_instances}/{s.n_frames}"
                staged = "[green]yes[/green]" if s.stageable else f"[red]no[/red]: {s.reason}"
                table.add_row("" if s.series_number is None else str(s.series_number), s.description, s.modality,
                              s.orientation, count, _transfer_syntax_names(s.transfer_syntaxes) + (" (lossy)" if s.lossy else ""),
                              "\\".join(s.image_type), staged)
            console.print(table)
