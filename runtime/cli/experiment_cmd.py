"""`liverstage experiment`: the paper's protocol (repeated patient-level splits) in one command.

    liverstage experiment --manifest M --backbones vgg16,resnet18,resnet50 --losses softmax,amcl,dr-amcl
        --margins 0.5 --runs 6 --epochs 100 --out EXP [train options]

Train options left out keep `liverstage train`'s defaults; `--train-option KEY=VALUE` passes any
other trainer option. torch is imported inside the command body only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from ..errors import InputError
from .plot_cmd import parse_floats


def _names(text: str, *, option: str) -> list[str]:
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not items:
        raise InputError(f"{option} needs at least one name, got {text!r}")
    return items


def _coerce(value: str, default, key: str, annotation: str = ""):
    """Convert a --train-option string to the type of the trainer field (its default, or a Path)."""
    text = value.strip()
    if "Path" in annotation:
        return None if text.lower() in {"none", ""} else Path(text)
    if isinstance(default, bool):
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off"}:
            return False
        raise InputError(f"--train-option {key}: {value!r} is not true/false")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise InputError(f"--train-option {key}: {value!r} is not a {type(default).__name__}") from None
    if default is None and text.lower() in {"none", ""}:
        return None
    return text


def parse_train_options(items: list[str]) -> dict:
    """['epochs=3', 'lr=1e-4'] -> typed dict, checked against the trainer's TrainConfig fields."""
    from liverstage.train.trainer import TrainConfig  # noqa: PLC0415

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"--train-option expects KEY=VALUE, got {item!r}")
        if key not in fields:
            raise InputError(f"--train-option: unknown trainer option {key!r} "
                             f"(known: {', '.join(sorted(fields))})")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        out[key] = _coerce(value, default, key, str(f.type))
    return out


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    def experiment_command(
        manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV (patient_id, image, mask, stage)."),
        out: Path = typer.Option(..., "--out", help="Experiment folder (tables, results.json, runs/)."),
        backbones: str = typer.Option("vgg16,resnet18,resnet50", "--backbones", help="Comma-separated backbones."),
        losses: str = typer.Option("softmax,amcl,dr-amcl", "--losses",
                                   help="Comma-separated losses: softmax, asm, amcl, dr-amcl."),
        margins: str = typer.Option("0.5", "--margins",
                                    help="Comma-separated margins m for amcl / dr-amcl (several: Table 3)."),
        runs: int = typer.Option(6, "--runs", min=1, help="Number of random patient-level 80/20 splits."),
        seed: int = typer.Option(0, "--seed", help="Run r uses seed + r for its split and its training."),
        test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of patients tested per run."),
        note: str = typer.Option("", "--note", help="Shown in table and figure titles, e.g. 'phantoms'."),
        epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs per training (paper: 100)."),
        lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (paper: 5e-5)."),
        batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Batch size."),
        crop_size: int | None = typer.Option(None, "--crop-size", min=8, help="Crop size in pixels."),
        scale: float | None = typer.Option(None, "--scale", help="Scale s of the angular heads (paper: 30)."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
        val_fraction: float | None = typer.Option(None, "--val-fraction",
                                                  help="Share of training patients for model selection."),
        pretrained: Path | None = typer.Option(None, "--pretrained",
                                               help="Local torchvision ImageNet state_dict (one backbone only)."),
        warmup_epochs: int | None = typer.Option(None, "--warmup-epochs", min=0,
                                                 help="Epochs of ASM warm-up for the angular losses (softmax: none)."),
        workers: int | None = typer.Option(None, "--workers", min=0, help="Processes cutting volume crops."),
        cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Crop cache folder (trainer default)."),
        train_option: list[str] = typer.Option([], "--train-option",
                                               help="Any other trainer option as KEY=VALUE (repeatable)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        """Train every run x backbone x loss x margin (resumable) and write Tables 1-5 and figures."""
        if not manifest.is_file():
            raise InputError(f"manifest not found: {manifest}")
        if lr is not None and not lr > 0:
            raise InputError(f"--lr must be positive, got {lr}")
        if scale is not None and not scale > 0:
            raise InputError(f"--scale must be positive, got {scale}")
        if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
            raise InputError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
        if pretrained is not None and not pretrained.is_file():
            raise InputError(f"--pretrained file not found: {pretrained}")
        backbone_list = _names(backbones, option="--backbones")
        loss_list = _names(losses, option="--losses")
        margin_list = parse_floats(margins, option="--margins")
        if pretrained is not None and len(backbone_list) > 1:
            raise InputError("--pretrained holds one backbone's weights; give a single --backbones name with it")

        from liverstage.train.experiment import ExperimentConfig, run_experiment  # noqa: PLC0415

        options = parse_train_options(train_option)
        given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "crop_size": crop_size, "scale": scale,
                 "device": device, "val_fraction": val_fraction, "pretrained": pretrained, "workers": workers, "warmup_epochs": warmup_epochs,
                 "cache_dir": cache_dir, "progress": progress}
        options.update({k: v for k, v in given.items() if v is not None})
        try:
            from liverstage.train.backbones import available_backbones  # noqa: PLC0415

            known = set(available_backbones())
            bad = [b for b in backbone_list if b not in known]
            if bad:
                raise InputError(f"--backbones: unknown backbone {', '.join(bad)}")
        except ImportError:  # pragma: no cover - the registry is part of the train extra
            pass
        config = ExperimentConfig(manifest=manifest, out=out, backbones=backbone_list, losses=loss_list,
                                  margins=margin_list, runs=runs, seed=seed, test_fraction=test_fraction,
                                  note=note, train_options=options)
        summary = run_experiment(config, progress=progress)
        typer.echo(f"{summary['trained']} trained, {summary['skipped']} skipped; wrote "
                   f"{', '.join(f for f in summary['files'] if f.endswith('.md'))}, results.json in {out}")
