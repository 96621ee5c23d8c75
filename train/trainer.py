"""`train_run(RunConfig) -> RUN`: one readable training loop (after torchvision's reference script).

What a run does:
1. Reads the manifest, makes every crop once through the runtime's preprocessing (cached on disk
   per volume, keyed by the PreprocessSpec hash) and keeps them in memory as one tensor.
2. Splits patients 80/20 (stratified by stage, seeded) or takes the imposed test patients;
   `val_fraction` > 0 sets aside validation patients from the training side. The test set is
   never looked at before the end.
3. Trains with Adam (paper defaults: lr 5e-5, 100 epochs, s = 30, m = 0.5); optionally the
   first `warmup_epochs` train the angular head as plain ASM (no margin, no dynamic margin), the
   known remedy when a margin loss does not converge (see losses.AngularMarginLoss on DR-AMCL). Data order and
   augmentation are drawn from a generator that depends only on (seed, epoch), and the global
   torch RNG (dropout) is reseeded from (seed, epoch, rank) every epoch, so a resumed run is
   exactly the run that was never stopped (on CPU; GPU kernels may be non-deterministic).
4. Checkpoints every epoch atomically: RUN/last.pt (model + optimizer + history, for
   --resume) and, with validation, RUN/best.pt when validation improves (accuracy, ties broken
   by the lower validation loss). The final model is the best validation epoch, else the last.
5. Evaluates the final model on the test patients: RUN/model.pt (the contract checkpoint, with
   test metrics), metrics.json, predictions.csv, and history.csv (one row per epoch).

GPU: autocast in bf16 (fp16 + GradScaler where bf16 is missing) with the angular head in fp32
(the head disables autocast itself), channels_last; validation and test run in strict float32
(evaluate.py). Under torchrun (WORLD_SIZE > 1) it trains
with DistributedDataParallel (nccl on GPU, gloo on CPU); each process takes every
world_size-th crop of the epoch's permutation with a per-process batch of `batch_size`.
A final training batch of one crop is dropped (BatchNorm cannot train on a single 1x1 map).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from liverstage.runtime.atomic import write_json, write_text
from liverstage.runtime.errors import InputError, LiverstageError
from liverstage.runtime.jsonsafe import json_safe
from liverstage.runtime.manifest import read_manifest

from .config import RESUME_OPTIONS, RunConfig, default_options
from .checkpoint import Checkpoint, Splits, read_checkpoint, write_checkpoint
from .data import CropData, augment, default_cache_dir, draw_augmentation, epoch_generator, load_crops
from .evaluate import amp_dtype_for, autocast_context, evaluate_data, predictions_csv, resolve_device
from .model import StagingNet, build_model
from .splits import patient_split, split_with_test

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                   "val_kappa_quadratic", "val_patient_accuracy", "seconds", "crops_per_second")


class TrainStep(nn.Module):
    """Trunk + head in one forward, so DistributedDataParallel syncs the head's gradient too."""

    def __init__(self, model: StagingNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model(images)
        return self.model.loss(emb, labels), self.model.class_logits(emb).detach()


@dataclasses.dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owned: bool = False  # we initialised the process group (and destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _init_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist  # noqa: PLC0415

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    owned = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owned = True
    return _Dist(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local, owned=owned)


def _seed_int(*parts: int) -> int:
    return int(epoch_generator(*parts[:2], salt=parts[2] if len(parts) > 2 else 0).initial_seed())


def _history_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                         for k in HISTORY_COLUMNS})
    return buf.getvalue()


def _log_default(line: str) -> None:
    from tqdm.auto import tqdm  # noqa: PLC0415

    tqdm.write(line)


def train_steps(step: nn.Module, optimizer: torch.optim.Optimizer, scaler, images: torch.Tensor,
                labels: torch.Tensor, batches: list[torch.Tensor], aug, *, device: torch.device,
                amp_dtype: torch.dtype | None, bar=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over `batches` (index tensors into the in-memory crops): augment, forward under
    autocast, backward, Adam step. Returns (summed loss, correct count, crops seen), the sums as
    device tensors so that no step waits for the device. Used by train_run and the benchmark."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    for i, idx in enumerate(batches):
        x = images[idx.to(images.device)].to(device, non_blocking=True)
        y = labels[idx.to(labels.device)]
        if aug is not None:
            x = augment(x, aug.take(idx, device))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp_dtype):
            loss, logits = step(x, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum().double()
        seen += len(y)
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or i == len(batches) - 1:
                bar.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.4f}")
    return loss_sum, correct, seen


