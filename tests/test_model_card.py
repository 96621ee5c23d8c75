"""The model card written beside every export (MODEL_CARD.md + model_card.json)."""

from __future__ import annotations

import csv
import json

import pytest

from liverstage.export import model_card
from liverstage.runtime.model_meta import ModelMetadata
from liverstage.runtime.spec import PreprocessSpec
from liverstage.train.checkpoint import Checkpoint, Splits


def metadata(sha: str = "1" * 64, precision: str = "fp32") -> ModelMetadata:
    return ModelMetadata(
        class_names=("A", "B", "C"), preprocess=PreprocessSpec(crop_size=48), backbone="resnet18", loss="dr-amcl",
        scale=30.0, margin=0.5, temperature=2.5, probs_source="cosine", precision=precision, embedding_dim=512,
        checkpoint_sha256=sha, versions={"liverstage": "0.1.0", "torch": "2.x"},
    )


@pytest.fixture()
def stages(small_cohort):
    return {r["patient_id"]: r["stage"] for r in csv.DictReader(open(small_cohort, encoding="utf-8"))}


@pytest.fixture()
def ckpt(small_cohort, stages):
    ids = list(stages)
    return Checkpoint(
        state_dict={}, backbone="resnet18", loss="dr-amcl", scale=30.0, margin=0.5, embedding_dim=512,
        preprocess=PreprocessSpec(crop_size=48), epoch=7, manifest=str(small_cohort),
        splits=Splits(train=tuple(ids[:8]), val=tuple(ids[8:10]), test=tuple(ids[10:])),
        metrics={"accuracy": 0.61, "f1_A": 0.5, "kappa_quadratic": {"mean": 0.4, "std": 0.05},
                 "confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]},
        args={"manifest": str(small_cohort)},
    )


PARITY = {"n_crops": 40, "max_abs_delta_cosine": 3e-3, "stage_agreement": 0.975, "accuracy_delta": -0.025}


def test_card_contents(ckpt, stages, tmp_path):
    card = model_card.build_card(meta=metadata(), ckpt=ckpt, model_file="m.onnx", parity=PARITY, engine="onnxruntime")
    data = card["training_data"]
    assert data["phantoms"] is True  # the small cohort is synthetic
    assert data["patients_per_split"] == {"train": 8, "val": 2, "test": 2}
    expected = {stage: sum(1 for p in ckpt.splits.train if stages[p] == stage) for stage in "ABC"}
    assert data["patients_per_stage"]["train"] == expected
    assert card["eval_metrics"]["accuracy"] == 0.61
    assert card["eval_metrics"]["kappa_quadratic"] == {"mean": 0.4, "std": 0.05}  # spread kept
    assert "confusion" not in card["eval_metrics"]
    assert card["preprocess"]["crop_size"] == 48
    inputs, outputs = card["network_data_format"]["inputs"], card["network_data_format"]["outputs"]
    assert inputs["image"]["shape"] == ["N", 1, 48, 48] and inputs["image"]["dtype"] == "float32"
    assert outputs["embedding"]["shape"] == ["N", 512] and set(outputs) == {"cosine", "probs", "embedding"}
    assert any("not a medical device" in line for line in card["limits"])

    md_path, json_path = model_card.write_card(tmp_path, card)
    md = md_path.read_text()
    assert "synthetic phantoms, not patients" in md and "not a medical device" in md
    assert "| m.onnx | onnxruntime | fp32 | 40 | 0.003 | 97.50% | -2.50 points |" in md
    assert json.loads(json_path.read_text())["name"] == "liverstage resnet18 dr-amcl"


def test_card_without_reachable_manifest_is_not_phantom(ckpt):
    ckpt = ckpt.replace(manifest="/nowhere/manifest.csv", args={})
    data = model_card.build_card(meta=metadata(), ckpt=ckpt, model_file="m.onnx", parity=None,
                                 engine="onnxruntime")["training_data"]
    assert data["phantoms"] is False and "patients_per_stage" not in data
    assert data["patients_per_split"]["train"] == 8


def test_exports_of_one_checkpoint_share_a_card(ckpt, tmp_path):
    for name, precision in (("m32.onnx", "fp32"), ("m8.onnx", "int8")):
        (tmp_path / name).write_bytes(b"model")
        card = model_card.build_card(meta=metadata(precision=precision), ckpt=ckpt, model_file=name,
                                     parity=PARITY, engine="onnxruntime")
        model_card.write_card(tmp_path, card)
    files = [e["file"] for e in json.loads((tmp_path / "model_card.json").read_text())["exports"]]
    assert files == ["m32.onnx", "m8.onnx"]
    # a file that is gone drops out; another checkpoint replaces the card
    (tmp_path / "m32.onnx").unlink()
    card = model_card.build_card(meta=metadata(), ckpt=ckpt, model_file="m16.onnx", parity=None, engine="onnxruntime")
    model_card.write_card(tmp_path, card)
    files = [e["file"] for e in json.loads((tmp_path / "model_card.json").read_text())["exports"]]
    assert files == ["m8.onnx", "m16.onnx"]
    other = model_card.build_card(meta=metadata(sha="2" * 64), ckpt=ckpt, model_file="x.onnx", parity=None,
                                  engine="onnxruntime")
    model_card.write_card(tmp_path, other)
    assert [e["file"] for e in json.loads((tmp_path / "model_card.json").read_text())["exports"]] == ["x.onnx"]
