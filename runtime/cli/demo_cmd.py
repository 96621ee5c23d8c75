"""`liverstage demo`: the whole path on synthetic phantoms, offline, in a few minutes on a CPU.

The demo runs the same commands a user would type (each step prints its command line first), so
the demo doubles as a worked example: phantoms -> train ResNet18 + AMCL -> test metrics ->
ONNX fp32 and int8 -> stage a held-out phantom volume -> a short benchmark. The settings are
small so that it finishes in about 90 seconds on two CPU cores; they are not the paper's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from liverstage.train.config import RunConfig, check_options

from ..errors import InputError
from .options import dataclass_options, with_options

PHANTOM_NOTE = "(synthetic phantoms, not patients: these figures say nothing about real MRI)"
MARKER = ".liverstage-demo"


def _run_step(title: str, argv: list[str]) -> float:
    """Run one `liverstage ...` command in this process, as a user would type it."""
    from . import app  # noqa: PLC0415

    typer.secho(f"\n== {title}", bold=True)
    typer.echo("$ liverstage " + " ".join(argv))
    start = time.perf_counter()
    try:
        app(args=argv, prog_name="liverstage", standalone_mode=False)
    except SystemExit as exc:  # a command that exits on its own (e.g. typer.Exit)
        if exc.code not in (0, None):
            raise
    return time.perf_counter() - start


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise InputError(f"--out {out} exists, is not empty and is not an earlier demo folder; pick another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by liverstage demo; safe to delete\n", encoding="utf-8")


def _held_out_patient(run_dir: Path, manifest: Path) -> tuple[Path, Path, str, str]:
    """The first test patient of the run: its volume, mask, id and true stage."""
    import csv  # noqa: PLC0415

    from liverstage.train.checkpoint import read_checkpoint  # noqa: PLC0415

    test_ids = read_checkpoint(run_dir / "model.pt").splits.test
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = {row["patient_id"]: row for row in csv.DictReader(fh)}
    row = rows[sorted(test_ids)[0]]
    return manifest.parent / row["image"], manifest.parent / row["mask"], row["patient_id"], row["stage"]


def _demo_options():
    """The demo's training options: RunConfig's (same names and checks), with the demo's defaults."""
    by_name = {o.name: o for o in dataclass_options(RunConfig)}
    return [
        by_name["epochs"].replace(default=12, help="Training epochs (the paper trains 100 at lr 5e-5; the demo "
                                                   "uses few epochs at a larger lr)."),
        by_name["crop_size"].replace(default=64, help="Crop side in pixels (the paper's networks take 224)."),
    ]


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @with_options(_demo_options())
    def demo_command(
        out: Path = typer.Option(Path("liverstage-demo"), "--out", "-o", help="Folder for everything the demo writes (replaced if it is an earlier demo folder)."),
        patients: int = typer.Option(60, min=12, help="Phantom patients to generate."),
        *,
        options: dict,
    ) -> None:
        """Run the whole path on synthetic phantoms in a few minutes on a CPU: generate, train ResNet18+AMCL, evaluate, export ONNX fp32/int8, stage a held-out volume, benchmark."""
        checked = check_options(options)  # before any phantom is drawn
        epochs, crop_size = checked["epochs"], checked["crop_size"]
        import json  # noqa: PLC0415

        try:
            import torch  # noqa: F401, PLC0415
        except ImportError:
            raise InputError("the demo trains a model and needs the train extra: pip install 'liverstage[train,cpu]'") from None

        total_start = time.perf_counter()
        _prepare_out(out)
        phantoms = out / "phantoms"
        run_dir = out / "run"
        model = out / "model.onnx"
        typer.secho(f"liverstage demo: everything goes to {out}/ {PHANTOM_NOTE}", bold=True)

        _run_step("1/6 generate phantoms", ["synth", str(phantoms), "--patients", str(patients), "--seed", "0",
                                             "--in-plane", "160", "--slices", "32", "--quiet"])
        manifest = phantoms / "manifest.csv"
        _run_step("2/6 train ResNet18 with AMCL (s=30, m=0.5; first epochs without margin) on an 80/20 patient split",
                  ["train", "--manifest", str(manifest), "--backbone", "resnet18", "--loss", "amcl",
                   "--epochs", str(epochs), "--warmup-epochs", str(min(2, epochs - 1)), "--lr", "1e-3", "--batch-size", "32", "--crop-size", str(crop_size),
                   "--seed", "0", "--out", str(run_dir), "--no-progress"])
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        typer.secho("\n== 3/6 test metrics (paper's protocol, held-out patients) " + PHANTOM_NOTE, bold=True)
        for key, label in (("accuracy", "accuracy"), ("f1_A", "F-score A"), ("f1_B", "F-score B"),
                           ("f1_C", "F-score C"), ("mr_a_to_c", "mis-staging A->C"), ("mr_c_to_a", "mis-staging C->A"),
                           ("kappa_quadratic", "quadratic kappa"), ("patient_accuracy", "patient-level accuracy")):
            if key in metrics and metrics[key] is not None:
                interval = metrics.get(f"{key}_ci95") or {}
                spread = (f"  (95 % CI over test patients {interval['low']:.2f}-{interval['high']:.2f})"
                          if interval.get("low") is not None else "")
                typer.echo(f"  {label:<24} {float(metrics[key]):.3f}{spread}")
        typer.echo(f"  per-crop predictions: {run_dir / 'predictions.csv'}")

        _run_step("4/6 export ONNX fp32 (margin head stripped to cosine logits) and int8 for CPUs",
                  ["export", str(run_dir / "model.pt"), "--engine", "onnx", "--precision", "fp32", "--out", str(model)])
        _run_step("4/6 (int8)", ["export", str(run_dir / "model.pt"), "--engine", "onnx", "--precision", "int8",
                                 "--out", str(out / "model.int8.onnx")])

        volume, mask, patient_id, stage = _held_out_patient(run_dir, manifest)
        typer.echo(f"\nheld-out phantom {patient_id}: true stage {stage}")
        _run_step("5/6 stage the held-out volume with the torch-free runtime",
                  ["predict", str(volume), "--model", str(model), "--mask", str(mask),
                   "--report", str(out / "report.json"), "--png", str(out / "summary.png")])

        _run_step("6/6 benchmark: ONNX Runtime fp32 and int8 against PyTorch eager, same run",
                  ["bench", "--model", str(model), "--batch-sizes", "1,16", "--backends", "onnx,onnx-int8,torch",
                   "--warmup", "2", "--iters", "5", "--json", str(out / "bench.json")])

        typer.secho(f"\ndemo finished in {time.perf_counter() - total_start:.0f} s {PHANTOM_NOTE}", bold=True)
        for what, path in (("phantoms + manifest", manifest), ("trained model", run_dir / "model.pt"),
                           ("test metrics", run_dir / "metrics.json"), ("ONNX fp32", model),
                           ("ONNX int8", out / "model.int8.onnx"), ("model card", out / "MODEL_CARD.md"),
                           ("report", out / "report.json"), ("picture", out / "summary.png"),
                           ("benchmark", out / "bench.json")):
            typer.echo(f"  {what:<22} {path}{'' if path.exists() else '  (missing)'}")
