"""`liverstage evaluate RUN/model.pt --manifest M [--patients FILE] [--out metrics.json]`."""

import csv
import json

import numpy as np
import pytest
import torch

from liverstage.runtime.cli import main
from liverstage.runtime.manifest import read_manifest
from liverstage.runtime.spec import PreprocessSpec
from liverstage.phantoms.synth import synth_cohort
from liverstage.train.checkpoint import load_checkpoint, save_checkpoint
from liverstage.train.data import load_crops
from liverstage.train.evaluate import predict_crops
from liverstage.train.metrics import compute_metrics
from liverstage.train.model import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest = synth_cohort(root / "phantoms", patients=6, seed=2, in_plane=64, slices=10)
    torch.manual_seed(0)
    model = build_model("resnet18", "amcl").eval()
    path = save_checkpoint(root / "model.pt", model, preprocess=PreprocessSpec(crop_size=32), args={},
                           splits={"train": [], "val": [], "test": []}, manifest=manifest, epoch=0)
    return manifest, path, root


def _run(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_evaluate_writes_metrics_and_predictions(setup, tmp_path, capsys):
    manifest, model_path, root = setup
    code = _run(["evaluate", str(model_path), "--manifest", str(manifest), "--out", str(tmp_path / "m.json"),
                 "--predictions", str(tmp_path / "p.csv"), "--cache-dir", str(root / "cache")])
    assert code == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["n_crops"] and metrics["n_patients"] == 6
    # Same numbers as computing them directly from the model and the crops.
    model, _ = load_checkpoint(model_path)
    data = load_crops(read_manifest(manifest), PreprocessSpec(crop_size=32))
    raw = predict_crops(model, data.images)
    direct = compute_metrics(data.labels, raw["probs"], data.patient_ids.tolist())
    assert metrics["accuracy"] == pytest.approx(direct["accuracy"])
    assert metrics["confusion"] == direct["confusion"]
    assert np.allclose([[float(r[f"prob_{s}"]) for s in "ABC"] for r in rows], raw["probs"], atol=1e-5)


def test_evaluate_patient_subset(setup, tmp_path):
    manifest, model_path, root = setup
    ids = [r.patient_id for r in read_manifest(manifest)][:2]
    (tmp_path / "ids.txt").write_text("# two patients\n" + "\n".join(ids) + "\n\n")
    assert _run(["evaluate", str(model_path), "--manifest", str(manifest), "--patients", str(tmp_path / "ids.txt"),
                 "--out", str(tmp_path / "m.json"), "--cache-dir", str(root / "cache")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n_patients"] == 2


@pytest.mark.parametrize("case", ["corrupt", "unknown-patient", "no-model"])
def test_evaluate_errors_are_one_line(setup, tmp_path, capsys, case):
    manifest, model_path, root = setup
    model = model_path
    argv_extra = []
    if case == "corrupt":
        model = tmp_path / "bad.pt"
        model.write_bytes(model_path.read_bytes()[:5000])
    elif case == "unknown-patient":
        (tmp_path / "ids.txt").write_text("nobody\n")
        argv_extra = ["--patients", str(tmp_path / "ids.txt")]
    else:
        model = tmp_path / "absent.pt"
    code = _run(["evaluate", str(model), "--manifest", str(manifest), *argv_extra, "--out", str(tmp_path / "m.json")])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("liverstage: error:")
    assert not (tmp_path / "m.json").exists()
