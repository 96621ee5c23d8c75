"""The runtime targets, each printed as a ratio against a reference measured in the same run.

    python benchmarks/bench_runtime.py [--threads N] [--iters 10] [--warmup 3] [--out DIR] [--json F] [--parts 1,2,3,4,5]

1. ONNX Runtime fp32 vs PyTorch eager fp32, ResNet18 at 224 px, batch 16   target >= 1.9x
2. ONNX Runtime int8 (static QDQ) vs PyTorch eager fp32, same               target >= 5x
3. predict end to end on a 40-slice phantom vs model-only time of its crops target <= 1.25x (ONNX
   Runtime fp32); with OpenVINO also for the fastest backend, OpenVINO int8  target <= 1.35x
   and, for comparison, a series of 8 such phantoms in one predict run (the next volume is
   read while the model runs) and one per run, against model-only time of all their crops
4. peak memory (ru_maxrss of a child `liverstage predict`) on 512x512x200   target <= 2 GB
5. OpenVINO (needs the openvino extra), same model and batch:
   openvino-bf16 vs ONNX Runtime fp32                                       target >= 1.8x
   openvino-int8 vs ONNX Runtime int8                                       target >= 1.1x
   each openvino row vs plain OpenVINO on the same file (openvino_plain.py) target >= 0.95x

Needs the `train` extra (torch, to build the checkpoint, export it and time the reference).
The model has random weights (speed and memory do not depend on what it learned); volumes are
synthetic phantoms, NOT patients, centre-cropped along z to the exact slice counts above.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_phantom(folder: Path, name: str, *, in_plane: int, slices: int, index: int = 0) -> tuple[Path, Path]:
    """A phantom (not a patient) in canonical RAS, centre-cropped along z to exactly `slices`."""
    import nibabel as nib

    from liverstage.phantoms.synth import synth_patient

    ph = synth_patient(index, seed=0, in_plane=in_plane, slices=int(slices * 1.2) + 2)
    img = nib.as_closest_canonical(nib.Nifti1Image(ph.data, ph.affine))
    mask = nib.as_closest_canonical(nib.Nifti1Image(ph.mask, ph.affine))
    n = img.shape[2]
    if n < slices:
        raise SystemExit(f"phantom has {n} slices, fewer than {slices}")
    z0 = (n - slices) // 2
    vol_path, mask_path = folder / f"{name}.nii.gz", folder / f"{name}_mask.nii.gz"
    nib.save(img.slicer[:, :, z0:z0 + slices], vol_path)
    nib.save(mask.slicer[:, :, z0:z0 + slices], mask_path)
    return vol_path, mask_path


def export_models(folder: Path) -> tuple[Path, Path, Path]:
    """ResNet18 + AMCL checkpoint (random weights, crop 224) -> fp32 and int8 ONNX via liverstage.export."""
    import torch

    from liverstage.export.api import ExportOptions, export_checkpoint
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.checkpoint import save_checkpoint
    from liverstage.train.model import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", "amcl").eval()
    ckpt = folder / "model.pt"
    if not ckpt.is_file():
        save_checkpoint(ckpt, net, preprocess=PreprocessSpec(crop_size=224), args={}, splits={}, manifest=None,
                        epoch=0)
    fp32, int8 = folder / "resnet18.onnx", folder / "resnet18.int8.onnx"
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        if path.is_file():  # --out DIR from an earlier run: reuse
            print(f"reusing {path}", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"exporting {precision} ...", flush=True)
        export_checkpoint(ckpt, path, ExportOptions(precision=precision), echo=lambda s: None)
        print(f"  {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return ckpt, fp32, int8


# Linux carries the RSS high-water mark across fork + exec (exec records the old address space's
# peak), so a child forked straight from this big process (torch, a 512^3-ish phantom) would report
# OUR peak. A bare Python launcher (small) starts the measured child and reports its ru_maxrss.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_memory_of_predict(volume: Path, mask: Path, model: Path, threads: int | None) -> tuple[float, float, int]:
    """(peak RSS in GB, wall s, exit code) of `liverstage predict` in a child process (ru_maxrss)."""
    report = volume.with_suffix(".report.json")
    cmd = [sys.executable, "-c", "from liverstage.runtime.cli import main; main()", "predict", str(volume),
           "--model", str(model), "--mask", str(mask), "--report", str(report), "--quiet", "--batch-size", "16"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, check=True)
    maxrss_kib, code = (int(v) for v in out.stdout.split())
    return maxrss_kib / 1024**2, time.perf_counter() - t0, code  # ru_maxrss is KiB on Linux


def fma_peak_gflops(threads: int) -> float | None:
    """Register-only float32 FMA rate of this CPU (benchmarks/fma_peak.c), best of 3 runs; None
    without a C compiler. The ceiling for any float32 kernel, above numpy's sgemm."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        built = subprocess.run([compiler, "-O3", "-march=native", "-ffp-contract=fast", "-fopenmp",
                                str(Path(__file__).with_name("fma_peak.c")), "-o", str(exe)], capture_output=True)
        if built.returncode != 0:
            return None
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        return max(float(subprocess.run([str(exe)], capture_output=True, text=True, env=env, check=True).stdout)
                   for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and ONNX Runtime (same for both)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="keep models and phantoms here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--parts", default="1,2,3,4,5", help="which figures to measure (1,2 share one run)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    folder = Path(tmp.name) if tmp else args.out
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, fp32, int8 = export_models(folder)

    figures: dict = {}
    if parts & {"1", "2"}:
        speed(figures, args, ckpt, fp32, int8)
    if "3" in parts:
        end_to_end_figure(figures, args, folder, fp32)
    if "5" in parts:
        openvino_figure(figures, args, fp32, int8)
    if "4" in parts:
        print("\n[4] peak memory of `liverstage predict` on a 512x512x200 phantom (not a patient)", flush=True)
        big, big_mask = make_phantom(folder, "phantom512", in_plane=512, slices=200)
        gb, wall, code = peak_memory_of_predict(big, big_mask, fp32, args.threads)
        figures["peak_memory_gb"] = gb
        print(f"  exit {code}, {wall:.1f} s, peak RSS {gb:.2f} GB   (target <= 2 GB)")

    if args.json:
        from liverstage.runtime.atomic import write_json

        write_json(args.json, figures)
        print(f"\nwrote {args.json}")
    if tmp:
        tmp.cleanup()
    print("\nPhantoms are synthetic, not patients; timings depend on this machine and its load.")


def speed(figures: dict, args, ckpt: Path, fp32: Path, int8: Path) -> None:
    from liverstage.runtime.bench import BenchConfig, run_bench
    from liverstage.train.reference import TorchEager

    print(f"\n[1, 2] ResNet18 at 224 px, batch 16, {args.threads} thread(s), {args.warmup} warm-up + {args.iters} runs",
          flush=True)
    cfg = BenchConfig(model=fp32, backends=("torch", "onnx", "onnx-int8"), batch_sizes=(16,), warmup=args.warmup,
                      iters=args.iters, threads=args.threads, int8_model=int8, checkpoint=ckpt,
                      torch_reference=TorchEager)
    bench = run_bench(cfg, log=lambda s: print("  " + s, flush=True))
    rows = {r["backend"]: r for r in bench["results"] if not r["skipped"]}
    for r in bench["results"]:
        if r["skipped"]:
            print(f"  {r['backend']} skipped: {r['skipped']}")
    print(f"  matmul peak {bench['machine']['matmul_peak_gflops']:.1f} GFLOP/s; "
          f"{bench['flops_per_crop'] / 1e9:.2f} GFLOP per crop (numpy BLAS: {bench['machine']['matmul_blas']})")
    for name in ("torch", "onnx", "onnx-int8"):
        if name in rows:
            r = rows[name]
            print(f"  {name:10s} p50 {r['p50_ms']:8.1f} ms  p90 {r['p90_ms']:8.1f}  p99 {r['p99_ms']:8.1f}  "
                  f"{r['crops_per_s']:7.1f} crops/s  {r['gflops']:6.1f} GFLOP/s ({100 * r['fraction_of_peak']:.0f}% of peak)")
    figures["bench"] = bench
    if "torch" in rows:
        figures["onnx_fp32_speedup"] = rows["onnx"]["speedup_vs_torch"]
        figures["onnx_int8_speedup"] = rows["onnx-int8"]["speedup_vs_torch"] if "onnx-int8" in rows else None
        print(f"  ONNX Runtime fp32 vs PyTorch eager fp32: {figures['onnx_fp32_speedup']:.2f}x   (target >= 1.9x)")
        fp32_headroom(figures, args, bench, rows)
        if figures["onnx_int8_speedup"]:
            print(f"  ONNX Runtime int8 vs PyTorch eager fp32: {figures['onnx_int8_speedup']:.2f}x   (target >= 5x)")


def fp32_headroom(figures: dict, args, bench: dict, rows: dict) -> None:
    """What the 1.9x fp32 target asks of this CPU: the GFLOP/s it needs against both peaks."""
    fma = fma_peak_gflops(args.threads)
    needed = 1.9 * rows["torch"]["gflops"]
    figures["fp32_target_needs_gflops"] = needed
    figures["fma_peak_gflops"] = fma
    line = (f"  1.9x needs {needed:.0f} GFLOP/s: {100 * needed / bench['machine']['matmul_peak_gflops']:.0f}% of "
            f"the matmul peak")
    if fma is None:
        line += "; FMA peak not measured (no C compiler)"
    else:
        line += (f", {100 * needed / fma:.0f}% of this CPU's register-only FMA peak ({fma:.0f} GFLOP/s, "
                 f"benchmarks/fma_peak.c); ONNX Runtime fp32 is at {100 * rows['onnx']['gflops'] / fma:.0f}% of it")
    print(line)


def end_to_end_figure(figures: dict, args, folder: Path, fp32: Path) -> None:
    from liverstage.runtime.backends.choice import choose_backend
    from liverstage.runtime.backends.openvino import openvino_installed
    from liverstage.runtime.bench import BenchConfig, end_to_end

    print("\n[3] end to end vs model-only, 40-slice phantom (not a patient), liver mask, batch 16", flush=True)
    vol40, mask40 = make_phantom(folder, "phantom40", in_plane=224, slices=40)
    e2e_cfg = BenchConfig(model=fp32, batch_sizes=(16,), iters=args.iters, input_volume=vol40)
    runs = [("onnx", "fp32", 1.25)] + ([("openvino", "int8", 1.35)] if openvino_installed() else [])
    for backend_name, precision, target in runs:
        backend = choose_backend(fp32, backend=backend_name, precision=precision, device="cpu", threads=args.threads)
        e2e = end_to_end(e2e_cfg, backend, mask=mask40, log=lambda s: print("  " + s, flush=True))
        figures["end_to_end" if backend_name == "onnx" else f"end_to_end_{backend_name}_{precision}"] = e2e
        print(f"  {backend.name} {backend.precision}, {e2e['crops']} crops: end to end {e2e['end_to_end_s']:.3f} s, "
              f"model only {e2e['model_only_s']:.3f} s: ratio {e2e['ratio']:.3f}   (target <= {target})")
    series, mask_dir = series_phantoms(folder, SERIES_VOLUMES)
    print(f"  a series: {len(series)} such phantoms in one predict run (it reads the next volume while the model "
          "runs this one), against model-only time of all their crops; for comparison, not a target", flush=True)
    for backend_name, precision, _ in runs:
        backend = choose_backend(fp32, backend=backend_name, precision=precision, device="cpu", threads=args.threads)
        fig = series_end_to_end(backend, series, mask_dir, repeats=max(3, min(args.iters, 7)))
        figures[f"series_end_to_end_{backend_name}_{precision}"] = fig
        print(f"  {backend.name} {backend.precision}, {fig['crops']} crops: one run {fig['end_to_end_s']:.3f} s, "
              f"one volume per run {fig['one_per_run_s']:.3f} s, model only {fig['model_only_s']:.3f} s: "
              f"ratios {fig['ratio']:.3f} and {fig['one_per_run_ratio']:.3f}")


SERIES_VOLUMES = 8


def series_phantoms(folder: Path, count: int) -> tuple[list[Path], Path]:
    """`count` different 40-slice phantoms, their masks in masks/ under the volume's name (--mask-dir)."""
    series, mask_dir = folder / "series", folder / "series" / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    volumes = []
    for index in range(count):
        vol = series / f"phantom{index}.nii.gz"
        if not vol.is_file():
            made, mask = make_phantom(series, f"phantom{index}", in_plane=224, slices=40, index=index)
            mask.replace(mask_dir / made.name)
        volumes.append(vol)
    return volumes, mask_dir


def series_end_to_end(backend, volumes: list[Path], mask_dir: Path, *, repeats: int, batch_size: int = 16) -> dict:
    """Medians of: predict over all `volumes` in one run, predict one volume per run, and the
    model alone on all their crops; interleaved, one of each per repeat (same machine load)."""
    from liverstage.runtime.bench import percentiles, time_calls
    from liverstage.runtime.predict import Predictor

    predictor = Predictor(backend, batch_size=batch_size, mask_dir=mask_dir)
    images = [predictor.prepare(v).images for v in volumes]

    def model_only() -> None:
        for crops in images:
            for start in range(0, len(crops), batch_size):
                backend.run(crops[start:start + batch_size])

    def one_run() -> None:
        run = predictor.run(volumes)
        if run.errors:
            raise SystemExit(f"series: {run.errors[0][0]}: {run.errors[0][1]}")

    def one_per_run() -> None:
        for vol in volumes:
            predictor.run([vol])

    one_run(), one_per_run(), model_only()
    times: dict[str, list[float]] = {"run": [], "each": [], "model": []}
    for _ in range(repeats):
        times["run"] += time_calls(one_run, warmup=0, iters=1)
        times["each"] += time_calls(one_per_run, warmup=0, iters=1)
        times["model"] += time_calls(model_only, warmup=0, iters=1)
    run_s, each_s, model_s = (percentiles(times[k])["p50"] for k in ("run", "each", "model"))
    return {"volumes": len(volumes), "crops": int(sum(len(c) for c in images)), "repeats": repeats,
            "end_to_end_s": run_s, "one_per_run_s": each_s, "model_only_s": model_s,
            "ratio": run_s / model_s, "one_per_run_ratio": each_s / model_s}


def openvino_figure(figures: dict, args, fp32: Path, int8: Path) -> None:
    """OpenVINO against ONNX Runtime and against plain OpenVINO on the same files, one run.

    Every runner is opened once, then timed in rounds, each runner once per round (3 calls after
    1 warm-up call), and each ratio is the median over rounds of the two runners' times in the
    same round: on a machine whose load drifts, both sides of a ratio see the same load.
    """
    from liverstage.runtime.backends.choice import choose_backend
    from liverstage.runtime.backends.openvino import OpenVINOBackend, native_bf16, openvino_installed
    from liverstage.runtime.bench import percentiles, time_calls

    print(f"\n[5] OpenVINO, ResNet18 at 224 px, batch 16, {args.threads} thread(s), {args.iters} interleaved rounds",
          flush=True)
    if not openvino_installed():
        print("  skipped: OpenVINO is not installed (pip install 'liverstage[openvino]')")
        return
    from openvino_plain import PlainOpenVINO

    ov_rows = {"openvino": (fp32, "fp32"), "openvino-int8": (int8, "int8")}
    if native_bf16():
        ov_rows["openvino-bf16"] = (fp32, "bf16")
    else:
        print("  openvino-bf16 skipped: this CPU has no native bf16")
    runners = {"onnx": choose_backend(fp32, backend="onnx", precision="fp32", device="cpu", threads=args.threads),
               "onnx-int8": choose_backend(int8, backend="onnx", device="cpu", threads=args.threads)}
    for row, (path, precision) in ov_rows.items():
        runners[row] = OpenVINOBackend(path, precision=precision, threads=args.threads)
        runners[f"plain {row}"] = PlainOpenVINO(str(path), precision="bf16" if precision == "bf16" else "fp32",
                                                threads=args.threads)
    batch = np.random.default_rng(0).standard_normal((16, 1, 224, 224)).astype(np.float32)
    rounds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.iters):
        for name, runner in runners.items():
            rounds[name].append(percentiles(time_calls(lambda: runner.run(batch), warmup=1, iters=3))["p50"])
    for name, times in rounds.items():
        p50 = float(np.median(times))
        print(f"  {name:20s} p50 {p50 * 1e3:8.1f} ms  {16 / p50:7.1f} crops/s")

    def paired(reference: str, row: str) -> float:
        return float(np.median(np.array(rounds[reference]) / np.array(rounds[row])))

    out: dict = {"p50_s": {name: float(np.median(times)) for name, times in rounds.items()}, "rounds": args.iters}
    for row, reference, target in (("openvino-bf16", "onnx", 1.8), ("openvino-int8", "onnx-int8", 1.1)):
        if row in runners:
            out[f"{row}_vs_{reference}"] = paired(reference, row)
            print(f"  {row} vs {reference}: {out[f'{row}_vs_{reference}']:.2f}x   (target >= {target}x)")
    for row in ov_rows:
        out[f"{row}_vs_plain"] = paired(f"plain {row}", row)
        print(f"  {row} vs plain OpenVINO on the same file: {out[f'{row}_vs_plain']:.1%}   (target >= 95%)")
    figures["openvino"] = out


if __name__ == "__main__":
    main()
