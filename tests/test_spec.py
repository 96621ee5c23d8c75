"""PreprocessSpec: JSON round trip, stable hash (across processes), validation."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from liverstage.runtime.spec import SPEC_VERSION, PreprocessSpec


def test_round_trip():
    spec = PreprocessSpec(crop_size=64, box_margin=0.2, clip_high=2)
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_json(spec.to_json()).hash == spec.hash


def test_hash_is_stable_across_processes():
    code = "from liverstage.runtime.spec import PreprocessSpec as P; print(P().hash, P(crop_size=64).hash)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    assert out == [PreprocessSpec().hash, PreprocessSpec(crop_size=64).hash]
    assert len(out[0]) == 16 and int(out[0], 16) >= 0


def test_hash_changes_with_every_field():
    base = PreprocessSpec()
    changes = {"crop_size": 112, "box_margin": 0.3, "min_area_fraction": 0.5, "percentile_low": 1.0,
               "percentile_high": 99.0, "percentile_inset": 0, "clip_low": -1.0, "clip_high": 2.0}
    fields = {f.name for f in dataclasses.fields(PreprocessSpec)} - {"version"}
    assert set(changes) == fields  # a new field must be added here
    hashes = {base.hash}
    for name, value in changes.items():
        hashes.add(base.replace(**{name: value}).hash)
    assert len(hashes) == len(changes) + 1


def test_int_and_float_give_the_same_hash():
    assert PreprocessSpec(clip_high=2).hash == PreprocessSpec(clip_high=2.0).hash


@pytest.mark.parametrize(
    "changes",
    [{"crop_size": 4}, {"crop_size": 64.0}, {"box_margin": -0.1}, {"min_area_fraction": 1.5},
     {"percentile_low": 60, "percentile_high": 50}, {"clip_low": 1.0, "clip_high": 1.0},
     {"box_margin": "0.1"}, {"version": SPEC_VERSION + 1}, {"percentile_inset": -1}, {"percentile_inset": 17},
     {"percentile_inset": 2.0}, {"percentile_inset": True}],
)
def test_invalid_values_are_refused(changes):
    with pytest.raises(ValueError):
        PreprocessSpec(**changes)


def test_a_spec_saved_before_percentile_inset_reads_as_no_inset():
    """Models exported before the field existed took their percentiles over the whole region:
    their stored spec (without the field) must give that preprocessing, not today's default."""
    old = {k: v for k, v in PreprocessSpec().to_dict().items() if k != "percentile_inset"}
    assert PreprocessSpec().percentile_inset == 3
    assert PreprocessSpec.from_dict(old).percentile_inset == 0
    assert PreprocessSpec.from_dict({**old, "percentile_inset": 3}).percentile_inset == 3


def test_unknown_field_and_frozen():
    with pytest.raises(ValueError, match="unknown"):
        PreprocessSpec.from_dict({**PreprocessSpec().to_dict(), "gamma": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        PreprocessSpec().crop_size = 10  # type: ignore[misc]


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (private by default); results must not stay private."""
    import os
    import stat

    from liverstage.runtime.atomic import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "report.json", "{}")
        with atomic_dir(tmp_path / "repo") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "repo").stat().st_mode) == 0o755
