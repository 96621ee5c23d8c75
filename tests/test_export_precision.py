"""FP16 and INT8 exports against PyTorch fp32 on phantom crops (synthetic, not patients).

Uses one briefly trained ResNet18 + AMCL checkpoint (crop 32, 2 epochs on the small phantom
cohort): trained BatchNorm statistics and features are what the precisions must survive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from liverstage.export.api import ExportOptions, export_checkpoint  # noqa: E402
from liverstage.export.graph import FEATURE_TENSOR  # noqa: E402
from liverstage.export.onnx_export import downstream_nodes, float32_island  # noqa: E402

CROP = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_cohort):
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.config import RunConfig
    from liverstage.train.trainer import train_run

    base = tmp_path_factory.mktemp("trained")
    run = train_run(RunConfig(manifest=small_cohort, out=base / "run", backbone="resnet18", loss="amcl",
                              epochs=2, preprocess=PreprocessSpec(crop_size=CROP), batch_size=16, lr=1e-3,
                              val_fraction=0.2, progress=False, cache_dir=base / "cache"), log=lambda line: None)
    return run / "model.pt"


def export(checkpoint, out, **options):
    lines: list[str] = []
    result = export_checkpoint(checkpoint, out, ExportOptions(**options), echo=lines.append)
    return result, "\n".join(lines)


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def test_fp16_parity_and_float32_head(trained, tmp_path):
    result, log = export(trained, tmp_path / "m16.onnx", precision="fp16")
    parity = result.parity
    assert parity["finite"] and parity["max_abs_delta_cosine"] <= 1e-2, log
    assert parity["stage_agreement"] >= 0.98
    large = parity["large_norm"]
    assert large["finite"], log
    assert large["max_feature_norm"] > 256 * 4  # its squared norm is far past FP16's 65504
    assert not result.failures
    model = onnx.load(str(result.model_path))
    types = float_types(model)
    assert types["image"] == onnx.TensorProto.FLOAT
    assert all(types[o.name] == onnx.TensorProto.FLOAT for o in model.graph.output)
    # the backbone runs in FP16 ...
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    # ... and every head tensor (sum of squares, norm, cosine, softmax) is float32
    head = set(float32_island(model))
    assert head and head == set(downstream_nodes(model, FEATURE_TENSOR))
    for node in model.graph.node:
        if node.name in head:
            assert all(types[name] != onnx.TensorProto.FLOAT16 for name in (*node.input, *node.output) if name), node.name
            assert types[node.output[0]] in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64), node.name
    assert json.loads(Path(str(result.model_path) + ".parity.json").read_text())["precision"] == "fp16"
    # the gate reads the embedding: close to float32's on random crops and finite on bright ones
    from liverstage.export.parity import large_norm_inputs  # noqa: PLC0415
    from liverstage.runtime.backends import open_backend  # noqa: PLC0415

    fp32, _ = export(trained, tmp_path / "m32.onnx", precision="fp32")
    images = np.random.default_rng(0).standard_normal((8, 1, CROP, CROP)).astype(np.float32)
    bright = large_norm_inputs(images, crop_size=CROP)
    for batch in (images, bright):
        got = open_backend(result.model_path).run(batch)["embedding"]
        want = open_backend(fp32.model_path).run(batch)["embedding"]
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= 2e-2


def test_int8_agreement_and_accuracy(trained, tmp_path):
    result, log = export(trained, tmp_path / "m8.onnx", precision="int8")
    parity = result.parity
    assert parity["stage_agreement"] >= 0.98, log
    assert abs(parity["accuracy_delta"]) <= 0.01, log
    assert parity["n_crops"] >= 20 and not result.failures
    model = onnx.load(str(result.model_path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # per-channel weights: some DequantizeLinear has a vector of scales
    inits = {t.name: t for t in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
                   and len(onnx.numpy_helper.to_array(inits[n.input[1]]).shape) == 1
                   and onnx.numpy_helper.to_array(inits[n.input[1]]).size > 1]
    assert per_channel
    assert result.metadata.precision == "int8"


def test_phantom_fallback_without_manifest(tmp_path, small_cohort):
    """A checkpoint whose manifest is gone is checked on freshly generated phantoms."""
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.checkpoint import save_checkpoint
    from liverstage.train.model import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "orphan.pt", build_model("resnet18", "asm").eval(),
                           preprocess=PreprocessSpec(crop_size=CROP), args={}, splits={"train": ["x"]},
                           manifest=tmp_path / "gone" / "manifest.csv", epoch=0)
    result, log = export(ckpt, tmp_path / "o.onnx")
    assert "freshly generated phantoms" in result.parity["source"], log
    assert result.parity["max_abs_delta_cosine"] <= 1e-4
    assert result.metadata.ood is None  # no in-distribution crops reachable: no gate
    assert result.parity["ood_gate"]["gate"] is None


def test_calibration_manifest_is_used(trained, tmp_path, small_cohort):
    from liverstage.runtime.manifest import read_manifest

    rows = read_manifest(small_cohort)
    picked = {}
    for row in rows:  # two patients per stage
        if sum(r.stage == row.stage for r in picked.values()) < 2:
            picked[row.patient_id] = row
    manifest = tmp_path / "calibration.csv"
    manifest.write_text("patient_id,image,mask,stage\n" + "".join(
        f"{r.patient_id},{r.image},{r.mask},{r.stage}\n" for r in picked.values()))
    result, log = export(trained, tmp_path / "c.onnx", calibration_manifest=manifest, calibrate_temperature=True)
    assert result.parity["source"] == str(manifest)
    assert result.parity["n_crops"] > 20
    assert result.metadata.temperature != 1.0 and "temperature_fit" in result.metadata.extra
    assert result.metadata.extra["temperature_fit"]["source"] == str(manifest)


def test_temperature_fit_recovers_known_temperature():
    from liverstage.export.calibration import fit_temperature, nll

    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 6.0, size=(4000, 3))
    true_t = 3.0
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(logits, labels)
    assert abs(t - true_t) / true_t < 0.1
    assert nll(logits, labels, t) < nll(logits, labels, 1.0)
