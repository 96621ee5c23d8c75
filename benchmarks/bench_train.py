"""Training speed: liverstage's training step and pipeline against a bare PyTorch loop, measured in one run.

Prints three things, each as a ratio against a reference measured in the same process:
1. step overhead: liverstage's `train_steps` (TrainStep + autocast context + GradScaler +
   accounting; with and without its augmentation) vs a bare loop (model(x) -> head loss ->
   backward -> Adam) over the same in-memory crops, backbone and batch. Target: <= 5 % overhead
   (for the step without augmentation, which is extra work the bare loop does not do).
2. pipeline: crops/s of a whole `train_run` epoch after the first (manifest -> cached crops in
   memory -> augment -> step, plus the per-epoch checkpoint) vs the bare loop over the same number
   of in-memory crops. Target: >= 95 %.
3. crops/s of a training step (and of inference) per backbone and crop size on this machine.

Rounds of the compared loops are interleaved and the best round of each is compared (timeit's
rule), so a noisy shared machine affects both sides alike. Example (CPU, ~10 min on 2 shared cores):
    python benchmarks/bench_train.py --sizes 224,64 --backbones resnet18,resnet50,vgg16
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from liverstage.train.data import draw_augmentation, epoch_generator
from liverstage.train.model import build_model
from liverstage.runtime.atomic import write_json
from liverstage.runtime.jsonsafe import json_safe
from liverstage.runtime.spec import PreprocessSpec
from liverstage.train.checkpoint import read_checkpoint
from liverstage.train.config import RunConfig
from liverstage.train.trainer import TrainStep, train_run, train_steps


def bare_loop(model, optimizer, images, labels, batches) -> None:
    """The reference: what anyone would write by hand."""
    for idx in batches:
        x, y = images[idx], labels[idx]
        loss = model.loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _setup(backbone, loss, size, n, seed=0):
    torch.manual_seed(seed)
    model = build_model(backbone, loss)
    images = torch.rand(n, 1, size, size)
    labels = torch.randint(0, 3, (n,))
    return model, images, labels


def step_overhead(backbone: str, loss: str, size: int, batch: int, steps: int, rounds: int) -> dict:
    n = batch * steps
    model, images, labels = _setup(backbone, loss, size, n)
    ours_model = copy.deepcopy(model)
    bare_opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    ours_opt = torch.optim.Adam(ours_model.parameters(), lr=5e-5)
    step = TrainStep(ours_model)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batches = list(torch.arange(n).split(batch))
    aug = draw_augmentation(n, epoch_generator(0, 0))
    device = torch.device("cpu")
    model.train()
    ours_model.train()

    def run_bare():
        bare_loop(model, bare_opt, images, labels, batches)

    def run_ours(with_aug):
        def go():
            loss_sum, _, _ = train_steps(step, ours_opt, scaler, images, labels, batches, aug if with_aug else None,
                                         device=device, amp_dtype=None)
            float(loss_sum)
        return go

    fns = {"bare": run_bare, "ours": run_ours(False), "ours+aug": run_ours(True)}
    for fn in fns.values():  # warm-up (allocator, oneDNN primitives, Adam state)
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    # Best round of each (timeit's rule): on a shared machine the minimum is the least disturbed.
    med = {k: min(v) for k, v in times.items()}
    return {
        "backbone": backbone, "loss": loss, "crop": size, "batch": batch, "steps": steps,
        "bare_s_per_step": med["bare"] / steps, "ours_s_per_step": med["ours"] / steps,
        "ours_aug_s_per_step": med["ours+aug"] / steps,
        "overhead": med["ours"] / med["bare"] - 1.0, "overhead_with_aug": med["ours+aug"] / med["bare"] - 1.0,
    }


def pipeline_ratio(backbone: str, loss: str, size: int, batch: int, epochs: int, patients: int,
                   in_plane: int, slices: int, workdir: Path) -> dict:
    from liverstage.phantoms.synth import synth_cohort  # noqa: PLC0415

    manifest = synth_cohort(workdir / "phantoms", patients=patients, seed=0, in_plane=in_plane, slices=slices)
    cfg = RunConfig(manifest=manifest, out=workdir / "run", backbone=backbone, loss=loss, epochs=epochs,
                    batch_size=batch, preprocess=PreprocessSpec(crop_size=size), cache_dir=workdir / "cache",
                    progress=False, overwrite=True)
    train_run(cfg, log=lambda _l: None)
    later = [r for r in read_checkpoint(workdir / "run" / "last.pt").history if r["epoch"] >= 2]
    n_train = round(later[0]["crops_per_second"] * later[0]["seconds"])
    pipeline_cps = max(r["crops_per_second"] for r in later)  # best epoch, as for the reference
    # Reference: the bare loop over the same number of in-memory crops (same backbone, batch, size).
    model, images, labels = _setup(backbone, loss, size, n_train)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    batches = [b for b in torch.randperm(n_train).split(batch) if len(b) > 1]
    model.train()
    bare_loop(model, opt, images, labels, batches)  # warm-up epoch
    ref = []
    for _ in range(max(1, len(later))):
        t0 = time.perf_counter()
        bare_loop(model, opt, images, labels, batches)
        ref.append(n_train / (time.perf_counter() - t0))
    bare_cps = max(ref)
    return {"backbone": backbone, "crop": size, "batch": batch, "train_crops": n_train, "epochs_timed": len(later),
            "pipeline_crops_per_s": pipeline_cps, "in_memory_crops_per_s": bare_cps,
            "ratio": pipeline_cps / bare_cps}


def throughput(backbone: str, size: int, batch: int, steps: int) -> dict:
    model, images, labels = _setup(backbone, "amcl", size, batch * steps)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    batches = list(torch.arange(batch * steps).split(batch))
    model.train()
    bare_loop(model, opt, images, labels, batches[:1])  # warm-up
    t0 = time.perf_counter()
    bare_loop(model, opt, images, labels, batches)
    train_cps = batch * steps / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model(images[:batch])
        t0 = time.perf_counter()
        for idx in batches:
            model.class_logits(model(images[idx]))
        infer_cps = batch * steps / (time.perf_counter() - t0)
    return {"backbone": backbone, "crop": size, "batch": batch, "train_crops_per_s": train_cps,
            "inference_crops_per_s": infer_cps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="resnet18,resnet50,vgg16")
    ap.add_argument("--sizes", default="224,64", help="crop sizes for the crops/s table")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed round / throughput run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the overhead comparison")
    ap.add_argument("--overhead-crop", type=int, default=64)
    ap.add_argument("--overhead-backbone", default="resnet18")
    ap.add_argument("--pipeline-crop", type=int, default=64)
    ap.add_argument("--patients", type=int, default=15)
    ap.add_argument("--in-plane", type=int, default=96)
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: overhead,pipeline,throughput")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    if "overhead" not in skip:
        r = step_overhead(args.overhead_backbone, "dr-amcl", args.overhead_crop, args.batch, args.steps, args.rounds)
        results["overhead"] = r
        print(f"[1] step overhead ({r['backbone']}, DR-AMCL, crop {r['crop']}, batch {r['batch']}): bare "
              f"{r['bare_s_per_step'] * 1e3:.1f} ms/step, liverstage {r['ours_s_per_step'] * 1e3:.1f} ms "
              f"(overhead {r['overhead'] * 100:+.1f} %, target <= 5 %), with augmentation "
              f"{r['ours_aug_s_per_step'] * 1e3:.1f} ms ({r['overhead_with_aug'] * 100:+.1f} %)", flush=True)

    if "pipeline" not in skip:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            r = pipeline_ratio(args.overhead_backbone, "dr-amcl", args.pipeline_crop, args.batch, args.epochs,
                               args.patients, args.in_plane, args.slices, Path(tmp))
        results["pipeline"] = r
        print(f"[2] pipeline after epoch 1 ({r['backbone']}, crop {r['crop']}, {r['train_crops']} training crops, "
              f"{r['epochs_timed']} epochs): {r['pipeline_crops_per_s']:.1f} crops/s vs in-memory bare loop "
              f"{r['in_memory_crops_per_s']:.1f} crops/s = {r['ratio'] * 100:.1f} % (target >= 95 %)", flush=True)

    if "throughput" not in skip:
        rows = []
        for size in [int(s) for s in args.sizes.split(",")]:
            for name in args.backbones.split(","):
                steps = args.steps if size <= 96 else max(1, args.steps // 2)
                r = throughput(name, size, args.batch, steps)
                rows.append(r)
                print(f"[3] {name:>9} crop {size:>3}: train {r['train_crops_per_s']:8.1f} crops/s, "
                      f"inference {r['inference_crops_per_s']:8.1f} crops/s (batch {args.batch})", flush=True)
        results["throughput"] = rows

    if args.json is not None:
        write_json(args.json, json_safe(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
