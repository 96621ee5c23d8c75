"""The fuzz harness (benchmarks/fuzz_inputs.py) on a few hundred mutated inputs.

Runs `predict` on mutated NIfTI headers, voxel bytes and gzip streams and on mutated DICOM series
made from a phantom (synthetic, not a patient), in two worker processes, with the tiny gated
model. Targets: no traceback, no hang, no corrupt file staged as intact, no partial
output. The lead's full run: `python benchmarks/fuzz_inputs.py --cases 10000` (README).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def fuzz(benchmark_module):
    """benchmarks/fuzz_inputs.py as the module `fuzz_inputs` (spawned workers import it by that name)."""
    return benchmark_module("fuzz_inputs")


@pytest.mark.slow
def test_a_few_hundred_cases_and_resume(fuzz, gated_model, tmp_path):
    out = tmp_path / "fuzz"
    first = fuzz.run(gated_model, out, cases=40, seed=1, workers=2, timeout=60, log=lambda s: None)
    summary = fuzz.run(gated_model, out, cases=300, seed=1, workers=2, timeout=60, log=lambda s: None)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["case"] for r in rows) == list(range(300))  # resumed: the first 40 were not run again
    assert first["cases"] == 40 and summary["cases"] == 300
    assert summary["failures"] == {k: 0 for k in fuzz.FAILURES}, json.dumps(summary["examples"], indent=1)
    outcomes = summary["outcomes"]
    assert outcomes["refused"] > 50 and outcomes["staged"] + outcomes["uncertain"] > 50  # both kinds exercised
    assert set(summary["by_target"]) == set(fuzz.TARGETS)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_truth_of_gzip_mutations(fuzz):
    import gzip

    content = bytes(range(256)) * 40
    packed = gzip.compress(content, mtime=0)
    assert fuzz.gzip_truth(packed, content, len(content)) == "intact"
    flipped = bytearray(packed)
    flipped[-6] ^= 0xFF  # inside the CRC-32
    assert fuzz.gzip_truth(bytes(flipped), content, len(content)) == "corrupt"
    assert fuzz.gzip_truth(packed[:-3], content, len(content)) == "corrupt"
    assert fuzz.gzip_truth(packed + gzip.compress(b"xyz"), content, len(content)) == "trailing"


@pytest.mark.slow
def test_a_hang_is_counted_and_its_worker_replaced(fuzz, gated_model, tmp_path):
    summary = fuzz.run(gated_model, tmp_path / "hang", cases=3, seed=2, workers=1, timeout=0.01, log=lambda s: None)
    assert summary["outcomes"]["hang"] == 3 and summary["failures"]["hang"] == 3