def _check_resume(saved: dict[str, Any], config: RunConfig, path: Path) -> None:
    """--resume continues only the same run: every option that shapes results must match (epochs may
    grow). An option missing from an older checkpoint had its default then."""
    saved = {**default_options(), **saved}
    now = config.options()
    for key in RESUME_OPTIONS:
        if saved.get(key) != now.get(key):
            raise InputError(f"--resume: {path} was trained with {key}={saved.get(key)!r}, not {now.get(key)!r}")


def train_run(config: RunConfig, *, log: Callable[[str], None] | None = None) -> Path:
    """Train as `config` says; return the RUN directory (config.out)."""
    dist_info = _init_distributed(config.device)
    try:
        return _train(config, dist_info, log or _log_default)
    finally:
        if dist_info.owned:
            torch.distributed.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every step of a run needs: its config, the process group, the device and the log."""

    config: RunConfig
    dist: _Dist
    device: torch.device
    say: Callable[[str], None]  # rank 0 logs; the other ranks stay quiet

    @property
    def last_path(self) -> Path:
        return self.config.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.config.out / "best.pt"

    @property
    def eval_batch_size(self) -> int:
        return max(self.config.batch_size, 64)


def _train(config: RunConfig, dist_info: _Dist, log: Callable[[str], None]) -> Path:
    """The run, step by step (after torchvision's reference script: train_one_epoch, evaluate)."""
    setup = _Setup(config, dist_info, _run_device(config, dist_info), log if dist_info.main else (lambda _line: None))
    _refuse_a_finished_run(config)
    rows = read_manifest(config.manifest)  # before any crop is cut: a bad manifest fails fast
    saved, splits = _resume_or_split(setup, rows)
    crops = _load_data(setup, rows)
    train_data, val_data, test_data = crops.subset(splits.train), crops.subset(splits.val), crops.subset(splits.test)
    setup.say(f"{len(crops)} crops of {len({r.patient_id for r in rows})} patients; train {len(splits.train)} patients / "
              f"{len(train_data)} crops, val {len(splits.val)} / {len(val_data)}, test {len(splits.test)} / "
              f"{len(test_data)}; device {setup.device}" + (f" x{dist_info.world} processes" if dist_info.world > 1 else ""))
    model, optimizer = _model_and_optimizer(setup)
    history: list[dict[str, Any]] = list(saved.history or []) if saved is not None else []
    best: dict[str, Any] | None = saved.best if saved is not None else None
    if saved is not None:
        model.load_state_dict(saved.state_dict)
        optimizer.load_state_dict(saved.optimizer)
    trainer = _Trainer.for_model(setup, model, optimizer, train_data)
    fields = dict(preprocess=config.preprocess, args=config.options(), splits=splits, manifest=config.manifest)
    for epoch in range(saved.epoch if saved is not None else 0, config.epochs):
        t0 = time.perf_counter()
        row, seen = trainer.train_one_epoch(epoch)
        best, improved = _validate(setup, model, val_data, row, best) if dist_info.main and len(val_data) else (best, False)
        row["seconds"] = time.perf_counter() - t0
        row["crops_per_second"] = seen / row["seconds"]
        history.append(row)
        if dist_info.main:
            _save_epoch(setup, model, optimizer, fields, history, best, improved)
        dist_info.barrier()
    ddp_info = _weight_checksums(setup, model)
    if dist_info.main:
        _finish(setup, model, test_data, history, best if len(val_data) else None, fields, ddp_info)
    dist_info.barrier()
    return config.out


def _run_device(config: RunConfig, dist_info: _Dist) -> torch.device:
    device = resolve_device(config.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    return device


def _refuse_a_finished_run(config: RunConfig) -> None:
    run = config.out
    if not config.resume and not config.overwrite and ((run / "last.pt").exists() or (run / "model.pt").exists()):
        raise InputError(f"{run} already holds a run; use --resume to continue it or choose another --out")


def _resume_or_split(setup: _Setup, rows) -> tuple[Checkpoint | None, Splits]:
    """With --resume and a last.pt: that checkpoint and its splits; else a fresh patient split."""
    config = setup.config
    if config.resume and setup.last_path.is_file():
        saved = read_checkpoint(setup.last_path)
        _check_resume(saved.args, config, setup.last_path)
        setup.say(f"resuming {config.out} after epoch {saved.epoch}")
        return saved, saved.splits
    if config.resume:
        setup.say(f"nothing to resume in {config.out}; starting a new run")
    if setup.dist.main:  # a fresh start must not pick up an earlier run's best epoch
        for stale in (setup.last_path, setup.best_path):
            stale.unlink(missing_ok=True)
    stage_of = {r.patient_id: r.stage for r in rows}
    pids, stages = list(stage_of), list(stage_of.values())
    if config.test_patients:
        train_ids, val_ids, test_ids = split_with_test(pids, stages, config.test_patients,
                                                       val_fraction=config.val_fraction, seed=config.seed)
    else:
        train_ids, val_ids, test_ids = patient_split(pids, stages, test_fraction=config.test_fraction,
                                                     val_fraction=config.val_fraction, seed=config.seed)
    return None, Splits.from_mapping({"train": train_ids, "val": val_ids, "test": test_ids})


def _load_data(setup: _Setup, rows) -> CropData:
    """Every crop in memory. Rank 0 fills the cache first, the others then read it; a failure on
    rank 0 still reaches the barrier, so the other ranks meet the same error instead of hanging."""
    config = setup.config
    cache_dir = config.cache_dir if config.cache_dir is not None else default_cache_dir()
    crops: CropData | None = None
    failure: LiverstageError | None = None
    if setup.dist.main:
        try:
            crops = load_crops(rows, config.preprocess, cache_dir=cache_dir, workers=config.workers,
                               progress=config.progress)
        except LiverstageError as exc:
            failure = exc
    setup.dist.barrier()
    if failure is not None:
        raise failure
    if not setup.dist.main:
        crops = load_crops(rows, config.preprocess, cache_dir=cache_dir, workers=0, progress=False)
    assert crops is not None
    return crops


def _model_and_optimizer(setup: _Setup) -> tuple[StagingNet, torch.optim.Optimizer]:
    config, device = setup.config, setup.device
    torch.manual_seed(config.seed)
    model = build_model(config.backbone, config.loss, scale=config.scale, margin=config.margin,
                        pretrained=config.pretrained).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return model, torch.optim.Adam(model.parameters(), lr=config.lr)


@dataclasses.dataclass
class _Trainer:
    """The training side of one run: the step (DDP-wrapped under torchrun), AMP, the training crops."""

    setup: _Setup
    model: StagingNet
    step: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    amp_dtype: torch.dtype | None
    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def for_model(cls, setup: _Setup, model: StagingNet, optimizer: torch.optim.Optimizer,
                  train_data: CropData) -> "_Trainer":
        device = setup.device
        step: nn.Module = TrainStep(model)
        if setup.dist.world > 1:
            step = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        amp_dtype = amp_dtype_for(device)
        images = torch.from_numpy(train_data.images)
        if device.type == "cuda" and images.numel() * 4 < 4 << 30:
            images = images.to(device)  # whole training set on the GPU: no per-batch copies
        return cls(setup, model, step, optimizer, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
                   amp_dtype, images, torch.from_numpy(train_data.labels).to(device))

    def batches(self, epoch: int) -> tuple[list[torch.Tensor], Any]:
        """This process's batches (index tensors) and the augmentation of epoch `epoch`: a function
        of (seed, epoch) only, so a resumed run sees the same data order."""
        config, dist = self.setup.config, self.setup.dist
        n_train = len(self.labels)
        torch.manual_seed(_seed_int(config.seed, epoch, 1 + dist.rank))  # dropout
        gen = epoch_generator(config.seed, epoch)
        order = torch.randperm(n_train, generator=gen)
        aug = draw_augmentation(n_train, gen)
        if dist.world > 1:
            pad = (-n_train) % dist.world
            order = torch.cat([order, order[:pad]])[dist.rank::dist.world]
        return [b for b in order.split(config.batch_size) if len(b) > 1], aug

    def train_one_epoch(self, epoch: int) -> tuple[dict[str, Any], float]:
        """One pass over the training crops: the history row (epoch, train loss and accuracy over all
        processes) and the number of crops seen."""
        config, device = self.setup.config, self.setup.device
        batches, aug = self.batches(epoch)
        self.model.train()
        angular = hasattr(self.model.head, "warmup")
        if angular:  # plain ASM for the first warmup_epochs
            self.model.head.warmup = epoch < config.warmup_epochs
        bar = None
        if self.setup.dist.main and config.progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False)
        try:
            loss_sum, correct, seen = train_steps(self.step, self.optimizer, self.scaler, self.images, self.labels,
                                                  batches, aug, device=device, amp_dtype=self.amp_dtype, bar=bar)
        finally:
            if bar is not None:
                bar.close()
        if angular:
            self.model.head.warmup = False  # validation loss is always the configured loss
        totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device, dtype=torch.float64)])
        if self.setup.dist.world > 1:
            torch.distributed.all_reduce(totals)
        train_loss = float(totals[0] / totals[2].clamp(min=1))
        if not math.isfinite(train_loss):
            raise RuntimeError(f"training loss became {train_loss} at epoch {epoch + 1}")
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": float(totals[1] / totals[2].clamp(min=1))}
        return row, totals[2].item()


