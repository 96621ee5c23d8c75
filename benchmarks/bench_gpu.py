"""GPU figures a CPU cannot give: mixed-precision speed and half-precision numerics on one CUDA GPU.

Everything is measured in one process, against references from the same run:
1. peak: the GPU's matrix-multiply rate (8192^3) in fp32 (TF32 off), TF32, bf16 and fp16.
2. inference, per backbone (random weights; speed does not depend on what a model learned): the
   deployed graph (backbone -> L2-normalised cosine head, as exported) in
     fp32       PyTorch eager fp32, TF32 off: THE reference ("PyTorch eager fp32")
     tf32       PyTorch's defaults (cuDNN may use TF32 in convolutions)
     fp16/bf16  the backbone in half precision (channels_last), the cosine head kept in fp32,
                as the exporter keeps it in FP16 ONNX and TensorRT engines
   crops/s, speed-up against fp32, achieved TFLOP/s against the peak of that precision, and the
   numerics of fp16 / bf16 against fp32: max |delta cosine| and stage agreement.
3. training step, per backbone: a bare fp32 loop (NCHW, TF32 off) against liverstage's own
   `train_steps` as `liverstage train` runs it on a GPU (channels_last, bf16 autocast, fp32
   angular head, cudnn.benchmark), both with Adam and the AMCL head.
4. with --checkpoint (a trained model.pt): fp16 / bf16 numerics on crops of freshly generated
   phantoms (NOT patients): max |delta cosine|, stage agreement and accuracy against fp32.

TensorRT is not used here: this measures what PyTorch itself gives on the GPU, the reference a
TensorRT fp16 engine must be compared with on the same GPU. Example (one H100/H200, ~2 min):
    python benchmarks/bench_gpu.py --json gpu.json --checkpoint liverstage-demo/run/model.pt
`--smoke` runs tiny sizes on the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from liverstage.export.graph import InferenceGraph, probs_source_for
from liverstage.runtime.atomic import write_json
from liverstage.runtime.bench import percentiles, time_calls
from liverstage.runtime.jsonsafe import json_safe
from liverstage.train.evaluate import amp_dtype_for
from liverstage.train.model import build_model
from liverstage.train.trainer import TrainStep, train_steps

from bench_train import bare_loop  # the same bare fp32 loop as the CPU benchmark (this folder)


class HalfBackbone(nn.Module):
    """The backbone in fp16/bf16 with fp32 output, so the cosine head runs in fp32 (as exported)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net.to(dtype=dtype, memory_format=torch.channels_last)
        self.dtype = dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.net(x).float()


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, *, warmup: int, iters: int) -> float:
    """Median wall time of fn() with the device synchronised after each call (runtime.bench's timing core)."""
    def call():
        fn()
        sync(device)

    sync(device)
    return percentiles(time_calls(call, warmup=warmup, iters=iters))["p50"]


def matmul_peaks(device: torch.device, n: int) -> dict[str, float]:
    """TFLOP/s of an n^3 matrix product per precision (random data), measured now."""
    peaks = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)):
        set_tf32(tf32)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = median_seconds(lambda: a @ b, device, warmup=3, iters=10)
        peaks[name] = 2 * n ** 3 / seconds / 1e12
    set_tf32(False)
    return peaks


