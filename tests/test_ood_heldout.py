"""benchmarks/ood_heldout.py: the held-out kinds are built as documented and staged from files.

On the tiny gated model (conftest.py) only the plumbing and the plainest kinds are asserted;
the figures that count come from the demo's models (README: the held-out check).
"""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def heldout(benchmark_module):
    return benchmark_module("ood_heldout")


def test_cases_are_the_documented_kinds_and_not_the_tuning_kinds(heldout):
    from liverstage.export.ood_sets import KINDS  # noqa: PLC0415

    cases, note = heldout.heldout_cases(2)
    kinds = {c.kind for c in cases}
    expected = set(heldout.COUNTED + heldout.APART) - ({"photo", "terrain"} if note else set())
    assert kinds == expected
    assert not kinds & set(KINDS)  # held out: none of them is a kind the gate was chosen or measured on
    for case in cases:
        assert case.data.ndim == 3 and case.data.shape == case.region.shape, case.name
        assert np.isfinite(case.data).all() and case.region.any(), case.name
    per_kind = {k: sum(c.kind == k for c in cases) for k in kinds}
    assert all(per_kind[k] == 2 for k in kinds if k not in ("photo", "terrain"))
    air = next(c for c in cases if c.kind == "mask_in_air")
    liver = next(c for c in cases if c.kind == "heavy_noise").region
    assert not (air.region & liver).any()  # the region really is off the liver
    shuffled = next(c for c in cases if c.kind == "shuffled_liver")
    rotated = next(c for c in cases if c.kind == "rot90")
    assert shuffled.data.shape == rotated.data.shape[1::-1] + rotated.data.shape[2:]
    with pytest.raises(ValueError, match="positive integer"):
        heldout.heldout_cases(0)


def test_second_set_is_new_kinds_with_its_own_seed(heldout):
    from liverstage.export.ood_sets import KINDS  # noqa: PLC0415

    cases, note = heldout.second_set_cases(2)
    kinds = {c.kind for c in cases}
    image_kinds = {"photo_sklearn", "package_photo", "brain_slice", "bathymetry"}
    assert kinds == set(heldout.SECOND_COUNTED + heldout.SECOND_APART) - (image_kinds if note else set())
    assert not kinds & (set(KINDS) | set(heldout.COUNTED) | set(heldout.APART))
    for case in cases:
        assert case.data.ndim == 3 and case.data.shape == case.region.shape, case.name
        assert np.isfinite(case.data).all() and case.region.any(), case.name
    # the synthetic kinds are new draws per index, not one volume repeated
    pink = [c.data for c in cases if c.kind == "pink_noise"]
    assert len(pink) == 2 and not np.allclose(pink[0], pink[1])
    # mirrored: the phantom flipped along the canonical x axis, region and image together
    mirrored = next(c for c in cases if c.kind == "mirrored")
    assert mirrored.region.any() and not np.array_equal(mirrored.region, mirrored.region[::-1])
    if not note:
        brain = next(c for c in cases if c.kind == "brain_slice")
        # read big-endian, the slice is an image: neighbouring pixels close, unlike byte-swapped noise
        step = np.abs(np.diff(brain.data[..., 0], axis=0)).mean()
        assert step < 0.05 * brain.data.max(), step
    with pytest.raises(ValueError, match="positive integer"):
        heldout.second_set_cases(0)


def test_third_set_is_new_kinds_with_its_own_seed(heldout):
    from liverstage.export.ood_sets import KINDS  # noqa: PLC0415

    cases, note = heldout.third_set_cases(2)
    kinds = {c.kind for c in cases}
    earlier = set(KINDS) | set(heldout.COUNTED + heldout.APART + heldout.SECOND_COUNTED + heldout.SECOND_APART)
    assert not kinds & earlier
    assert kinds <= set(heldout.THIRD_COUNTED + heldout.THIRD_APART)
    assert kinds >= {"row_grating", "voronoi", "siemens_star", "blocky_noise", "upside_down", "blurred"}
    assert len(set(heldout.SEEDS.values())) == len(heldout.SETS)
    if note is None:  # every pydicom file decoded here
        assert kinds == set(heldout.THIRD_COUNTED + heldout.THIRD_APART)
    for case in cases:
        assert case.data.ndim == 3 and case.data.shape == case.region.shape, case.name
        assert np.isfinite(case.data).all() and case.region.any(), case.name
    # the gratings vary along one in-plane axis only: the first for index 0, the second for index 1
    gratings = [c.data for c in cases if c.kind == "row_grating"]
    assert np.ptp(gratings[0][:, 0, 0]) > 0 and np.ptp(gratings[0][0, :, 0]) == 0
    assert np.ptp(gratings[1][0, :, 0]) > 0 and np.ptp(gratings[1][:, 0, 0]) == 0
    with pytest.raises(ValueError, match="positive integer"):
        heldout.third_set_cases(0)


def test_runs_through_predict_and_flags_noise(heldout, gated_model, tmp_path, capsys):
    out = tmp_path / "heldout.json"
    assert heldout.main(["--model", str(gated_model), "--per-kind", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert set(figures["kinds"]) >= set(heldout.COUNTED[:7]) | set(heldout.APART)
    for kind, summary in figures["kinds"].items():
        assert summary["volumes"] == summary["staged"] + summary["uncertain"] + summary["refused"], kind
        assert f"  {kind} " in printed
    noise = figures["kinds"]["uniform_noise"]
    assert noise["uncertain"] + noise["refused"] == noise["volumes"] == 1
    # per part (ood_eval.part_flags): one part alone flags no more than the gate, the gate
    # without a part no more than the whole, and together they account for every flag
    from liverstage.runtime.ood import PARTS  # noqa: PLC0415

    for kind, summary in figures["kinds"].items():
        caught, parts = summary["uncertain"] + summary["refused"], summary["parts"]
        assert set(parts) == {f"{how}_{part}" for how in ("only", "without") for part in PARTS}, kind
        assert all(parts[f"only_{part}"] <= parts[f"without_{other}"] <= caught
                   for part in PARTS for other in PARTS if other != part), kind
    assert "flagged by one part alone: embedding " in printed
    for set_name, (counted_kinds, _) in heldout.SETS.items():
        counted = [figures["kinds"][k] for k in counted_kinds if k in figures["kinds"]]
        caught = sum(s["uncertain"] + s["refused"] for s in counted)
        assert figures["sets"][set_name]["caught"] == caught, set_name
        assert figures["sets"][set_name]["volumes"] == sum(s["volumes"] for s in counted), set_name
        assert f"{set_name} set's not-liver volumes flagged or refused: {caught} of " in printed
    caught = sum(figures["sets"][name]["caught"] for name in heldout.SETS)
    volumes = sum(figures["sets"][name]["volumes"] for name in heldout.SETS)
    assert figures["detection"] == pytest.approx(caught / volumes)
    assert f"all sets: {caught} of {volumes} " in printed


def test_a_model_without_gate_is_refused(heldout, tiny_model, capsys):
    assert heldout.main(["--model", str(tiny_model), "--per-kind", "1"]) == 2
    assert "carries no out-of-distribution gate" in capsys.readouterr().err
