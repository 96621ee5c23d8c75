"""The paper's protocol in one call: repeated patient-level splits x backbones x losses x margins.

Layout of an experiment folder EXP:

    EXP/experiment.json                 settings (checked on restart: same settings or refuse)
    EXP/runs/<r>/split.json             run r's seed and train / test patient ids
    EXP/runs/<r>/test_patients.txt      the same test ids, one per line (for `train --test-patients`)
    EXP/runs/<r>/<backbone>-<loss>[-m<margin>]/   one `liverstage train` run directory
        model.pt, history.csv, metrics.json, predictions.csv, confusion.png, curves.png, angles.png
    EXP/table1..5.md/.csv, EXP/summary.md (settings + all tables), EXP/results.json, EXP/accuracy.png

Protocol:
- Run r uses seed `seed + r` for its split (80/20 by patient, stratified by stage, from
  train.splits.patient_split) and for training. Every method in run r trains on the same training
  patients and is tested on the same test patients, so methods are compared in pairs.
- softmax (and asm) have no margin and are trained once per run; amcl and dr-amcl once per margin.
- Resumable: a method whose run directory holds predictions.csv, metrics.json and model.pt is
  finished and skipped; one with the trainer's per-epoch last.pt but no results (a killed run) is
  resumed with the trainer's resume; anything else starts afresh. experiment.json pins the
  settings that change results (manifest contents, seed, test fraction, every train option but
  device / workers / cache_dir / progress), so a restart with other settings is refused instead of
  mixing runs made under two settings.
- The tables are computed from each run's predictions.csv with train.metrics.compute_metrics (the
  same function the trainer uses), so every number in them can be recomputed from the files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..runtime.atomic import write_json, write_text
from ..runtime.errors import InputError
from ..runtime.provenance import file_sha256
from ..runtime import checks
from ..runtime.jsonsafe import json_safe
from .config import (LOSSES, MARGIN_LOSSES, NON_RESULT_OPTIONS, PER_RUN_OPTIONS, RunConfig, default_options,
                     option_names, refuse_unknown)
from .tables import RunResult, build_tables, method_label

RESULTS_FORMAT = "liverstage-experiment-results"
SETTINGS_FORMAT = "liverstage-experiment"
_DEFAULTS = default_options()


@dataclass
class ExperimentConfig:
    """What `liverstage experiment` was asked to do."""

    manifest: Path
    out: Path
    backbones: Sequence[str] = ("vgg16", "resnet18", "resnet50")
    losses: Sequence[str] = ("softmax", "amcl", "dr-amcl")
    margins: Sequence[float] = (0.5,)
    runs: int = 6
    seed: int = _DEFAULTS["seed"]
    test_fraction: float = _DEFAULTS["test_fraction"]
    note: str = ""                                  # e.g. "phantoms": shown in titles
    train_options: dict[str, Any] = field(default_factory=dict)  # any other RunConfig option (flat names)

    def validate(self) -> None:
        if not Path(self.manifest).is_file():
            raise InputError(f"manifest not found: {self.manifest}")
        checks.integer(self.runs, "--runs", low=1)
        checks.fraction(self.test_fraction, "--test-fraction", low_open=True)
        if not self.backbones:
            raise InputError("--backbones needs at least one backbone")
        if len(set(self.backbones)) != len(self.backbones):
            raise InputError(f"--backbones lists a name twice: {','.join(self.backbones)}")
        bad = [l for l in self.losses if l not in LOSSES]
        if bad or not self.losses:
            raise InputError(f"unknown loss {','.join(bad) or '(none)'} (expected some of {', '.join(LOSSES)})")
        if len(set(self.losses)) != len(self.losses):
            raise InputError(f"--losses lists a loss twice: {','.join(self.losses)}")
        if any(l in MARGIN_LOSSES for l in self.losses):
            if not self.margins:
                raise InputError("--margins needs at least one margin for amcl / dr-amcl")
            for m in self.margins:
                checks.margin(m, "--margins")
            if len({round(m, 6) for m in self.margins}) != len(self.margins):
                raise InputError(f"--margins lists a margin twice: {self.margins}")
        clash = sorted(PER_RUN_OPTIONS & set(self.train_options))
        if clash:
            raise InputError(f"train option(s) {', '.join(clash)} are set by the experiment per run")
        refuse_unknown(self.train_options)


@dataclass(frozen=True)
class Method:
    backbone: str
    loss: str
    margin: float | None

    @property
    def dirname(self) -> str:
        return f"{self.backbone}-{self.loss}" + ("" if self.margin is None else f"-m{self.margin:.2f}")

    def label(self, *, show_margin: bool = False) -> str:
        return method_label(self.backbone, self.loss, self.margin, show_margin=show_margin)


def methods_for(config: ExperimentConfig) -> list[Method]:
    """Backbones in the given order; losses in the paper's order; margins ascending."""
    out = []
    losses = sorted(config.losses, key=LOSSES.index)
    for b in config.backbones:
        for l in losses:
            if l in MARGIN_LOSSES:
                out += [Method(b, l, float(m)) for m in sorted(config.margins)]
            else:
                out.append(Method(b, l, None))
    return out


