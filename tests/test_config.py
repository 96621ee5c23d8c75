"""RunConfig: one flat set of training and preprocessing options, the same on every command that
offers them, validated in one place; --train-option and --resume go through it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import typer

from liverstage.runtime import checks
from liverstage.runtime.cli import app
from liverstage.runtime.errors import InputError
from liverstage.runtime.spec import PreprocessSpec
from liverstage.train.config import (PER_RUN_OPTIONS, RESUME_OPTIONS, RunConfig, check_options, default_options,
                                     option_names)

SPEC_OPTIONS = set(PreprocessSpec.option_names())


def _params(command: str) -> dict[str, object]:
    """The click parameters of a liverstage command, by their long option name."""
    group = typer.main.get_command(app)
    return {max(p.opts, key=len): p for p in group.commands[command].params}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_train_offers_every_option_of_runconfig_and_crops_every_spec_field():
    train = _params("train")
    cli_names = {n for n in option_names() if n != "test_patients"}  # a file of ids on the command line
    assert {_flag(n) for n in cli_names} | {"--test-patients", "--spec"} == set(train)
    crops = _params("crops")
    assert {_flag(n) for n in SPEC_OPTIONS} <= set(crops)
    for name in SPEC_OPTIONS:  # same names, help and "not given" defaults as `crops`
        assert train[_flag(name)].help == crops[_flag(name)].help and train[_flag(name)].default is None


def test_experiment_offers_every_option_it_does_not_set_per_run():
    experiment = _params("experiment")
    for name in set(option_names()) - PER_RUN_OPTIONS:
        assert experiment[_flag(name)].default is None, name  # left out: the trainer's default
    own = {"manifest", "out", "seed", "test_fraction"}  # the experiment's own settings of the same names
    for name in PER_RUN_OPTIONS - own:
        assert _flag(name) not in experiment, name


def test_each_default_is_stated_once():
    train = _params("train")
    defaults = default_options()
    for name, value in defaults.items():
        if name in SPEC_OPTIONS:
            assert getattr(PreprocessSpec(), name) == value
        elif name != "test_patients":
            assert train[_flag(name)].default == value, name
    experiment = _params("experiment")
    assert experiment["--seed"].default == defaults["seed"]
    assert experiment["--test-fraction"].default == defaults["test_fraction"]
    assert {f.name for f in dataclasses.fields(RunConfig)} - {"preprocess"} <= set(defaults) | {"manifest", "out"}


def test_options_round_trip_through_the_flat_namespace(tmp_path):
    config = RunConfig.from_options({"manifest": tmp_path / "m.csv", "out": tmp_path / "run", "crop_size": 48,
                                     "box_margin": 0.25, "clip_high": 2, "loss": "dr-amcl", "test_patients": ["b", "a", "b"]})
    options = config.options()
    assert options["crop_size"] == 48 and options["box_margin"] == 0.25 and options["clip_high"] == 2.0
    assert options["test_patients"] == ["a", "b"] and options["manifest"] == str((tmp_path / "m.csv").resolve())
    assert json.loads(json.dumps(options)) == options  # plain JSON values
    assert RunConfig.from_options(options) == dataclasses.replace(config, manifest=(tmp_path / "m.csv").resolve())
    assert set(options) == set(option_names())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]


def test_asm_has_no_margin_and_a_spec_file_is_the_base(tmp_path):
    base = PreprocessSpec(crop_size=96, percentile_low=1.0)
    config = RunConfig.from_options({"manifest": "m.csv", "out": "o", "loss": "asm", "margin": 0.4,
                                     "percentile_high": 98.0}, preprocess=base)
    assert config.margin == 0.0
    assert config.preprocess == PreprocessSpec(crop_size=96, percentile_low=1.0, percentile_high=98.0)


@pytest.mark.parametrize("value", [8, 15, 2049, 64.0, True])
def test_one_crop_size_rule_for_spec_trainer_and_cli(tmp_path, run_cli, value):
    with pytest.raises(checks.InvalidValue, match="crop_size must be an integer in \\[16, 2048\\]"):
        PreprocessSpec(crop_size=value)
    with pytest.raises(InputError, match="crop_size"):
        RunConfig.from_options({"manifest": "m.csv", "out": "o", "crop_size": value})
    if isinstance(value, int) and not isinstance(value, bool):
        code, _, err = run_cli(["demo", "--out", tmp_path / "demo", "--crop-size", value])
        assert code == 2 and "crop_size must be an integer in [16, 2048]" in err
        assert not (tmp_path / "demo").exists()  # refused before any phantom is drawn


@pytest.mark.parametrize("name,value,needle", [
    ("scale", 0.0, "--scale must be a number > 0"), ("scale", math.inf, "--scale"), ("lr", -1e-3, "--lr"),
    ("margin", math.pi / 2, "[0, pi/2) radians"), ("epochs", 1.5, "--epochs must be an integer >= 1"),
    ("batch_size", 1, "--batch-size"), ("device", "tpu", "--device"), ("test_fraction", 0.0, "--test-fraction"),
    ("backbone", "", "--backbone"), ("progress", "yes", "--progress must be true or false"),
])
def test_each_field_has_one_validator(name, value, needle):
    with pytest.raises(InputError) as exc:
        check_options({name: value})
    assert needle in str(exc.value)
    with pytest.raises(InputError) as exc_config:
        RunConfig.from_options({"manifest": "m.csv", "out": "o", name: value})
    assert str(exc_config.value) == str(exc.value)


def test_train_option_strings_take_their_option_types():
    from liverstage.runtime.cli.experiment_cmd import parse_train_options

    parsed = parse_train_options(["epochs=3", "box-margin=0.2", "progress=off", "pretrained=none", "loss=asm",
                                  "cache_dir=/tmp/c"])
    assert parsed == {"epochs": 3, "box_margin": 0.2, "progress": False, "pretrained": None, "loss": "asm",
                      "cache_dir": __import__("pathlib").Path("/tmp/c")}
    assert isinstance(parsed["epochs"], int)
    for bad, needle in (("epochs=three", "not an integer"), ("lr=fast", "not a number"), ("progress=maybe", "true/false"),
                        ("gamma=2", "unknown trainer option 'gamma'"), ("epochs", "KEY=VALUE")):
        with pytest.raises(InputError, match=needle):
            parse_train_options([bad])


def test_resume_accepts_options_an_older_checkpoint_did_not_record(reference, tmp_path):
    """A format_version 1 checkpoint stored fewer options; the missing ones had their defaults."""
    from liverstage.train.trainer import _check_resume

    saved = json.loads(reference.CHECKPOINT_V1_FIELDS.read_text())["args"]
    assert "box_margin" not in saved
    now = RunConfig.from_options({**{k: v for k, v in saved.items() if k in option_names()}, "epochs": 20})
    _check_resume(saved, now, tmp_path / "last.pt")  # more epochs: the same run, continued
    changed = RunConfig.from_options({**now.options(), "box_margin": 0.3})
    with pytest.raises(InputError, match="box_margin"):
        _check_resume(saved, changed, tmp_path / "last.pt")
    assert "box_margin" in RESUME_OPTIONS and "epochs" not in RESUME_OPTIONS and "device" not in RESUME_OPTIONS
