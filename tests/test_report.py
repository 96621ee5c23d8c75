"""The predict report: its exact schema, atomic writes, CSV, PNG, stdout table."""

import csv
import json

import numpy as np
import pytest

from liverstage.runtime.aggregate import aggregate
from liverstage.runtime.ood import NO_GATE, CropScores, OodVerdict
from liverstage.runtime.predict import PredictRun, Preview, VolumeResult
from liverstage.runtime.report import (build_report, file_sha256, print_table, write_crops_csv, write_png,
                                       write_report)


def make_run(n_crops=4, uncertain=False):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n_crops, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cosine = rng.uniform(-1, 1, size=(n_crops, 3))
    scores = CropScores(embedding=rng.uniform(0, 1, n_crops), image=rng.uniform(0, 1, n_crops),
                        score=rng.uniform(0, 2, n_crops))
    median = float(np.median(scores.score))
    verdict = OodVerdict(uncertain=uncertain, reason="crops look unlike the training crops" if uncertain else None,
                         score=median, threshold=1.0, atypical_crops=int((scores.score > 1).sum()))
    result = VolumeResult(
        input="/data/case1.nii.gz",
        verdict=aggregate(probs, ood=verdict),
        slices=np.arange(3, 3 + n_crops), boxes=np.tile([1, 2, 21, 22], (n_crops, 1)),
        probs=probs, cosine=cosine,
        timing={"load": 0.1, "preprocess": 0.2, "inference": 0.3, "ood": 0.01, "total": 0.61},
        warnings=["a warning"],
        preview=Preview(image=rng.random((30, 30)).astype(np.float32), slice=4, box=(1, 2, 21, 22)),
        ood_scores=scores,
    )
    model = {"path": "/m/model.onnx", "sha256": "ab" * 32, "backend": "onnxruntime-cpu", "precision": "fp32"}
    return PredictRun(model=model, results=[result], errors=[("/data/bad.nii.gz", "volume not found: /data/bad.nii.gz")])


def test_schema_is_exactly_the_documented_one(tmp_path):
    run = make_run()
    path = tmp_path / "sub" / "report.json"
    write_report(path, run)
    data = json.loads(path.read_text())
    assert set(data) == {"liverstage_version", "model", "results", "errors"}
    assert set(data["model"]) == {"path", "sha256", "backend", "precision"}
    r = data["results"][0]
    assert set(r) == {"input", "stage", "stage_name", "probabilities", "uncertain", "uncertain_reason", "ood_score",
                      "ood_threshold", "region", "region_side", "air_share", "crops", "timing_s", "warnings"}
    assert set(r["probabilities"]) == {"A", "B", "C"}
    assert set(r["timing_s"]) == {"load", "preprocess", "inference", "ood", "total"}
    assert set(r["crops"][0]) == {"slice", "bbox", "probabilities", "max_cosine", "ood_score"}
    assert data["errors"] == [{"input": "/data/bad.nii.gz", "error": "volume not found: /data/bad.nii.gz"}]
    # Values: stage name, the mean probability, each crop's max cosine.
    res = run.results[0]
    assert r["stage"] == res.verdict.stage and r["stage_name"] == {"A": "early", "B": "middle", "C": "last"}[r["stage"]]
    np.testing.assert_allclose([r["probabilities"][s] for s in "ABC"], res.probs.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose([c["max_cosine"] for c in r["crops"]], res.cosine.max(axis=1), atol=1e-6)
    assert [c["slice"] for c in r["crops"]] == [3, 4, 5, 6] and r["crops"][0]["bbox"] == [1, 2, 21, 22]
    assert isinstance(r["uncertain"], bool)
    np.testing.assert_allclose([c["ood_score"] for c in r["crops"]], res.ood_scores.score, atol=1e-6)
    assert r["ood_score"] == pytest.approx(np.median(res.ood_scores.score), abs=1e-6) and r["ood_threshold"] == 1.0
    # Nothing else left in the folder (atomic write: no temporaries).
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_report_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")
    run = make_run()
    run.results[0].timing["total"] = float("nan")  # JSON refuses NaN (allow_nan=False) mid-write
    with pytest.raises(ValueError):
        write_report(path, run)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_crops_csv(tmp_path):
    run = make_run()
    write_crops_csv(tmp_path / "c.csv", run)
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert len(rows) == 4
    res = run.results[0]
    for i, row in enumerate(rows):
        assert int(row["slice"]) == res.slices[i]
        assert row["predicted"] == "ABC"[int(np.argmax(res.probs[i]))]
        assert float(row["prob_B"]) == pytest.approx(res.probs[i, 1], abs=1e-6)
        assert float(row["cos_C"]) == pytest.approx(res.cosine[i, 2], abs=1e-6)


def test_png_and_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = make_run()
    write_png(tmp_path / "s.png", run)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from rich.console import Console

    console = Console(width=120, record=True)
    print_table(run, console=console)
    text = console.export_text()
    assert "case1.nii.gz" in text and "bad.nii.gz" in text and "volume not found" in text


def test_file_sha256(tmp_path):
    import hashlib

    (tmp_path / "f").write_bytes(b"x" * 3_000_000)
    assert file_sha256(tmp_path / "f", chunk=1000) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_build_report_without_errors():
    run = make_run()
    run.errors.clear()
    assert build_report(run)["errors"] == []


def test_table_shows_uncertain_instead_of_a_stage():
    from rich.console import Console

    for uncertain in (False, True):
        run = make_run(uncertain=uncertain)
        console = Console(width=200, record=True)
        print_table(run, console=console)
        text = console.export_text()
        stage = run.results[0].verdict.stage
        row = next(line for line in text.splitlines() if "case1.nii.gz" in line and "│" in line)
        assert ("uncertain" in row) is uncertain
        assert (f"{stage} " in row) is not uncertain  # the stage letter and name only when certain
        assert ("crops look unlike the training crops" in text) is uncertain  # the reason, below the table
    report = build_report(make_run(uncertain=True))["results"][0]
    assert report["uncertain"] is True and report["uncertain_reason"] == "crops look unlike the training crops"
    assert report["stage"] in "ABC"  # the model's answer is kept in the report, flagged


def test_report_of_a_model_without_gate():
    run = make_run()
    result = run.results[0]
    run.results[0] = VolumeResult(input=result.input, verdict=aggregate(result.probs, ood=NO_GATE),
                                  slices=result.slices, boxes=result.boxes, probs=result.probs, cosine=result.cosine,
                                  timing=result.timing, warnings=[], ood_scores=None)
    r = build_report(run)["results"][0]
    assert r["uncertain"] is True and "no out-of-distribution gate" in r["uncertain_reason"]
    assert r["ood_score"] is None and all(c["ood_score"] is None for c in r["crops"])
    json.dumps(build_report(run), allow_nan=False)  # strict JSON