def effective_train_options(config: ExperimentConfig) -> dict:
    """Every train option as it will be used (RunConfig defaults overlaid with the given ones),
    without the per-run options."""
    refuse_unknown(config.train_options)
    return {name: config.train_options.get(name, _DEFAULTS.get(name)) for name in option_names()
            if name not in PER_RUN_OPTIONS and (name in config.train_options or name in _DEFAULTS)}


def pinned_settings(config: ExperimentConfig) -> dict:
    """The settings that change results: a restart must match them."""
    options = effective_train_options(config)
    return {
        "manifest_sha256": file_sha256(Path(config.manifest)),
        "seed": int(config.seed),
        "test_fraction": float(config.test_fraction),
        "train_options": json_safe({k: v for k, v in sorted(options.items()) if k not in NON_RESULT_OPTIONS}),
    }


def _check_or_write_settings(config: ExperimentConfig) -> None:
    path = Path(config.out) / "experiment.json"
    pinned = pinned_settings(config)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            raise InputError(f"{path} is unreadable; remove it or use another --out") from None
        old = dict(stored.get("pinned", {}))
        # A trainer option added after the experiment was started did not exist then; its default
        # is what those runs used, so it is not a change. (A removed option is ignored likewise.)
        defaults = json_safe(_DEFAULTS)
        old_opts = dict(old.get("train_options") or {})
        new_opts = pinned["train_options"]
        for key in set(new_opts) - set(old_opts):
            if key in defaults:
                old_opts[key] = defaults[key]
        changed = sorted(k for k in set(old_opts) & set(new_opts) if old_opts[k] != new_opts[k])
        changed += sorted(k for k in set(new_opts) - set(old_opts))
        detail = [f"{k} {old_opts.get(k)!r} -> {new_opts.get(k)!r}" for k in changed]
        detail += [k.replace("_sha256", " contents") for k in pinned
                   if k != "train_options" and old.get(k) != pinned[k]]
        if detail:
            raise InputError(f"{config.out} was made with other settings ({'; '.join(detail)}); "
                             "use the same settings to resume, or another --out")
    record = {
        "format": SETTINGS_FORMAT,
        "format_version": 1,
        "manifest": str(Path(config.manifest).resolve()),
        "backbones": list(config.backbones),
        "losses": list(config.losses),
        "margins": [float(m) for m in config.margins],
        "runs": int(config.runs),
        "note": config.note,
        "pinned": pinned,
    }
    write_json(path, record)


def patients_and_stages(manifest: Path) -> tuple[list[str], list[str]]:
    """Unique patient ids (manifest order) and their stages."""
    from ..runtime.manifest import read_manifest  # noqa: PLC0415

    stage_of: dict[str, str] = {}
    for row in read_manifest(manifest):
        stage_of.setdefault(row.patient_id, row.stage)
    return list(stage_of), [stage_of[p] for p in stage_of]


