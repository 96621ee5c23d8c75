"""`liverstage experiment`: the paper's protocol (repeated patient-level splits) in one command.

    liverstage experiment --manifest M --backbones vgg16,resnet18,resnet50 --losses softmax,amcl,dr-amcl
        --margins 0.5 --runs 6 --epochs 100 --out EXP [train options]

Its train options are generated from liverstage.train.config.RunConfig, less those the experiment
sets per run; left out, they keep `liverstage train`'s defaults. `--train-option KEY=VALUE` is
parsed against RunConfig too. torch is imported inside the command body only.
"""

from __future__ import annotations

from pathlib import Path

import typer

from liverstage.train.config import PER_RUN_OPTIONS, RunConfig, default_options

from ..errors import InputError
from .crops_cmd import SPEC_FILE_HELP, spec_from_file
from .options import dataclass_options, parse_value, with_options
from .plot_cmd import parse_floats

DEFAULTS = default_options()


def _names(text: str, *, option: str) -> list[str]:
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not items:
        raise InputError(f"{option} needs at least one name, got {text!r}")
    return items


def parse_train_options(items: list[str]) -> dict:
    """['epochs=3', 'lr=1e-4'] -> typed dict, each value converted to its RunConfig option's type."""
    known = {o.name: o for o in dataclass_options(RunConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"--train-option expects KEY=VALUE, got {item!r}")
        if key not in known:
            raise InputError(f"--train-option: unknown trainer option {key!r} (known: {', '.join(sorted(known))})")
        out[key] = parse_value(known[key], value, what=f"--train-option {key}")
    return out


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    @with_options(dataclass_options(RunConfig, optional=True, exclude=tuple(PER_RUN_OPTIONS)))
    def experiment_command(
        manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV (patient_id, image, mask, stage)."),
        out: Path = typer.Option(..., "--out", help="Experiment folder (tables, results.json, runs/)."),
        backbones: str = typer.Option("vgg16,resnet18,resnet50", "--backbones", help="Comma-separated backbones."),
        losses: str = typer.Option("softmax,amcl,dr-amcl", "--losses",
                                   help="Comma-separated losses: softmax, asm, amcl, dr-amcl."),
        margins: str = typer.Option("0.5", "--margins",
                                    help="Comma-separated margins m for amcl / dr-amcl (several: Table 3)."),
        runs: int = typer.Option(6, "--runs", min=1, help="Number of random patient-level 80/20 splits."),
        seed: int = typer.Option(DEFAULTS["seed"], "--seed", help="Run r uses seed + r for its split and its training."),
        test_fraction: float = typer.Option(DEFAULTS["test_fraction"], "--test-fraction",
                                            help="Share of patients tested per run."),
        note: str = typer.Option("", "--note", help="Shown in table and figure titles, e.g. 'phantoms'."),
        spec_file: Path | None = typer.Option(None, "--spec", help=SPEC_FILE_HELP),
        train_option: list[str] = typer.Option([], "--train-option",
                                               help="Any train option as KEY=VALUE (repeatable; the options above win)."),
        *,
        options: dict,
    ) -> None:
        """Train every run x backbone x loss x margin (resumable) and write Tables 1-5 and figures.

        Train options left out keep `liverstage train`'s defaults.
        """
        if not manifest.is_file():
            raise InputError(f"manifest not found: {manifest}")
        backbone_list = _names(backbones, option="--backbones")
        loss_list = _names(losses, option="--losses")
        margin_list = parse_floats(margins, option="--margins")
        if options.get("pretrained") is not None and len(backbone_list) > 1:
            raise InputError("--pretrained holds one backbone's weights; give a single --backbones name with it")

        from liverstage.train.experiment import ExperimentConfig, run_experiment  # noqa: PLC0415

        train_options = {}
        if spec_file is not None:
            train_options.update({k: v for k, v in spec_from_file(spec_file).to_dict().items() if k != "version"})
        train_options.update(parse_train_options(train_option))
        train_options.update(options)
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
                                  note=note, train_options=train_options)
        summary = run_experiment(config, progress=train_options.get("progress", DEFAULTS["progress"]))
        typer.echo(f"{summary['trained']} trained, {summary['skipped']} skipped; wrote "
                   f"{', '.join(f for f in summary['files'] if f.endswith('.md'))}, results.json in {out}")
