"""`liverstage export`: a trained checkpoint -> ONNX (fp32/fp16/int8), TensorRT engine or Triton repository.

torch and the export package are imported inside the command body only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        checkpoint: Path = typer.Argument(..., help="RUN/model.pt written by `liverstage train`."),
        out: Path = typer.Option(..., "--out", "-o",
                                 help="X.onnx (--engine onnx), X.engine (--engine trt), or a folder (--format triton)."),
        engine: str = typer.Option("onnx", "--engine", help="onnx | trt (TensorRT 11, needs an NVIDIA GPU)."),
        precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 (int8: CPU, static QDQ)."),
        batch_min: int = typer.Option(1, "--batch-min", help="Smallest batch of the TensorRT profile."),
        batch_opt: int = typer.Option(16, "--batch-opt", help="Batch TensorRT optimises for; Triton's preferred batch."),
        batch_max: int = typer.Option(64, "--batch-max", help="Largest batch (TensorRT profile, Triton max_batch_size)."),
        calibration_manifest: Optional[Path] = typer.Option(
            None, "--calibration-manifest",
            help="Manifest of labelled crops/volumes for parity, INT8 calibration and temperature "
                 "(default: the checkpoint's own validation/test and training patients)."),
        fmt: str = typer.Option("onnx", "--format", help="onnx | triton (a Triton model repository folder)."),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="Model name inside a Triton repository."),
        calibrate_temperature: bool = typer.Option(
            True, "--calibrate-temperature/--no-calibrate-temperature",
            help="Fit the softmax temperature on validation crops (never changes the predicted stage)."),
        strict: bool = typer.Option(False, "--strict", help="Exit with code 1 if a parity target or the gate's far-out-of-distribution detection target is missed."),
    ) -> None:
        """Export a checkpoint for deployment, check it against PyTorch fp32 and write a model card.

        The deployed head is the cosine to each stage's normalised weight (no margin). Every export
        prints a parity report and writes it to PATH.parity.json, plus MODEL_CARD.md and
        model_card.json beside the model.
        """
        from liverstage.export.api import ExportOptions, export_checkpoint  # noqa: PLC0415

        options = ExportOptions(
            engine=engine.strip().lower(), precision=precision.strip().lower(), batch_min=batch_min,
            batch_opt=batch_opt, batch_max=batch_max, calibration_manifest=calibration_manifest,
            fmt=fmt.strip().lower(), calibrate_temperature=calibrate_temperature, model_name=model_name,
        )
        result = export_checkpoint(checkpoint, out, options, echo=typer.echo)
        if result.failures:
            typer.echo("liverstage: warning: parity targets missed: " + "; ".join(result.failures)
                       + f" (see {result.parity_path})", err=True)
        gate_warning = (result.parity.get("ood_gate") or {}).get("warning")
        if gate_warning:
            typer.echo(f"liverstage: warning: {gate_warning} (see {result.parity_path})", err=True)
        if strict and (result.failures or gate_warning):
            raise typer.Exit(code=1)