def run_split(config: ExperimentConfig, run: int, patients: list[str], stages: list[str]) -> dict:
    """Run `run`'s split, made once and then read back (so resumed runs keep their patients)."""
    run_root = Path(config.out) / "runs" / str(run)
    path = run_root / "split.json"
    if path.is_file():
        split = json.loads(path.read_text())
        unknown = sorted(set(split["test"]) - set(patients))
        if unknown:
            raise InputError(f"{path} names test patients not in the manifest: {', '.join(unknown[:5])}")
        return split
    from .splits import patient_split  # noqa: PLC0415

    seed = int(config.seed) + run
    train, _val, test = patient_split(patients, stages, test_fraction=config.test_fraction,
                                      val_fraction=0.0, seed=seed)
    split = {"run": run, "seed": seed, "train": sorted(map(str, train)), "test": sorted(map(str, test))}
    write_text(run_root / "test_patients.txt", "\n".join(split["test"]) + "\n")
    write_json(path, split)
    return split


def is_finished(run_dir: Path) -> bool:
    """The trainer writes predictions.csv, metrics.json, then model.pt: all three mean done."""
    return all((run_dir / name).is_file() for name in ("predictions.csv", "metrics.json", "model.pt"))


def metrics_from_predictions(run_dir: Path) -> dict:
    """Test metrics recomputed from predictions.csv with the trainer's own metrics function."""
    from .metrics import compute_metrics  # noqa: PLC0415
    from .plots import read_predictions  # noqa: PLC0415

    pred = read_predictions(Path(run_dir) / "predictions.csv")
    return json_safe(compute_metrics(pred["labels"], pred["probs"], pred["patient_ids"]))


def _train_config(config: ExperimentConfig, method: Method, run: int, run_dir: Path, test_ids: list[str],
                  resume: bool) -> RunConfig:
    """The RunConfig of one (run, method); every option not set here keeps its default."""
    options = dict(config.train_options)
    # resume from last.pt (checkpointed every epoch) where a killed run left one; otherwise start
    # afresh, replacing whatever partial files an unfinished run left behind
    options.update(manifest=Path(config.manifest), backbone=method.backbone, loss=method.loss,
                   seed=int(config.seed) + run, out=run_dir, resume=resume, overwrite=not resume,
                   test_fraction=float(config.test_fraction), test_patients=list(test_ids))
    if method.margin is not None:
        options["margin"] = method.margin
    if method.loss == "softmax" and "warmup_epochs" in options:
        options["warmup_epochs"] = 0  # the ASM warm-up of the angular heads; softmax has none
    return RunConfig.from_options(options)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="experiment", unit="run", position=0, leave=True,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _log(message: str, bar) -> None:
    bar.write(f"experiment: {message}", file=sys.stderr)


def figure_title(method: Method, run: int, note: str) -> str:
    label = method.label(show_margin=True) + (" (softmax)" if method.loss == "softmax" else "")
    title = f"{label}, run {run}"
    return f"{title} ({note})" if note else title


def run_experiment(config: ExperimentConfig, *, progress: bool = True) -> dict:
    """Train every (run, method) not yet finished, then write tables, figures and results.json.

    Returns the results.json content plus the counts `trained` and `skipped`.
    """
    config.validate()
    methods = methods_for(config)
    out = Path(config.out)
    # every train option is checked by RunConfig before anything is written
    for method in methods:
        _train_config(config, method, 0, out / "runs" / "0" / method.dirname, ["-"], False)
    patients, stages = patients_and_stages(Path(config.manifest))
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_settings(config)
    from .trainer import train_run  # noqa: PLC0415
    from .plots import RUN_FIGURES, plot_run  # noqa: PLC0415

    splits = {r: run_split(config, r, patients, stages) for r in range(config.runs)}
    results: list[RunResult] = []
    trained = skipped = 0
    bar = _progress(config.runs * len(methods), progress)
    try:
        for r in range(config.runs):
            run_root = out / "runs" / str(r)
            for method in methods:
                run_dir = run_root / method.dirname
                bar.set_postfix_str(f"run {r} {method.dirname}")
                if is_finished(run_dir):
                    skipped += 1
                    _log(f"run {r} {method.dirname}: finished earlier, skipped", bar)
                else:
                    resume = (run_dir / "last.pt").is_file()
                    _log(f"run {r} {method.dirname}: {'resuming' if resume else 'training'}", bar)
                    train_run(_train_config(config, method, r, run_dir, splits[r]["test"], resume))
                    trained += 1
                    if not is_finished(run_dir):
                        raise InputError(f"training wrote no metrics.json / predictions.csv in {run_dir}")
                if not all((run_dir / f).is_file() for f in RUN_FIGURES):
                    plot_run(run_dir, title=figure_title(method, r, config.note))
                results.append(RunResult(r, method.backbone, method.loss, method.margin,
                                         str(run_dir.relative_to(out)), metrics_from_predictions(run_dir)))
                bar.update(1)
    finally:
        bar.close()
    summary = write_outputs(config, results, splits)
    summary["trained"], summary["skipped"] = trained, skipped
    _log(f"{trained} trained, {skipped} skipped; tables in {out}", bar)
    return summary