def flops_per_crop(module: nn.Module, size: int, device: torch.device) -> float:
    """Forward FLOPs per crop (2 x multiply-accumulates), counted by PyTorch's FlopCounterMode."""
    x = torch.rand(2, 1, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() / 2


def deployed_graph(backbone: str, loss: str, device: torch.device) -> InferenceGraph:
    torch.manual_seed(0)
    net = build_model(backbone, loss).eval()
    return InferenceGraph(net, scale=float(getattr(net.head, "scale", 30.0)), probs_source=probs_source_for(loss),
                          with_feature=False).to(device).eval()


def half_graph(graph: InferenceGraph, dtype: torch.dtype) -> InferenceGraph:
    half = copy.deepcopy(graph)
    half.net = HalfBackbone(half.net, dtype)
    return half


@torch.no_grad()
def outputs(graph: nn.Module, images: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, probs) as float64 numpy arrays over `images`, in batches."""
    cos, probs = [], []
    for start in range(0, len(images), batch):
        c, p, _ = graph(images[start:start + batch])
        cos.append(c.double().cpu().numpy())
        probs.append(p.double().cpu().numpy())
    return np.concatenate(cos), np.concatenate(probs)


def compare(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray],
            labels: np.ndarray | None = None) -> dict:
    out = {"max_abs_delta_cosine": float(np.max(np.abs(reference[0] - other[0]))),
           "stage_agreement": float(np.mean(reference[1].argmax(1) == other[1].argmax(1)))}
    if labels is not None:
        out["accuracy_fp32"] = float(np.mean(reference[1].argmax(1) == labels))
        out["accuracy"] = float(np.mean(other[1].argmax(1) == labels))
    return out


def inference(backbone: str, size: int, batch: int, device: torch.device, peaks: dict, iters: int) -> dict:
    graph = deployed_graph(backbone, "amcl", device)
    flops = flops_per_crop(graph, size, device)
    x = torch.rand(batch, 1, size, size, device=device)
    variants = {"fp32": (graph, False), "tf32": (graph, True)}
    if device.type == "cuda":
        variants["fp16"] = (half_graph(graph, torch.float16), False)
    variants["bf16"] = (half_graph(graph, torch.bfloat16), False)
    torch.backends.cudnn.benchmark = True
    rows = {}
    with torch.no_grad():
        for name, (module, tf32) in variants.items():
            set_tf32(tf32)
            seconds = median_seconds(lambda m=module: m(x), device, warmup=5, iters=iters)
            rows[name] = {"batch_ms": seconds * 1e3, "crops_per_s": batch / seconds,
                          "tflops": flops * batch / seconds / 1e12}
            rows[name]["pct_peak"] = 100 * rows[name]["tflops"] / peaks[name] if name in peaks else None
    set_tf32(False)
    for row in rows.values():
        row["speedup_vs_fp32"] = row["crops_per_s"] / rows["fp32"]["crops_per_s"]
    # Numerics on random images, as the export parity table measures ONNX Runtime fp16 / int8.
    images = torch.rand(4 * batch, 1, size, size, device=device)
    reference = outputs(graph, images, batch)
    numerics = {name: compare(reference, outputs(module, images, batch))
                for name, (module, _) in variants.items() if name in ("fp16", "bf16")}
    return {"backbone": backbone, "crop": size, "batch": batch, "gflop_per_crop": flops / 1e9,
            "variants": rows, "numerics_random": numerics}


def training(backbone: str, size: int, batch: int, steps: int, device: torch.device, amp_dtype) -> dict:
    torch.manual_seed(0)
    n = batch * steps
    images = torch.rand(n, 1, size, size, device=device)
    labels = torch.randint(0, 3, (n,), device=device)
    batches = list(torch.arange(n, device=device).split(batch))

    set_tf32(False)
    torch.backends.cudnn.benchmark = False
    bare = build_model(backbone, "amcl").to(device).train()
    bare_opt = torch.optim.Adam(bare.parameters(), lr=5e-5)
    bare_s = median_seconds(lambda: bare_loop(bare, bare_opt, images, labels, batches), device, warmup=1, iters=3)
    del bare, bare_opt

    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train_run sets it on a GPU
    ours = build_model(backbone, "amcl").to(device).train()
    if device.type == "cuda":
        ours = ours.to(memory_format=torch.channels_last)
    step = TrainStep(ours)
    ours_opt = torch.optim.Adam(ours.parameters(), lr=5e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    losses = []

    def run_ours():
        loss_sum, _, seen = train_steps(step, ours_opt, scaler, images, labels, batches, None,
                                        device=device, amp_dtype=amp_dtype)
        losses.append(float(loss_sum) / seen)

    ours_s = median_seconds(run_ours, device, warmup=1, iters=3)
    torch.backends.cudnn.benchmark = False
    return {"backbone": backbone, "crop": size, "batch": batch, "steps": steps,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
            "bare_fp32_crops_per_s": n / bare_s, "liverstage_crops_per_s": n / ours_s,
            "speedup": bare_s / ours_s, "liverstage_losses_finite": bool(np.all(np.isfinite(losses)))}


def trained_numerics(checkpoint: Path, device: torch.device, batch: int) -> dict:
    from liverstage.export.data import phantom_crops  # noqa: PLC0415
    from liverstage.train.checkpoint import load_checkpoint  # noqa: PLC0415

    net, ckpt = load_checkpoint(checkpoint)
    graph = InferenceGraph(net, scale=ckpt.scale, probs_source=probs_source_for(ckpt.loss),
                           with_feature=False).to(device).eval()
    crops = phantom_crops(ckpt.preprocess)
    images = torch.from_numpy(crops.images).to(device)
    set_tf32(False)
    reference = outputs(graph, images, batch)
    result = {"checkpoint": str(checkpoint), "backbone": ckpt.backbone, "loss": ckpt.loss,
              "crops": len(crops), "patients": crops.n_patients, "source": crops.source}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if name == "fp16" and device.type != "cuda":
            continue
        result[name] = compare(reference, outputs(half_graph(graph, dtype), images, batch), crops.labels)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="resnet18,resnet50,vgg16")
    ap.add_argument("--size", type=int, default=224, help="crop side in pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30, help="timed inference batches per variant")
    ap.add_argument("--train-steps", type=int, default=10, help="steps per timed training pass")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained model.pt for numerics on phantom crops")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    args = ap.parse_args(argv)

    if args.smoke:
        device, peak_n = torch.device("cpu"), 256
        args.size, args.batch, args.iters, args.train_steps = 32, 4, 2, 2
    elif torch.cuda.is_available():
        device, peak_n = torch.device("cuda"), 8192
    else:
        print("bench_gpu: no CUDA GPU here (use --smoke to check the script on a CPU)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    amp_dtype = amp_dtype_for(device)  # what `liverstage train` uses on this device
    print(f"device {name}, torch {torch.__version__}, crop {args.size} px, batch {args.batch}, "
          f"{args.iters} timed inference batches, {args.train_steps} training steps per pass")

    results: dict = {"device": name, "torch": torch.__version__, "crop": args.size, "batch": args.batch}
    peaks = matmul_peaks(device, peak_n)
    results["matmul_peak_tflops"] = peaks
    print("matmul peak, TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))

    results["inference"] = []
    print("\ninference, deployed graph (backbone + cosine head), random weights")
    print(f"  {'backbone':<9} {'variant':<5} {'ms/batch':>9} {'crops/s':>9} {'x fp32':>7} {'TFLOP/s':>8} {'% peak':>7}")
    for backbone in args.backbones.split(","):
        row = inference(backbone, args.size, args.batch, device, peaks, args.iters)
        results["inference"].append(row)
        for variant, v in row["variants"].items():
            pct = f"{v['pct_peak']:.0f}" if v["pct_peak"] is not None else "n/a"
            print(f"  {backbone:<9} {variant:<5} {v['batch_ms']:9.2f} {v['crops_per_s']:9.0f} "
                  f"{v['speedup_vs_fp32']:7.2f} {v['tflops']:8.2f} {pct:>7}")
        for variant, n in row["numerics_random"].items():
            print(f"  {backbone:<9} {variant} vs fp32 on random images: max |d cos| {n['max_abs_delta_cosine']:.2e}, "
                  f"stage agreement {100 * n['stage_agreement']:.1f} %")

    results["training"] = []
    print(f"\ntraining step (AMCL head, Adam): bare fp32 loop vs liverstage train_steps "
          f"(channels_last, autocast {amp_dtype})")
    for backbone in args.backbones.split(","):
        row = training(backbone, args.size, args.batch, args.train_steps, device, amp_dtype)
        results["training"].append(row)
        print(f"  {backbone:<9} bare fp32 {row['bare_fp32_crops_per_s']:8.0f} crops/s   liverstage "
              f"{row['liverstage_crops_per_s']:8.0f} crops/s   x{row['speedup']:.2f}   losses finite: "
              f"{row['liverstage_losses_finite']}")

    if args.checkpoint is not None:
        row = trained_numerics(args.checkpoint, device, args.batch)
        results["trained"] = row
        print(f"\ntrained model {row['backbone']}+{row['loss']} on {row['crops']} crops of {row['patients']} "
              f"{row['source']}")
        for variant in ("fp16", "bf16"):
            if variant in row:
                n = row[variant]
                print(f"  {variant} vs fp32: max |d cos| {n['max_abs_delta_cosine']:.2e}, stage agreement "
                      f"{100 * n['stage_agreement']:.1f} %, accuracy {n['accuracy']:.3f} (fp32 {n['accuracy_fp32']:.3f})")

    if args.json is not None:
        write_json(args.json, json_safe(results))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
