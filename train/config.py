"""RunConfig: every option of one training run, validated in one place, each default stated once.

A run is set by its training options plus the full PreprocessSpec. Users meet them as one flat
namespace of options (`--epochs`, `--crop-size`, `--box-margin`, ...): `liverstage train` and
`liverstage experiment` generate their options from this class (runtime/cli/options.py), an
experiment's `--train-option KEY=VALUE` is parsed against it, and a checkpoint stores
`RunConfig.options()` as its `args`, as torchvision's reference script saves its arguments in
every checkpoint. The PreprocessSpec fields keep their own names and defaults (runtime/spec.py).

This module imports no torch: the CLI reads it to build its options on a torch-free install.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

from liverstage.runtime import checks
from liverstage.runtime.errors import InputError
from liverstage.runtime.spec import PreprocessSpec

Loss = Literal["softmax", "asm", "amcl", "dr-amcl"]
LOSSES: tuple[str, ...] = typing.get_args(Loss)  # also the paper's order in tables
MARGIN_LOSSES = ("amcl", "dr-amcl")  # the losses whose margin m is a setting
ANGULAR_LOSSES = ("asm", "amcl", "dr-amcl")


def _opt(default: Any = dataclasses.MISSING, help: str = "", *, cli: bool = True) -> Any:  # noqa: A002
    """A field with its help text; cli=False keeps it off the generated command line."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. Construction validates and normalises (see `__post_init__`)."""

    manifest: Path = _opt(help="CSV: patient_id,image,mask,stage.")
    out: Path = _opt(help="Run folder: model.pt, history.csv, metrics.json, predictions.csv.")
    backbone: str = _opt("resnet18", "vgg16, resnet18, resnet50 (or any torchvision classification model).")
    loss: Loss = _opt("amcl", "softmax (Eq. 1), asm (Eq. 2), amcl (Eq. 3), dr-amcl (Eq. 5).")
    scale: float = _opt(30.0, "s: radius of the normalised embedding (angular losses).")
    margin: float = _opt(0.5, "m: additive angular margin in radians (amcl, dr-amcl).")
    epochs: int = _opt(100, "Training epochs (paper: 100).")
    lr: float = _opt(5e-5, "Adam learning rate (paper: 5e-5).")
    batch_size: int = _opt(32, "Crops per step (per process under torchrun).")
    preprocess: PreprocessSpec = _opt(PreprocessSpec(), "How crops are cut and normalised (its fields are options).")
    seed: int = _opt(0, "Seeds the split, initialisation, data order and augmentation.")
    device: str = _opt("auto", "auto, cpu or cuda.")
    resume: bool = _opt(False, "Continue the run in --out from its last epoch.")
    val_fraction: float = _opt(0.0, "Share of patients held out of training to pick the best epoch (0: last epoch).")
    warmup_epochs: int = _opt(0, "First N epochs train the angular head without margin (ASM): helps AMCL/DR-AMCL "
                                 "converge (0: paper protocol).")
    test_fraction: float = _opt(0.2, "Share of patients tested (stratified by stage; unused with --test-patients).")
    test_patients: tuple[str, ...] | None = _opt(None, "The test patient ids (else a split by test_fraction).", cli=False)
    pretrained: Path | None = _opt(None, "Local torchvision ImageNet state_dict for the backbone (never downloaded).")
    workers: int = _opt(0, "Processes that cut volume crops on the first pass.")
    cache_dir: Path | None = _opt(None, "Crop cache (default $LIVERSTAGE_CACHE or ~/.cache/liverstage/crops).")
    overwrite: bool = _opt(False, "Start afresh even if --out holds a run.")
    progress: bool = _opt(True, "Show progress bars.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, FIELD_CHECKS[f.name](getattr(self, f.name), option_flag(f.name)))
        if self.loss == "asm":
            object.__setattr__(self, "margin", 0.0)  # ASM is the angular head without margin
        if self.warmup_epochs and self.loss not in ANGULAR_LOSSES:
            raise checks.InvalidValue("--warmup-epochs applies to the angular losses (asm, amcl, dr-amcl), not softmax")
        checks.fraction(self.val_fraction, "--val-fraction", high=1.0 - self.test_fraction)
        if self.pretrained is not None and not self.pretrained.is_file():
            raise InputError(f"--pretrained file not found: {self.pretrained}")

    # -- the flat option namespace ---------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Every option by its flat name, as plain JSON values (the checkpoint's `args`).

        The manifest is stored as an absolute path: --resume and experiments compare it.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "preprocess":
                out.update({k: v for k, v in value.to_dict().items() if k != "version"})
            elif isinstance(value, Path):
                out[f.name] = str(value.resolve() if f.name == "manifest" else value)
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, preprocess: PreprocessSpec | None = None) -> "RunConfig":
        """A RunConfig from flat option names (PreprocessSpec fields included); the spec fields
        given override `preprocess` (default: PreprocessSpec()). Unknown names are refused."""
        refuse_unknown(options)
        spec_names = set(PreprocessSpec.option_names())
        spec_changes = {k: v for k, v in options.items() if k in spec_names}
        base = preprocess if preprocess is not None else PreprocessSpec()
        kwargs = {k: v for k, v in options.items() if k not in spec_names}
        return cls(**kwargs, preprocess=base.replace(**spec_changes) if spec_changes else base)


