"""`liverstage evaluate`: the paper's metrics of a trained checkpoint on a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_command(
        model: Path = typer.Argument(..., help="A liverstage checkpoint (RUN/model.pt)."),
        manifest: Path = typer.Option(..., "--manifest", help="CSV: patient_id,image,mask,stage."),
        patients: Optional[Path] = typer.Option(None, "--patients", help="Evaluate only these patient ids (one per line)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics here as JSON."),
        predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write per-crop predictions here as CSV."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Crops per inference batch."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Crop cache (default $LIVERSTAGE_CACHE or ~/.cache/liverstage/crops)."),
    ) -> None:
        """Accuracy, per-stage F1, mis-staging A->C / C->A, kappa, patient accuracy and AUCs."""
        import json  # noqa: PLC0415

        from liverstage.train.evaluate import evaluate_checkpoint, read_patient_list  # noqa: PLC0415

        metrics = evaluate_checkpoint(
            model, manifest, patients=read_patient_list(patients) if patients is not None else None,
            out=out, predictions=predictions, device=device, batch_size=batch_size, cache_dir=cache_dir,
        )
        typer.echo(json.dumps(metrics, indent=2))
