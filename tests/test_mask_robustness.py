"""benchmarks/mask_robustness.py: its changes are what it says, and through `predict` on the tiny
gated model (conftest.py) the same anatomy stored otherwise gets the same verdict and score.
The figures that count come from the demo's models (README: masks that are not the training masks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage


@pytest.fixture(scope="module")
def robustness(benchmark_module):
    return benchmark_module("mask_robustness")


def test_mask_changes_are_the_documented_ones(robustness):
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 30, 5), bool)
    mask[8:20, 10:24, 1:4] = True
    cross = robustness.CROSS
    full = robustness._in_plane_ring(mask, 1.0, rng)
    assert np.array_equal(full, ndimage.binary_dilation(mask, structure=cross))
    assert not (full[:, :, 0] | full[:, :, 4]).any()  # in-plane only: no slice above or below
    half = robustness._in_plane_ring(mask, 0.5, rng)
    ring = (full & ~mask).sum()
    assert mask.sum() < half.sum() < full.sum() and 0.3 < (half & ~mask).sum() / ring < 0.7
    boxed = robustness._box_only(mask, 3)
    assert (boxed & ~mask).sum() == 2 * 3  # two corner voxels on each of the mask's slices
    xs, ys, _ = np.nonzero(boxed)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 22, 7, 26)  # the 3-voxel dilation's box
    groups = {group for group, _ in robustness.CHANGES.values()}
    assert groups == {"same", "mask", "scanner"} and all("," not in name for name in robustness.CHANGES)


def test_the_same_anatomy_stored_otherwise_gets_the_same_verdict(robustness, gated_model, tmp_path):
    """Scaled, offset, reversed slice order, reversed in-plane axes with the affine saying so:
    predict normalises and reorients them to the same crops, so the same scores, to rounding."""
    from liverstage.phantoms.synth import synth_cohort
    from liverstage.runtime.backends import open_backend
    from liverstage.runtime.manifest import read_manifest

    rows = list(read_manifest(synth_cohort(tmp_path / "fresh", patients=2, seed=robustness.SEED, in_plane=64,
                                           slices=8)))
    backend = open_backend(gated_model, device="cpu")
    figures = {}
    for index, name in enumerate(("none", "x1000", "+200", "slices reversed", "x and y reversed", "wider 1 in 3D")):
        folder = tmp_path / f"c{index}"
        folder.mkdir()
        figures[name] = robustness.measure(backend, rows, name, folder, seed=index)
    base = figures["none"]
    assert base["volumes"] == 2 and base["refused"] == 0
    for name in ("x1000", "+200", "slices reversed", "x and y reversed"):
        got = figures[name]
        assert (got["flagged"], got["right"], got["refused"]) == (base["flagged"], base["right"], 0), name
        assert got["median_score"] == pytest.approx(base["median_score"], rel=1e-5), name
    assert figures["wider 1 in 3D"]["median_score"] != base["median_score"]  # a change that does change the crops


def test_main_writes_its_figures_and_refuses_unknown_changes(robustness, gated_model, tmp_path, capsys):
    out = tmp_path / "figures.json"
    args = ["--model", str(gated_model), "--fresh", "1", "--in-plane", "64", "--slices", "8"]
    assert robustness.main([*args, "--changes", "none,narrower 1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["changes"]) == {"none", "narrower 1"} and figures["percentile_inset"] >= 0
    assert "narrower 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        robustness.main([*args, "--changes", "sideways"])
    assert stop.value.code == 2