def settings_line(config: ExperimentConfig) -> str:
    """One line saying how the tables were made (for summary.md and the README)."""
    opts = effective_train_options(config)
    shown = ", ".join(f"{k} {opts[k]}" for k in ("epochs", "crop_size", "batch_size", "lr", "scale", "val_fraction")
                      if k in opts)
    margins = ", ".join(f"{m:g}" for m in sorted(config.margins))
    return (f"backbones {', '.join(config.backbones)}; losses {', '.join(config.losses)}; margins {margins}; "
            f"{config.runs} runs (patient-level splits, test fraction {config.test_fraction:g}, seeds "
            f"{config.seed}..{config.seed + config.runs - 1}); {shown}")


def write_outputs(config: ExperimentConfig, results: list[RunResult], splits: dict) -> dict:
    """Tables, summary.md, the paired-accuracy figure and results.json (all atomic)."""
    from .plots import plot_paired_accuracy  # noqa: PLC0415

    out = Path(config.out)
    tables, paired = build_tables(results, backbone_order=list(config.backbones), seed=int(config.seed))
    note = f" Data: {config.note}." if config.note else ""
    written = []
    for t in tables:
        if note:
            t.title = t.title.rstrip() + note
        written += [str(p.relative_to(out)) for p in t.write(out)]
    plot_paired_accuracy(out / "accuracy.png", results,
                         title="Test accuracy per run" + (f" ({config.note})" if config.note else ""))
    written.append("accuracy.png")
    heading = "Experiment" + (f" on {config.note}" if config.note else "")
    write_text(out / "summary.md", "\n".join([f"# {heading}", "", f"Settings: {settings_line(config)}.", ""]
                                             + [t.markdown() for t in tables]))
    written.append("summary.md")
    show_margin = len(config.margins) > 1
    summary = {
        "format": RESULTS_FORMAT,
        "format_version": 1,
        "manifest": str(Path(config.manifest).resolve()),
        "note": config.note,
        "settings": {
            "backbones": list(config.backbones), "losses": list(config.losses),
            "margins": [float(m) for m in config.margins], "runs": int(config.runs), "seed": int(config.seed),
            "test_fraction": float(config.test_fraction), "train_options": json_safe(effective_train_options(config)),
        },
        "metrics_source": "train.metrics.compute_metrics on each run's predictions.csv",
        "std": "sample standard deviation over runs (ddof=1)",
        "intervals": "paired by run; tables show the 95% Student t interval of the mean difference, "
                     "results.json also holds a percentile bootstrap (10000 resamples, fixed seed)",
        "splits": {str(r): {"seed": s["seed"], "test": s["test"]} for r, s in splits.items()},
        "runs": [dict(r.to_dict(), method=method_label(r.backbone, r.loss, r.margin, show_margin=show_margin))
                 for r in results],
        "paired_vs_softmax": json_safe(paired),
        "files": written,
    }
    write_json(out / "results.json", json_safe(summary))
    return summary
