"""`liverstage serve`: a DICOM node that stages every complete MR series it receives (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        model: Path = typer.Option(..., "--model", "-m", help="Exported model: .onnx (ONNX Runtime or OpenVINO) or .engine (TensorRT)."),
        work: Path = typer.Option(..., "--work", help="Work folder: queue.sqlite, incoming/<series>/, results/<series>/."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
        port: int = typer.Option(11112, "--port", min=0, max=65535, help="TCP port (0: any free port; the log names it)."),
        ae_title: str = typer.Option("LIVERSTAGE", "--ae-title", help="Our AE title; associations must call it."),
        allow_ae: Optional[str] = typer.Option(None, "--allow-ae", help="Comma-separated calling AE titles to accept (default: any)."),
        quiet_seconds: float = typer.Option(10.0, "--quiet-seconds", min=0.0, help="A series is complete when no instance of it arrived for this long."),
        send_to: Optional[str] = typer.Option(None, "--send-to", help="Send the DICOM results to AE@HOST:PORT (retried with backoff)."),
        mask_dir: Optional[Path] = typer.Option(None, "--mask-dir", help="Liver masks named by SeriesInstanceUID: D/<uid>.nii.gz, D/<uid>/liver.nii.gz or one D/<uid>*.nii.gz."),
        mask_label: Optional[int] = typer.Option(None, "--mask-label", help="Label value of the liver in multi-label masks (TotalSegmentator total_mr: 5)."),
        bbox: Optional[str] = typer.Option(None, "--bbox", help="Liver box x0,y0,z0,x1,y1,z1 (column, row, slice) for every series."),
        roi: Optional[str] = typer.Option(None, "--roi", help="'auto': rough liver region heuristic (the default when no mask or box is given)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Crops per model call."),
        backend_name: str = typer.Option("auto", "--backend", help="auto | onnx | openvino | trt, as for predict."),
        precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | int8, as for predict."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda, as for predict."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: the backend's own, one per core)."),
        hint: str = typer.Option("latency", "--hint", help="OpenVINO performance hint: latency | throughput, as for predict."),
        stop_timeout: float = typer.Option(30.0, "--stop-timeout", min=0.0, help="On SIGTERM, wait this long for the running job, then queue it again."),
    ) -> None:
        """Receive MR series by DICOM (C-STORE), stage each complete one, send the results on.

        Runs until SIGTERM or Ctrl-C, then exits 0. Every series ends as done, skipped (with the reason) or failed (with the reason); `liverstage jobs --work DIR` lists them.
        """
        from ..backends.choice import validate_choice  # noqa: PLC0415
        from ..roi import parse_bbox  # noqa: PLC0415
        from ..serve.sender import Destination  # noqa: PLC0415
        from ..serve.service import ServeConfig, Service, exit_now, logging_to_stderr  # noqa: PLC0415

        for module in ("pynetdicom", "highdicom", "matplotlib"):  # the node, its SR, its secondary capture
            try:
                __import__(module)
            except ImportError:
                raise InputError(f"serve needs {module}: pip install 'liverstage[serve]'") from None
        validate_choice(backend_name, precision, device, threads, hint)
        if roi is not None and roi != "auto":
            raise InputError(f"--roi must be 'auto', got {roi!r}")
        config = ServeConfig(
            model=model, work=work, host=host, port=port, ae_title=ae_title,
            allow_ae=tuple(t.strip() for t in (allow_ae or "").split(",") if t.strip()),
            quiet_seconds=quiet_seconds, send_to=Destination.parse(send_to) if send_to else None,
            mask_dir=mask_dir, mask_label=mask_label, bbox=parse_bbox(bbox) if bbox is not None else None,
            roi=roi, batch_size=batch_size, backend=backend_name, precision=precision, device=device, threads=threads,
            hint=hint, stop_timeout=stop_timeout,
        )
        with logging_to_stderr():
            finished = Service(config).serve_forever()
        if not finished:
            exit_now(0)
