"""`liverstage predict`: stage NIfTI volumes or DICOM studies with an exported model (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import InputError

UNCERTAIN_EXIT_CODE = 3



def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_command(
        inputs: List[Path] = typer.Argument(..., help="NIfTI files (.nii/.nii.gz), folders of them, or DICOM study folders (searched recursively; each study is one input)."),
        model: Path = typer.Option(..., "--model", "-m", help="Exported model: .onnx (ONNX Runtime) or .engine (TensorRT, with its .engine.json)."),
        mask: Optional[Path] = typer.Option(None, "--mask", help="Liver mask for a single input (same grid as the volume)."),
        mask_dir: Optional[Path] = typer.Option(None, "--mask-dir", help="Folder of masks paired by file name: D/<name>, D/<stem>/liver.nii.gz, or one D/<stem>*.nii.gz."),
        mask_label: Optional[int] = typer.Option(None, "--mask-label", help="Label value of the liver in a multi-label mask (TotalSegmentator total_mr: 5). Default: any non-zero voxel."),
        bbox: Optional[str] = typer.Option(None, "--bbox", help="Liver box x0,y0,z0,x1,y1,z1 in the file's voxel coordinates (half-open); for a DICOM series: column, row, slice (slices in position order)."),
        series: Optional[str] = typer.Option(None, "--series", help="DICOM: the series to stage, by SeriesInstanceUID, series number or a description pattern (regular expression, case-insensitive). Default: the one series that passes the rules (see `liverstage series`)."),
        roi: Optional[str] = typer.Option(None, "--roi", help="'auto': rough liver region heuristic, no mask needed (the default when no mask or box is given)."),
        report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here (atomically)."),
        csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write one row per crop here."),
        png: Optional[Path] = typer.Option(None, "--png", help="Draw the ROI on the mid slice and each crop's stage per slice (needs matplotlib)."),
        dicom_out: Optional[Path] = typer.Option(None, "--dicom-out", help="DICOM inputs only: write a Comprehensive 3D SR (TID 1500) and an RGB secondary capture per staged series into DIR/<source SeriesInstanceUID>/, as new series of the source study (needs the dicom and plot extras)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Crops per model call."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda. auto takes the fastest present."),
        rebuild_engine: bool = typer.Option(False, "--rebuild-engine", help="A TensorRT engine built for another GPU or TensorRT version is rebuilt from its ONNX model instead of refused."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: the backend's own, one per core)."),
        backend_name: str = typer.Option("auto", "--backend", help="auto | onnx | openvino | trt. auto: a GPU engine or ONNX Runtime CUDA where present, else OpenVINO on the CPU where installed, else ONNX Runtime."),
        precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | int8. auto: the model's own, or bf16 with OpenVINO where the CPU has native bf16 and the model's parity record allows it. int8 runs the sibling X.int8.onnx."),
        hint: str = typer.Option("latency", "--hint", help="OpenVINO performance hint: latency (one request on all threads) or throughput (several streams, each batch split across them)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No table on stdout."),
        strict: bool = typer.Option(False, "--strict", help="Exit with code 3 when any staged input is uncertain (its crops look unlike the model's training crops, or the model has no out-of-distribution gate), so an unattended pipeline can route it to a person. Outputs are still written."),
    ) -> None:
        """Stage liver fibrosis (A early, B middle, C last) per volume, without torch.

        The stage of a volume is the argmax of its crops' mean probability; a volume whose crops look unlike the model's training crops is "uncertain" instead. Exit code 0 if every input was staged, 1 if some failed (listed under "errors" in the report), 2 for bad options, a bad model, or when no input could be staged (nothing is written then), 3 with --strict when no input failed but one or more are uncertain.
        """
        from ..backends.choice import choose_backend, model_info, validate_choice  # noqa: PLC0415
        from ..dicom import quiet_pydicom_warnings  # noqa: PLC0415
        from ..roi import parse_bbox  # noqa: PLC0415
        from ..predict import Predictor, resolve_inputs  # noqa: PLC0415
        from ..report import print_table, write_crops_csv, write_png, write_report  # noqa: PLC0415
        from ..dicom_out import build_for_run, check_dicom_out  # noqa: PLC0415

        validate_choice(backend_name, precision, device, threads, hint)
        box = parse_bbox(bbox) if bbox is not None else None
        if mask is not None and not mask.is_file():
            raise InputError(f"mask not found: {mask}")
        if png is not None:
            try:
                import matplotlib  # noqa: F401, PLC0415
            except ImportError:
                raise InputError("--png needs matplotlib: pip install 'liverstage[plot]'") from None
        quiet_pydicom_warnings()
        paths = resolve_inputs(inputs)
        if dicom_out is not None:
            check_dicom_out(dicom_out, paths)

        backend = choose_backend(model, backend=backend_name, precision=precision, device=device, threads=threads,
                                 hint=hint, rebuild_engine=rebuild_engine)
        predictor = Predictor(backend, mask=mask, mask_dir=mask_dir, mask_label=mask_label, bbox=box, roi=roi,
                              batch_size=batch_size, keep_preview=png is not None or dicom_out is not None,
                              model_info=model_info(backend), series=series)
        run = predictor.run(paths)

        if run.errors and not run.results:  # nothing staged: one line, nothing written
            source, message = run.errors[0]
            more = f" (and {len(run.errors) - 1} more input(s) failed)" if len(run.errors) > 1 else ""
            raise InputError((message if source in message else f"{source}: {message}") + more)
        dicom_results = build_for_run(run) if dicom_out is not None else []
        if report is not None:
            write_report(report, run)
        if csv_path is not None:
            write_crops_csv(csv_path, run)
        if png is not None and run.results:
            write_png(png, run)
        for built in dicom_results:
            built.write(dicom_out / built.source_series_uid)
        if not quiet:
            print_table(run)
            typer.echo(f"ran {backend.reason}")
        if run.errors:
            raise typer.Exit(code=1)
        if strict and any(r.verdict.uncertain for r in run.results):
            raise typer.Exit(code=UNCERTAIN_EXIT_CODE)
