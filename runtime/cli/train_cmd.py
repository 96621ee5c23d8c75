"""`liverstage train`: train a staging network (softmax / ASM / AMCL / DR-AMCL) on a manifest.

torch is imported inside the command body only (the runtime must work without it). Under
`torchrun --nproc_per_node N` the same command (or `python -m liverstage.train`) trains with
DistributedDataParallel.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class LossName(str, Enum):
    softmax = "softmax"
    asm = "asm"
    amcl = "amcl"
    dr_amcl = "dr-amcl"


class DeviceName(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        manifest: Path = typer.Option(..., "--manifest", help="CSV: patient_id,image,mask,stage."),
        out: Path = typer.Option(..., "--out", help="Run folder: model.pt, history.csv, metrics.json, predictions.csv."),
        backbone: str = typer.Option("resnet18", "--backbone", help="vgg16, resnet18, resnet50 (or any torchvision classification model)."),
        loss: LossName = typer.Option(LossName.amcl, "--loss", help="softmax (Eq. 1), asm (Eq. 2), amcl (Eq. 3), dr-amcl (Eq. 5)."),
        scale: float = typer.Option(30.0, "--scale", help="s: radius of the normalised embedding (angular losses)."),
        margin: float = typer.Option(0.5, "--margin", help="m: additive angular margin in radians (amcl, dr-amcl)."),
        epochs: int = typer.Option(100, "--epochs", help="Training epochs (paper: 100)."),
        lr: float = typer.Option(5e-5, "--lr", help="Adam learning rate (paper: 5e-5)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Crops per step (per process under torchrun)."),
        crop_size: int = typer.Option(224, "--crop-size", help="Side of the square crop in pixels."),
        seed: int = typer.Option(0, "--seed", help="Seeds the split, initialisation, data order and augmentation."),
        device: DeviceName = typer.Option(DeviceName.auto, "--device", help="auto, cpu or cuda."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last epoch."),
        val_fraction: float = typer.Option(0.0, "--val-fraction", help="Share of patients held out of training to pick the best epoch (0: last epoch)."),
        warmup_epochs: int = typer.Option(0, "--warmup-epochs", help="First N epochs train the angular head without margin (ASM): helps AMCL/DR-AMCL converge (0: paper protocol)."),
        test_patients: Optional[Path] = typer.Option(None, "--test-patients", help="File with the test patient ids, one per line (else an 80/20 split)."),
        pretrained: Optional[Path] = typer.Option(None, "--pretrained", help="Local torchvision ImageNet state_dict for the backbone (never downloaded)."),
        workers: int = typer.Option(0, "--workers", help="Processes that cut volume crops on the first pass."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Crop cache (default $LIVERSTAGE_CACHE or ~/.cache/liverstage/crops)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh even if --out holds a run."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """Train a fibrosis staging model (80/20 patient split; test metrics at the end)."""
        from liverstage.train.evaluate import read_patient_list  # noqa: PLC0415
        from liverstage.train.trainer import TrainConfig, train_run  # noqa: PLC0415

        config = TrainConfig(
            manifest=manifest, out=out, backbone=backbone, loss=loss.value, scale=scale, margin=margin,
            epochs=epochs, lr=lr, batch_size=batch_size, crop_size=crop_size, seed=seed, device=device.value,
            resume=resume, val_fraction=val_fraction, warmup_epochs=warmup_epochs,
            test_patients=read_patient_list(test_patients) if test_patients is not None else None,
            pretrained=pretrained, workers=workers, cache_dir=cache_dir, progress=progress, overwrite=overwrite,
        )
        train_run(config)