def _validate(setup: _Setup, model: StagingNet, val_data: CropData, row: dict[str, Any],
              best: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    """Validation figures into `row`; the best epoch so far (accuracy, ties broken by the lower
    loss) and whether this epoch is it."""
    metrics, _ = evaluate_data(model, val_data, batch_size=setup.eval_batch_size, device=setup.device)
    row.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"],
               val_kappa_quadratic=metrics["kappa_quadratic"], val_patient_accuracy=metrics["patient_accuracy"])
    if best is None or (metrics["accuracy"], -metrics["loss"]) > (best["val_accuracy"], -best["val_loss"]):
        return {"epoch": row["epoch"], "val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"]}, True
    return best, False


def _save_epoch(setup: _Setup, model: StagingNet, optimizer: torch.optim.Optimizer, fields: dict[str, Any],
                history: list[dict[str, Any]], best: dict[str, Any] | None, improved: bool) -> None:
    """best.pt (when validation improved), last.pt, history.csv, and the epoch's log line."""
    row = history[-1]
    epoch = row["epoch"]
    if improved:
        write_checkpoint(setup.best_path, Checkpoint.of_model(model, epoch=epoch, **fields))
    write_checkpoint(setup.last_path, Checkpoint.of_model(model, epoch=epoch, **fields, optimizer=optimizer.state_dict(),
                                                          history=tuple(history), best=best))
    write_text(setup.config.out / "history.csv", _history_csv(history))
    parts = [f"epoch {epoch}/{setup.config.epochs}", f"loss {row['train_loss']:.4f}", f"acc {row['train_accuracy']:.3f}"]
    if "val_accuracy" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.3f}"]
    parts += [f"{row['seconds']:.1f}s", f"{row['crops_per_second']:.1f} crops/s"]
    setup.say("  ".join(parts))


