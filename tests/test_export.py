"""liverstage export: the inference graph, ONNX export of each backbone, metadata, Triton, CLI errors.

Checkpoints are made directly with build_model + save_checkpoint at crop size 32 (no training:
graph and parity do not need it); their BatchNorm statistics are set from real phantom crops so
activations have realistic magnitudes. The phantoms are synthetic, not patients.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from liverstage.export.graph import InferenceGraph, torch_reference  # noqa: E402
from liverstage.export.onnx_export import export_fp32, op_types, to_bytes  # noqa: E402
from liverstage.export.parity import ort_session, run_session  # noqa: E402
from liverstage.runtime.cli import main  # noqa: E402
from liverstage.runtime.model_meta import METADATA_KEY, ModelMetadata  # noqa: E402
from liverstage.runtime.ood import FAR_OOD_TARGET  # noqa: E402
from liverstage.runtime.spec import PreprocessSpec  # noqa: E402

CROP = 32


def phantom_images(manifest: Path, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    from liverstage.runtime.manifest import read_manifest
    from liverstage.train.data import load_crops

    data = load_crops(read_manifest(manifest), PreprocessSpec(crop_size=CROP))
    index = np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int)
    return data.images[index], data.labels[index]


def realistic_model(backbone: str, loss: str, images: np.ndarray, seed: int = 0):
    """build_model with BatchNorm running statistics taken from real crops (eval mode)."""
    from liverstage.train.model import build_model

    torch.manual_seed(seed)
    net = build_model(backbone, loss)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    net.train()
    with torch.no_grad():
        for start in range(0, len(images), 16):
            net(torch.from_numpy(images[start:start + 16]))
    return net.eval()


def write_checkpoint(path: Path, net, manifest: Path) -> Path:
    from liverstage.train.checkpoint import save_checkpoint

    ids = [row["patient_id"] for row in csv.DictReader(open(manifest, encoding="utf-8"))]
    return save_checkpoint(path, net, preprocess=PreprocessSpec(crop_size=CROP), args={"crop_size": CROP},
                           splits={"train": ids[:6], "val": ids[6:9], "test": ids[9:]}, manifest=manifest,
                           epoch=1, metrics={"accuracy": 0.5})


@pytest.fixture(scope="module")
def crops(small_cohort):
    return phantom_images(small_cohort)


@pytest.fixture(scope="module")
def r18_amcl(crops):
    return realistic_model("resnet18", "amcl", crops[0])


@pytest.fixture(scope="module")
def amcl_checkpoint(tmp_path_factory, small_cohort, r18_amcl):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", r18_amcl, small_cohort)


def run_cli(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = info.value.code if isinstance(info.value.code, int) else (0 if info.value.code is None else 1)
    return code, out, err


def run_cli_ok(args, capsys) -> str:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


# --- graph and export ---------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,loss", [("resnet18", "amcl"), ("resnet50", "softmax")])
def test_onnx_export_matches_torch(backbone, loss, crops, r18_amcl):
    images, _ = crops
    net = r18_amcl if backbone == "resnet18" else realistic_model(backbone, loss, images[:16])
    graph = InferenceGraph(net, scale=net.scale, probs_source="linear" if loss == "softmax" else "cosine")
    model = export_fp32(graph, crop_size=CROP)
    assert [v.name for v in model.graph.input] == ["image"]
    assert [v.name for v in model.graph.output] == ["cosine", "probs", "embedding"]
    assert "Acos" not in op_types(model)
    out = run_session(ort_session(to_bytes(model)), images)
    ref = torch_reference(graph, images)
    assert out["cosine"].shape == (len(images), 3)
    assert out["embedding"].shape == (len(images), net.embedding_dim)
    assert np.abs(out["cosine"] - ref["cosine"]).max() <= 1e-4
    assert np.allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    assert np.allclose(out["probs"].sum(axis=1), 1.0, atol=1e-5)
    with torch.no_grad():  # probs are the checkpoint's own inference scores (no margin)
        logits = net.class_logits(net(torch.from_numpy(images)))
    assert np.abs(out["probs"] - torch.softmax(logits, 1).numpy()).max() < 1e-4


@pytest.mark.slow
def test_onnx_export_vgg16(crops):
    from liverstage.train.model import build_model

    images = crops[0][:3]
    torch.manual_seed(0)
    net = build_model("vgg16", "amcl").eval()
    graph = InferenceGraph(net, scale=net.scale)
    model = export_fp32(graph, crop_size=CROP)
    assert "Acos" not in op_types(model)
    out = run_session(ort_session(to_bytes(model)), images)
    ref = torch_reference(graph, images)
    assert out["embedding"].shape == (3, 4096)
    assert np.abs(out["cosine"] - ref["cosine"]).max() <= 1e-4


def test_cosine_head_has_no_margin(crops, r18_amcl):
    """The deployed cosine is cos(theta) to the normalised weights, whatever the training margin."""
    images, _ = crops
    net = r18_amcl
    graph = InferenceGraph(net, scale=net.scale)
    ref = torch_reference(graph, images[:8])
    with torch.no_grad():
        feature = net(torch.from_numpy(images[:8]))
        expected = torch.nn.functional.normalize(feature, dim=1) @ torch.nn.functional.normalize(net.head.weight, dim=1).t()
    assert np.abs(ref["cosine"] - expected.numpy()).max() < 1e-5
    assert np.allclose(ref["probs"], torch.softmax(30.0 * expected, 1).numpy(), atol=1e-5)


# --- the CLI on a checkpoint --------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(amcl_checkpoint, tmp_path_factory):
    """`liverstage export` fp32 of the amcl checkpoint (run once for several tests)."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    try:
        main(["export", str(amcl_checkpoint), "--out", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out


def test_metadata_round_trip(exported, amcl_checkpoint):
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta.class_names == ("A", "B", "C")
    assert meta.preprocess == PreprocessSpec(crop_size=CROP)
    assert (meta.backbone, meta.loss, meta.precision, meta.probs_source) == ("resnet18", "amcl", "fp32", "cosine")
    assert meta.scale == 30.0 and meta.margin == 0.5 and meta.embedding_dim == 512
    assert meta.checkpoint_sha256 == hashlib.sha256(amcl_checkpoint.read_bytes()).hexdigest()
    assert Path(meta.extra["checkpoint_path"]) == amcl_checkpoint.resolve()
    assert {"torch", "onnx", "onnxruntime"} <= set(meta.versions)
    assert meta.ood is not None and all(meta.ood[part]["threshold"] > 0 for part in ("embedding", "image"))
    assert meta.ood["fit"]["bank_regions"] == "mask"  # the phantom manifest's rows all have masks
    assert meta.temperature > 0
    # The same through the ONNX file itself.
    props = {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert ModelMetadata.from_json(props[METADATA_KEY]) == meta


def test_region_kind_of_manifest_rows():
    """How the bank's rows gave their liver regions; predict words its reasons by it (runtime/ood.py)."""
    from types import SimpleNamespace

    from liverstage.export.data import region_kind

    with_mask, without = SimpleNamespace(mask=Path("m.nii.gz")), SimpleNamespace(mask=None)
    assert region_kind([with_mask, with_mask]) == "mask"
    assert region_kind([without]) == "auto"
    assert region_kind([with_mask, without]) == "mixed"


def test_export_writes_parity_and_card(exported):
    parity = json.loads(exported.with_name(exported.name + ".parity.json").read_text())
    assert parity["precision"] == "fp32"
    assert parity["n_crops"] > 0 and parity["max_abs_delta_cosine"] <= 1e-4
    assert parity["stage_agreement"] == 1.0 and parity["targets_met"] is True
    assert "validation/test patients" in parity["source"]
    assert (exported.parent / "MODEL_CARD.md").is_file()
    card = json.loads((exported.parent / "model_card.json").read_text())
    assert card["exports"][0]["file"] == exported.name
    # The gate's figures travel in the parity JSON and the card; its banks only inside the model.
    gate = parity["ood_gate"]
    assert 0.0 <= gate["held_out_false_alarms"]["volumes"] <= 1.0 and gate["far_ood"]["volumes"] > 0
    assert "Out-of-distribution gate" in (exported.parent / "MODEL_CARD.md").read_text()
    assert "bank crops cut from liver masks" in (exported.parent / "MODEL_CARD.md").read_text()
    # The measured detection travels in the model too (predict warns below the target), and a
    # gate below the target is a warning in the figures and on the card.
    meta = ModelMetadata.from_json(ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
                                   .get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta.ood["fit"]["far_ood_detection"] == pytest.approx(gate["far_ood"]["detection"])
    assert gate["far_ood_target"] == FAR_OOD_TARGET
    assert (gate["warning"] is None) == (gate["far_ood"]["detection"] >= FAR_OOD_TARGET)
    assert ("WARNING:" in (exported.parent / "MODEL_CARD.md").read_text()) == (gate["warning"] is not None)
    for text in (json.dumps(parity), json.dumps(card), (exported.parent / "MODEL_CARD.md").read_text()):
        assert "base64" not in text


def test_a_gate_below_its_detection_target_is_a_warning():
    """The export-time warning for a gate that misses the far-out-of-distribution target: the
    measured rate, the kinds it missed most, and, where the bank's crops were cut with --roi auto,
    what to do (a model trained on crops cut both ways measured 68% on the demo's phantoms)."""
    from liverstage.export.ood_fit import detection_shortfall, format_figures

    kinds = {"noise": {"detection": 1.0}, "spleen": {"detection": 1 / 3}, "below_liver": {"detection": 0.0},
             "inverted": {"detection": 0.5}, "brain_mri": {"detection": 0.75}}
    figures = {"method": "m", "k": 5, "false_alarm_rate_target": 0.02,
               "fit": {"source": "s", "bank_crops": 10, "threshold_crops": 5, "threshold_patients": 2,
                       "bank_regions": "mask"},
               "far_ood": {"kinds": kinds, "volumes": 34, "detection": 0.676}}
    text = detection_shortfall(figures)
    assert "flagged or refused 67.6% of 34 far-out-of-distribution volumes, below the target of 99%" in text
    assert "(missed most: below_liver 0%, spleen 33%, inverted 50%)" in text and "--roi auto" not in text
    figures["fit"]["bank_regions"] = "mixed"
    assert detection_shortfall(figures).endswith("train on crops cut from liver masks")
    figures["warning"] = detection_shortfall(figures)
    assert "  WARNING: the out-of-distribution gate flagged" in format_figures(figures)
    figures["far_ood"]["detection"] = FAR_OOD_TARGET
    assert detection_shortfall(figures) is None
    figures["far_ood"] = {"kinds": {}, "volumes": 0, "detection": None}
    assert detection_shortfall(figures) is None


def test_cli_strict_fails_on_a_gate_below_its_target(amcl_checkpoint, tmp_path, capsys, monkeypatch):
    """--strict: a gate below the detection target exits 1 (as a missed parity target does), with
    one warning line; the files are still written, as for parity, so they can be inspected."""
    import liverstage.export.ood_fit as ood_fit

    monkeypatch.setattr(ood_fit, "FAR_OOD_TARGET", 1.01)  # no gate can reach it
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(["export", amcl_checkpoint, "--out", out, "--strict"], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("liverstage: warning:")]
    assert len(lines) == 1 and "below the target of 101%" in lines[0] and "Traceback" not in err
    assert out.is_file() and json.loads(out.with_name(out.name + ".parity.json").read_text())["ood_gate"]["warning"]


def test_batch_1_and_batch_7_agree(exported, crops):
    images = crops[0][:7]
    session = ort_session(str(exported))
    together = run_session(session, images, batch_size=7)
    one_by_one = run_session(session, images, batch_size=1)
    for name in ("cosine", "probs", "embedding"):
        assert np.abs(together[name] - one_by_one[name]).max() < 1e-5


def test_triton_repository(amcl_checkpoint, tmp_path, capsys):
    repo = tmp_path / "repo"
    run_cli_ok(["export", amcl_checkpoint, "--out", repo, "--format", "triton", "--model-name", "staging",
                "--batch-opt", "8", "--batch-max", "32", "--no-calibrate-temperature"], capsys)
    model_dir = repo / "staging"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "1", "MODEL_CARD.md", "config.pbtxt", "model.onnx.parity.json", "model_card.json"]
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 32" in config
    assert "dynamic_batching" in config
    for name, dims in (("image", f"[ 1, {CROP}, {CROP} ]"), ("cosine", "[ 3 ]"), ("probs", "[ 3 ]"),
                       ("embedding", "[ 512 ]")):
        assert f'name: "{name}"' in config and dims in config
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["cosine", "probs", "embedding"]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temporary left


def test_failed_triton_write_leaves_nothing(tmp_path, tiny_onnx):
    from liverstage.export.triton import write_repository

    model = tiny_onnx.build_tiny_onnx(tmp_path / "tiny.onnx", crop_size=32).read_bytes()

    def killed(folder):
        (folder / "model_card.json").write_text("{")  # half-way through the extras
        raise KeyboardInterrupt

    repo = tmp_path / "repo"
    with pytest.raises(KeyboardInterrupt):
        write_repository(repo, "staging", model_bytes=model, config_text="name: x", write_extras=killed)
    assert not repo.exists() or list(repo.iterdir()) == []
    # a successful rewrite replaces the folder whole
    write_repository(repo, "staging", model_bytes=model, config_text="name: x")
    assert sorted(p.name for p in (repo / "staging").iterdir()) == ["1", "config.pbtxt"]
    assert (repo / "staging" / "1" / "model.onnx").read_bytes() == model


# --- bad input: one line, non-zero exit, nothing written ----------------------------------------

@pytest.fixture()
def bad_files(tmp_path):
    not_ours = tmp_path / "not_ours.pt"
    torch.save({"state_dict": {}, "epoch": 3}, not_ours)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    return {"not_ours": not_ours, "corrupt": corrupt}


@pytest.mark.parametrize("case,extra,needle", [
    ("not_ours", [], "not a liverstage checkpoint"),
    ("corrupt", [], "not a readable liverstage checkpoint"),
    ("missing", [], "not found"),
    ("good", ["--precision", "fp8"], "unknown precision"),
    ("good", ["--engine", "tflite"], "unknown engine"),
    ("good", ["--batch-min", "8", "--batch-opt", "4"], "--batch-min 8 is larger than --batch-opt 4"),
    ("good", ["--batch-opt", "128", "--batch-max", "64"], "--batch-opt 128 is larger than --batch-max 64"),
    ("good", ["--batch-min", "0"], "--batch-min must be an integer >= 1"),
    ("good", ["--format", "zip"], "unknown format"),
])
def test_cli_bad_input(case, extra, needle, bad_files, amcl_checkpoint, tmp_path, capsys):
    checkpoint = {"missing": tmp_path / "nope.pt", "good": amcl_checkpoint}.get(case) or bad_files[case]
    out = tmp_path / "out" / "model.onnx"
    code, _, err = run_cli(["export", checkpoint, "--out", out, *extra], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not out.parent.exists()


def test_cli_out_suffix_is_checked(amcl_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["export", amcl_checkpoint, "--out", tmp_path / "model.bin"], capsys)
    assert code != 0 and "must end with .onnx" in err and len(err.strip().splitlines()) == 1
