"""`liverstage jobs`: every series a `liverstage serve` work folder has received, and where it stands."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import typer


def _time(value) -> str:
    if value is None:
        return ""
    return datetime.datetime.fromtimestamp(float(value)).isoformat(timespec="seconds")


def job_view(row: dict) -> dict:
    """One series as `jobs --json` shows it (times in ISO 8601, local time)."""
    return {
        "series_uid": row["series_uid"], "study_uid": row["study_uid"], "series_number": row["series_number"],
        "description": row["description"], "modality": row["modality"], "calling_ae": row["calling_ae"],
        "instances": row["instances"], "state": row["state"], "reason": row["reason"],
        "stage": row["stage"], "uncertain": None if row["uncertain"] is None else bool(row["uncertain"]),
        "attempts": row["attempts"], "runs": row["runs"],
        "first_received": _time(row["first_received"]), "last_received": _time(row["last_received"]),
        "started": _time(row["started_at"]), "finished": _time(row["finished_at"]),
        "send": {"state": row["send_state"], "attempts": row["send_attempts"], "error": row["send_error"],
                 "next_try": _time(row["send_next_at"]) if row["send_state"] == "pending" else "",
                 "sent": _time(row["sent_at"]), "files": row["sent_files"]},
    }


def register(app: typer.Typer) -> None:
    @app.command("jobs")
    def jobs_command(
        work: Path = typer.Option(..., "--work", help="The work folder of a `liverstage serve`."),
        as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout instead of a table."),
    ) -> None:
        """List every received series: description, state, stage, times, attempts, errors, send state."""
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        from ..serve.queue import JobQueue  # noqa: PLC0415

        queue = JobQueue(work, create=False)
        try:
            jobs = [job_view(r) for r in queue.jobs()]
        finally:
            queue.close()
        if as_json:
            typer.echo(json.dumps({"work": str(work), "jobs": jobs}, indent=2))
            return
        table = Table(title=f"liverstage jobs ({work})")
        for col in ("series", "description", "n", "state", "stage", "received", "finished", "attempts", "send", "reason / error"):
            table.add_column(col, overflow="fold", no_wrap=col in ("series", "state", "received", "finished"))
        for j in jobs:
            stage = (j["stage"] or "") + (" uncertain" if j["uncertain"] else "")
            send = j["send"]["state"] + (f" ({j['send']['attempts']})" if j["send"]["attempts"] else "")
            table.add_row(j["series_uid"], j["description"], str(j["instances"]), j["state"], stage,
                          j["last_received"], j["finished"], str(j["attempts"]), send,
                          j["reason"] or j["send"]["error"])
        console = Console()
        if not console.is_terminal:  # piped or logged: full UIDs on one line beat fitting 80 columns
            console = Console(width=250)
        console.print(table)
        if not jobs:
            typer.echo("no series received yet")