def option_names() -> tuple[str, ...]:
    """Every flat option name, in the order the CLI shows them (spec fields where `preprocess` is)."""
    names: list[str] = []
    for f in dataclasses.fields(RunConfig):
        names += PreprocessSpec.option_names() if f.name == "preprocess" else [f.name]
    return tuple(names)


# Options that say where and how fast a run goes, not what it computes.
NON_RESULT_OPTIONS = frozenset({"device", "workers", "cache_dir", "progress"})
# Options that say what to do with the run folder.
RUN_FOLDER_OPTIONS = frozenset({"out", "resume", "overwrite"})
# Options `liverstage experiment` sets for each (run, method) itself.
PER_RUN_OPTIONS = frozenset({"manifest", "backbone", "loss", "margin", "seed", "out", "resume", "overwrite",
                             "test_patients", "test_fraction"})


def refuse_unknown(names: Any) -> None:
    """InputError naming every name that is not a train option."""
    unknown = sorted(set(names) - set(option_names()))
    if unknown:
        raise InputError(f"unknown train option(s) {', '.join(unknown)} (known: {', '.join(option_names())})")


def default_options() -> dict[str, Any]:
    """The default of every flat option that has one (as `RunConfig.options()` would store it)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == "preprocess":
            out.update({k: v for k, v in f.default.to_dict().items() if k != "version"})
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def _test_patients(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    ids = tuple(sorted({str(p) for p in value}))
    if not ids:
        raise checks.InvalidValue(f"{name} names no patient")
    return ids


def _path(value: Any, name: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise checks.InvalidValue(f"{name} must be a path, got {value!r}")
    return Path(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise checks.InvalidValue(f"{name} must be true or false, got {value!r}")
    return value


def _choice(choices: tuple[str, ...]):
    def check(value: Any, name: str) -> str:
        if value not in choices:
            raise checks.InvalidValue(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _spec(value: Any, name: str) -> PreprocessSpec:
    if not isinstance(value, PreprocessSpec):
        raise checks.InvalidValue(f"{name} must be a PreprocessSpec, got {type(value).__name__}")
    return value


def _backbone(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise checks.InvalidValue(f"{name} must be a backbone name, got {value!r}")
    return value.strip().lower()


# The one validator of each field (cross-field rules are in RunConfig.__post_init__).
FIELD_CHECKS = {
    "manifest": _path,
    "out": _path,
    "backbone": _backbone,
    "loss": _choice(LOSSES),
    "scale": checks.positive,
    "margin": checks.margin,
    "epochs": lambda v, n: checks.integer(v, n, low=1),
    "lr": checks.positive,
    "batch_size": lambda v, n: checks.integer(v, n, low=2),  # BatchNorm cannot train on one crop
    "preprocess": _spec,
    "seed": lambda v, n: checks.integer(v, n, low=0),
    "device": checks.device,
    "resume": _flag,
    "val_fraction": lambda v, n: checks.fraction(v, n),
    "warmup_epochs": lambda v, n: checks.integer(v, n, low=0),
    "test_fraction": lambda v, n: checks.fraction(v, n, low_open=True),
    "test_patients": _test_patients,
    "pretrained": lambda v, n: None if v is None else _path(v, n),
    "workers": lambda v, n: checks.integer(v, n, low=0),
    "cache_dir": lambda v, n: None if v is None else _path(v, n),
    "overwrite": _flag,
    "progress": _flag,
}


def option_flag(name: str) -> str:
    """The command-line spelling of an option: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Flat options (RunConfig fields and PreprocessSpec fields) through their validators; returns
    the canonical values. Lets a command refuse a bad value before it does any work."""
    refuse_unknown(options)
    spec_names = PreprocessSpec.option_names()
    out = {name: FIELD_CHECKS[name](value, option_flag(name)) for name, value in options.items()
           if name not in spec_names}
    spec_part = {name: value for name, value in options.items() if name in spec_names}
    if spec_part:
        spec = PreprocessSpec().replace(**spec_part)
        out.update({name: getattr(spec, name) for name in spec_part})
    return out


# Options that must be equal for --resume to continue a run (epochs may grow).
RESUME_OPTIONS = tuple(n for n in option_names() if n not in NON_RESULT_OPTIONS | RUN_FOLDER_OPTIONS | {"epochs"})