def _weight_checksums(setup: _Setup, model: StagingNet) -> dict[str, Any]:
    """Under DDP, a checksum of every rank's weights (they must agree)."""
    ddp_info: dict[str, Any] = {"world_size": setup.dist.world}
    if setup.dist.world > 1:
        with torch.no_grad():
            checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(setup.dist.world)]
        torch.distributed.all_gather(gathered, checksum)
        ddp_info["param_checksums"] = [float(t.item()) for t in gathered]
    return ddp_info


def _finish(setup: _Setup, model: StagingNet, test_data: CropData, history: list[dict[str, Any]],
            best: dict[str, Any] | None, fields: dict[str, Any], ddp_info: dict[str, Any]) -> None:
    """The final model (best validation epoch, else the last) on the test patients: predictions.csv,
    metrics.json and model.pt (rank 0 only)."""
    run = setup.config.out
    chosen = len(history)
    if best is not None and setup.best_path.is_file():
        model.load_state_dict(read_checkpoint(setup.best_path).state_dict)
        chosen = int(best["epoch"])
        setup.say(f"selected epoch {chosen} on validation patients (accuracy {best['val_accuracy']:.3f})")
    metrics, raw = evaluate_data(model, test_data, batch_size=setup.eval_batch_size, device=setup.device)
    metrics["epoch"] = chosen
    metrics = json_safe(metrics)
    write_text(run / "predictions.csv", predictions_csv(test_data, raw["probs"], raw["cosine"]))
    write_json(run / "metrics.json", metrics)
    write_checkpoint(run / "model.pt", Checkpoint.of_model(model, epoch=chosen, metrics=metrics, **fields,
                                                            distributed=ddp_info))
    ci = metrics["accuracy_ci95"]
    ci_text = f" (95% CI {ci['low']:.2f}-{ci['high']:.2f})" if ci["low"] is not None else ""
    setup.say(f"test: accuracy {metrics['accuracy']:.4f}{ci_text}  kappa {_fmt(metrics['kappa_quadratic'])}  "
              f"patient accuracy {metrics['patient_accuracy']:.4f}  MR A->C {_fmt(metrics['mr_a_to_c'])}  "
              f"MR C->A {_fmt(metrics['mr_c_to_a'])}  -> {run / 'model.pt'}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
