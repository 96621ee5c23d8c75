"""Same seeds, same results: a fixed-seed CPU run (phantoms, training, metrics) against the stored
reference in tests/data (made with tests/_reference.py). Phantom files must be byte-identical,
metrics, history and predictions equal exactly, the final weights bit-identical."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the reference run trains a model (train extra)")


@pytest.fixture(scope="module")
def stored(reference):
    return json.loads(reference.REFERENCE_JSON.read_text())


@pytest.fixture(scope="module")
def run(reference, tmp_path_factory):
    return reference.make_run(tmp_path_factory.mktemp("reference"))


def _skip_unless_same(reference, stored, *names: str) -> None:
    here = reference.versions()
    differ = [f"{n} {stored['versions'].get(n)} (reference) vs {here[n]} (here)" for n in names
              if stored["versions"].get(n) != here[n]]
    if differ:
        pytest.skip("bit-identical figures need the reference's library versions and CPU vendor: " + "; ".join(differ))


@pytest.mark.slow
def test_phantom_files_are_byte_identical(reference, stored, run):
    _skip_unless_same(reference, stored, "numpy", "nibabel", "zlib")
    assert reference.summarise(run)["phantom_sha256"] == stored["phantom_sha256"]


@pytest.mark.slow
def test_training_gives_the_stored_metrics_history_predictions_and_weights(reference, stored, run):
    _skip_unless_same(reference, stored, "numpy", "nibabel", "zlib", "torch", "cpu")
    now = reference.summarise(run)
    assert now["metrics"] == stored["metrics"]
    assert now["history"] == stored["history"]
    assert (run / "run" / "predictions.csv").read_bytes() == reference.REFERENCE_PREDICTIONS.read_bytes()
    assert now["weights_sha256"] == stored["weights_sha256"]
