"""`liverstage bench`: latency, throughput and ratios of an exported model on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{option} needs comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError(f"{option} needs at least one value, got {text!r}")
    return values


def torch_reference():
    """liverstage.train.reference.TorchEager where torch is installed, else None (the torch row
    is then skipped); torch itself is only imported when the reference is built."""
    import importlib.util  # noqa: PLC0415

    try:
        if importlib.util.find_spec("torch") is None:
            return None
    except (ImportError, ValueError):
        return None
    from liverstage.train.reference import TorchEager  # noqa: PLC0415

    return TorchEager


def print_bench(result: dict, console=None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = console or Console()
    m = result["machine"]
    flops = result["flops_per_crop"]
    console.print(
        f"warm-up {result['warmup']}, timed iterations {result['iters']}, threads "
        f"{m['threads'] if m['threads'] is not None else 'default (each backend: one per core)'}, "
        f"{m['cpu_count']} CPU(s); inputs: {result['inputs']}", highlight=False)
    model_flops = f"{flops / 1e9:.3g} GFLOP per crop" if flops else "n/a (onnx not installed or shapes unknown)"
    console.print(f"float32 matmul peak (numpy, this run): {m['matmul_peak_gflops']:.1f} GFLOP/s; model: {model_flops}",
                  highlight=False)
    console.print(f"(numpy BLAS: {m['matmul_blas']}; above 100% of this peak means the backend's kernels beat it)",
                  highlight=False)
    if m.get("ood_gate_kernels") == "numpy":
        console.print("OOD gate: numpy code (its compiled kernels were not built at install: no C compiler?), "
                      "about twice their time", highlight=False)
    table = Table(title=f"liverstage bench: {result['model']['backbone']} at {result['model']['crop_size']} px")
    for col in ("backend", "batch", "p50 ms", "p90 ms", "p99 ms", "crops/s", "vs torch", "GFLOP/s", "% peak", "OOD gate"):
        table.add_column(col, justify="left" if col == "backend" else "right", no_wrap=col == "backend")
    for r in result["results"]:
        if r["skipped"]:
            continue
        table.add_row(
            r["backend"] + (" (GPU)" if r.get("device") == "cuda" else ""), str(r["batch_size"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}", f"{r['crops_per_s']:.4g}",
            f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "n/a",
            f"{r['gflops']:.1f}" if r["gflops"] else "n/a",
            f"{100 * r['fraction_of_peak']:.0f}%" if r["fraction_of_peak"] else "n/a",
            f"{r['ood_gate_ms']:.2f} ms ({100 * r['ood_gate_fraction']:.1f}%)" if r.get("ood_gate_ms") is not None else "n/a",
        )
    console.print(table)
    for r in result["results"]:
        if r["skipped"]:
            console.print(f"{r['backend']}: skipped: {r['skipped']}", highlight=False)
    e2e = result.get("end_to_end")
    if e2e:
        console.print(f"end-to-end (volume in, report out) {e2e['end_to_end_s'] * 1e3:.1f} ms vs model-only "
                      f"{e2e['model_only_s'] * 1e3:.1f} ms for its {e2e['crops']} crops (batch {e2e['batch_size']}): "
                      f"ratio {e2e['ratio']:.2f}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_command(
        model: Path = typer.Option(..., "--model", "-m", help="Exported model (.onnx, or .engine for trt)."),
        batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Comma-separated batch sizes."),
        backends: str = typer.Option("onnx,onnx-int8,openvino,openvino-bf16,openvino-int8,trt,torch", "--backends",
                                     help="Any of onnx, onnx-int8, openvino, openvino-bf16, openvino-int8, trt, torch."),
        input_volume: Optional[Path] = typer.Option(None, "--input", help="A volume: time predict end to end (--roi auto) against model-only on its crops."),
        warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing."),
        iters: int = typer.Option(20, "--iters", help="Timed runs per backend and batch size."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Inference threads for ONNX Runtime, OpenVINO and torch (default: their own)."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto for the ONNX backends. The torch reference runs on each device a measured backend runs on (the GPU for trt), so every speed-up is against PyTorch on the same device."),
        int8_model: Optional[Path] = typer.Option(None, "--int8-model", help="INT8 ONNX model (default: X.int8.onnx beside X.onnx)."),
        engine: Optional[Path] = typer.Option(None, "--engine", help="TensorRT engine (default: X.engine beside X.onnx)."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="model.pt for the PyTorch eager reference (default: the path in the model's metadata)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the figures as JSON (atomically)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the table."),
    ) -> None:
        """Latency p50/p90/p99, crops/s, speed-up against PyTorch eager fp32 and GFLOP/s against this machine's matmul peak, all measured in this run."""
        from rich.console import Console  # noqa: PLC0415

        from ..atomic import write_json  # noqa: PLC0415
        from ..jsonsafe import json_safe  # noqa: PLC0415
        from ..bench import BenchConfig, run_bench  # noqa: PLC0415

        if device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")
        cfg = BenchConfig(model=model, backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
                          batch_sizes=_int_list(batch_sizes, "--batch-sizes"), warmup=warmup, iters=iters,
                          threads=threads, device=device, input_volume=input_volume, int8_model=int8_model,
                          engine=engine, checkpoint=checkpoint, torch_reference=torch_reference())
        err = Console(stderr=True)
        result = run_bench(cfg, log=(lambda s: None) if quiet else (lambda s: err.print(s, highlight=False)))
        if json_out is not None:
            write_json(json_out, json_safe(result))
        print_bench(result)
