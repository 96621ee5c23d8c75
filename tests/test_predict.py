"""`liverstage predict`: staging, masks, orientation invariance, overlap, and every bad input."""

import gzip
import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from liverstage.runtime.aggregate import aggregate
from liverstage.runtime.backends import open_backend
from liverstage.runtime.cli import main
from liverstage.runtime.crops import crops_for_volume
from liverstage.runtime.errors import InputError
from liverstage.runtime.ood import NO_GATE
from liverstage.runtime.predict import Predictor, find_mask, resolve_inputs
from liverstage.runtime.stages import STAGES

LIVER_LABEL = 5  # TotalSegmentator total_mr's liver label, to exercise --mask-label


def write_phantom(folder, name="case1", *, seed=0, shape=(40, 36, 12), ornt=None):
    """A small noisy volume with an off-centre ellipsoid 'liver' and a multi-label mask.

    `ornt` (nibabel orientation) stores the same anatomy in another axis order/flip, with the
    affine to match.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    liver = ((x - 15) / 10) ** 2 + ((y - 20) / 8) ** 2 + ((z - 6) / 7) ** 2 < 1
    spleen = ((x - 32) / 4) ** 2 + ((y - 12) / 4) ** 2 + ((z - 6) / 4) ** 2 < 1
    data = (rng.normal(80, 15, shape) + 220 * liver + rng.normal(0, 40, shape) * liver + 120 * spleen).astype(np.float32)
    labels = np.where(liver, LIVER_LABEL, np.where(spleen, 1, 0)).astype(np.uint8)
    affine = np.array([[1.4, 0, 0, -30], [0, 1.4, 0, -20], [0, 0, 5.0, 10], [0, 0, 0, 1]])
    img, mask = nib.Nifti1Image(data, affine), nib.Nifti1Image(labels, affine)
    if ornt is not None:
        img, mask = img.as_reoriented(ornt), mask.as_reoriented(ornt)
    folder.mkdir(parents=True, exist_ok=True)
    vpath, mpath = folder / f"{name}.nii.gz", folder / f"{name}_mask.nii.gz"
    nib.save(img, vpath)
    nib.save(mask, mpath)
    return vpath, mpath


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_predict_one_volume(tmp_path, tiny_model, capsys):
    vol, mask = write_phantom(tmp_path)
    report, csv_path, png = tmp_path / "out" / "r.json", tmp_path / "c.csv", tmp_path / "s.png"
    code, out, err = run_cli(["predict", str(vol), "--model", str(tiny_model), "--mask", str(mask),
                              "--mask-label", str(LIVER_LABEL), "--report", str(report), "--csv", str(csv_path),
                              "--png", str(png), "--batch-size", "3"], capsys)
    assert code == 0, err
    assert "case1.nii.gz" in out  # the stdout table
    result = json.loads(report.read_text())["results"][0]

    # Independent reference: the same crops through the same model, averaged by hand.
    backend = open_backend(tiny_model, device="cpu")
    crops = crops_for_volume(vol, spec=backend.metadata.preprocess, mask=mask, mask_label=LIVER_LABEL)
    probs = backend.run(crops.images)["probs"].astype(np.float64)
    mean = probs.mean(axis=0)
    assert result["stage"] == STAGES[int(np.argmax(mean))]
    np.testing.assert_allclose([result["probabilities"][s] for s in STAGES], mean, atol=1e-5)
    assert [c["slice"] for c in result["crops"]] == crops.slices.tolist()
    assert [c["bbox"] for c in result["crops"]] == crops.boxes.tolist()
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 1 + len(crops.slices)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_volume_any_axis_order(tmp_path, tiny_model):
    """Stored transposed and flipped (consistent affine): same stage, same probabilities."""
    backend = open_backend(tiny_model, device="cpu")
    reference = None
    for i, ornt in enumerate([None, [[2, -1], [0, 1], [1, -1]], [[1, 1], [2, 1], [0, -1]]]):
        vol, mask = write_phantom(tmp_path / f"o{i}", ornt=None if ornt is None else np.array(ornt, float))
        assert (orientations.aff2axcodes(nib.load(vol).affine) == ("R", "A", "S")) is (ornt is None)
        run = Predictor(backend, mask=mask, mask_label=LIVER_LABEL).run([vol])
        assert not run.errors, run.errors
        r = run.results[0]
        if reference is None:
            reference = r
            continue
        assert r.verdict.stage == reference.verdict.stage
        np.testing.assert_array_equal(r.probs, reference.probs)
        np.testing.assert_array_equal(r.slices, reference.slices)


def test_bbox_and_auto_roi(tmp_path, tiny_model):
    backend = open_backend(tiny_model, device="cpu")
    vol, _ = write_phantom(tmp_path)
    run = Predictor(backend, bbox=(5, 12, 0, 26, 29, 12)).run([vol])
    assert len(run.results) == 1 and len(run.results[0].slices) == 12
    run = Predictor(backend).run([vol])  # neither mask nor box: --roi auto, with a warning
    assert not run.errors, run.errors
    assert any("--roi auto" in w for w in run.results[0].warnings)
    assert [r.region for r in run.results] == ["auto"]


def test_cli_shows_warnings_and_the_region(tmp_path, tiny_model, run_cli):
    """A volume's warnings reach the console, not only the report, and the report says how its
    liver region was given."""
    vol, mask = write_phantom(tmp_path)
    report = tmp_path / "r.json"
    code, out, err = run_cli(["predict", vol, "--model", tiny_model, "--report", report])
    assert code == 0, err
    assert f"warning {vol}: no mask or box given: used --roi auto" in " ".join(out.split())
    assert json.loads(report.read_text())["results"][0]["region"] == "auto"
    code, out, err = run_cli(["predict", vol, "--model", tiny_model, "--mask", mask, "--report", report])
    assert code == 0, err
    assert f"warning {vol}" not in " ".join(out.split()) and json.loads(report.read_text())["results"][0]["region"] == "mask"


def test_mask_dir_pairing(tmp_path):
    masks = tmp_path / "masks"
    (masks / "b").mkdir(parents=True)
    for name in ("a.nii.gz", "b/liver.nii.gz", "c_seg.nii.gz", "d_1.nii", "d_2.nii"):
        (masks / name).write_bytes(b"")
    assert find_mask(tmp_path / "a.nii.gz", masks) == masks / "a.nii.gz"          # same name
    assert find_mask(tmp_path / "b.nii.gz", masks) == masks / "b" / "liver.nii.gz"  # TotalSegmentator folder
    assert find_mask(tmp_path / "c.nii", masks) == masks / "c_seg.nii.gz"          # unique stem prefix
    with pytest.raises(InputError, match="several masks"):
        find_mask(tmp_path / "d.nii.gz", masks)
    with pytest.raises(InputError, match="no mask for e.nii.gz"):
        find_mask(tmp_path / "e.nii.gz", masks)


def test_folder_input_and_mask_dir(tmp_path, tiny_model, capsys):
    vols = tmp_path / "vols"
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        vol, mask = write_phantom(vols, name=f"p{i}", seed=i)
        mask.rename(masks / vol.name)  # TotalSegmentator style: same file name in another folder
    assert [p.name for p in resolve_inputs([vols])] == ["p0.nii.gz", "p1.nii.gz"]
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", str(vols), "--model", str(tiny_model), "--mask-dir", str(masks),
                            "--mask-label", str(LIVER_LABEL), "--report", str(report), "--quiet"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert [r["input"] for r in data["results"]] == [str(vols / "p0.nii.gz"), str(vols / "p1.nii.gz")]
    assert data["errors"] == []


def test_aggregate_rule():
    probs = np.array([[0.6, 0.3, 0.1], [0.0, 0.9, 0.1], [0.5, 0.4, 0.1]])
    v = aggregate(probs, ood=NO_GATE)
    # Mean P(A) = 0.367 < mean P(B) = 0.533: B, though two of three crops vote A.
    assert v.stage == "B" and v.probability == pytest.approx(1.6 / 3)
    assert v.uncertain  # no gate: nothing reads as certain
    with pytest.raises(ValueError):
        aggregate(np.zeros((0, 3)), ood=NO_GATE)


class _SlowBackend:
    """Wraps a real backend; each run sleeps and records when it ran (to see the overlap)."""

    def __init__(self, inner, events):
        self.inner, self.events = inner, events
        self.name, self.precision, self.metadata, self.path = "slow", inner.precision, inner.metadata, inner.path

    def run(self, images):
        self.events.append(("run-start", time.perf_counter()))
        time.sleep(0.3)
        out = self.inner.run(images)
        self.events.append(("run-end", time.perf_counter()))
        return out


def test_next_volume_loads_during_inference(tmp_path, tiny_model):
    events = []
    backend = _SlowBackend(open_backend(tiny_model, device="cpu"), events)
    predictor = Predictor(backend, bbox=(5, 12, 0, 26, 29, 12), batch_size=64)
    original = predictor.prepare

    def prepare(path):
        events.append((f"prepare-start {path.name}", time.perf_counter()))
        out = original(path)
        events.append((f"prepare-end {path.name}", time.perf_counter()))
        events.append(("thread", threading.current_thread().name))
        return out

    predictor.prepare = prepare
    vols = [write_phantom(tmp_path, name=f"v{i}", seed=i)[0] for i in range(2)]
    run = predictor.run(vols)
    assert len(run.results) == 2
    when = {k: t for k, t in events if k != "thread"}
    first_run_end = next(t for k, t in events if k == "run-end")
    assert when["prepare-start v1.nii.gz"] < first_run_end
    assert all(name.startswith("liverstage-prefetch") for k, name in events if k == "thread")


def test_several_inputs_partial_failure(tmp_path, tiny_model, capsys):
    good, _ = write_phantom(tmp_path)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a NIfTI header" * 30))
    missing = tmp_path / "missing.nii.gz"
    report = tmp_path / "r.json"
    code, out, err = run_cli(["predict", str(corrupt), str(good), str(missing), "--model", str(tiny_model),
                              "--bbox", "5,12,0,26,29,12", "--report", str(report)], capsys)
    assert code == 1
    data = json.loads(report.read_text())
    assert [r["input"] for r in data["results"]] == [str(good)]
    assert [e["input"] for e in data["errors"]] == [str(corrupt), str(missing)]
    assert all(e["error"] and "\n" not in e["error"] for e in data["errors"])
    assert "Traceback" not in err + out


def _bad_inputs(tmp_path):
    """Every single bad input of predict -> (argv tail, text expected in the one-line error)."""
    good, mask = write_phantom(tmp_path / "good")
    two_d = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4)), two_d)
    four_d = tmp_path / "dyn.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 6, 3)).astype(np.float32), np.eye(4)), four_d)
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:400])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    return {
        "missing": ([str(tmp_path / "nope.nii.gz"), "--roi", "auto"], "not found"),
        "not-nifti": ([str(text), "--roi", "auto"], "not a NIfTI"),
        "truncated": ([str(truncated), "--roi", "auto"], "trunc.nii.gz"),
        "2d": ([str(two_d), "--roi", "auto"], "2D"),
        "4d": ([str(four_d), "--roi", "auto"], "4D"),
        "no-region-label": ([str(good), "--mask", str(mask), "--mask-label", "9"], "label 9"),
        "bbox-outside": ([str(good), "--bbox", "0,0,0,99,10,10"], "outside the volume"),
        "bad-bbox-text": ([str(good), "--bbox", "1,2,3"], "--bbox"),
        "mask-and-bbox": ([str(good), "--mask", str(mask), "--bbox", "0,0,0,5,5,5"], "alternatives"),
        "bad-device": ([str(good), "--device", "tpu"], "--device"),
    }


@pytest.mark.parametrize("case", ["missing", "not-nifti", "truncated", "2d", "4d", "no-region-label",
                                  "bbox-outside", "bad-bbox-text", "mask-and-bbox", "bad-device"])
def test_single_bad_input_is_one_line_and_no_report(tmp_path, tiny_model, capsys, case):
    argv, expected = _bad_inputs(tmp_path)[case]
    report = tmp_path / "report.json"
    code, out, err = run_cli(["predict", *argv, "--model", str(tiny_model), "--report", str(report)], capsys)
    assert code == 2
    err = err.strip()
    assert err.startswith("liverstage: error:") and len(err.splitlines()) == 1, err
    assert expected in err
    assert "Traceback" not in out + err
    assert not report.exists()
    assert not any(p.name.startswith(".report.json") for p in tmp_path.iterdir())


def test_phantom_cohort_folder_with_mask_dir(small_cohort, tiny_model, tmp_path, capsys):
    """The synthetic phantoms (not patients) as a user has them: a folder of volumes + a mask folder."""
    images, masks = small_cohort.parent / "images", small_cohort.parent / "masks"
    report = tmp_path / "r.json"
    code, out, err = run_cli(["predict", str(images), "--model", str(tiny_model), "--mask-dir", str(masks),
                              "--report", str(report)], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["errors"] == []
    assert len(data["results"]) == len(list(images.glob("*.nii.gz")))
    for r in data["results"]:
        assert len(r["crops"]) > 0
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    # --roi auto finds a region in a phantom too (a rough one).
    run = Predictor(open_backend(tiny_model, device="cpu"), roi="auto").run([sorted(images.glob("*.nii.gz"))[0]])
    assert not run.errors, run.errors


@pytest.mark.slow
def test_real_exported_model_matches_pytorch(tmp_path, small_volume_path, capsys):
    """A ResNet18 checkpoint exported by liverstage.export: predict's per-crop probabilities equal
    the PyTorch model's own on the same crops (the runtime adds no drift of its own)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from liverstage.export.api import ExportOptions, export_checkpoint
    from liverstage.runtime.spec import PreprocessSpec
    from liverstage.train.checkpoint import save_checkpoint
    from liverstage.train.model import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", "amcl").eval()
    spec = PreprocessSpec(crop_size=32)
    ckpt = save_checkpoint(tmp_path / "model.pt", net, preprocess=spec, args={}, splits={}, manifest=None, epoch=0)
    model = tmp_path / "model.onnx"
    export_checkpoint(ckpt, model, ExportOptions(precision="fp32"), echo=lambda s: None)

    vol, mask = small_volume_path
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", str(vol), "--model", str(model), "--mask", str(mask), "--report", str(report),
                            "--precision", "fp32", "--quiet"], capsys)
    assert code == 0, err
    result = json.loads(report.read_text())["results"][0]
    crops = crops_for_volume(vol, spec=spec, mask=mask)
    with torch.inference_mode():
        emb = net(torch.from_numpy(crops.images))
        temperature = open_backend(model, device="cpu").metadata.temperature
        probs = torch.softmax(net.class_logits(emb) / temperature, dim=1).numpy()
    got = np.array([[c["probabilities"][s] for s in STAGES] for c in result["crops"]])
    np.testing.assert_allclose(got, probs, atol=1e-4)
    assert result["stage"] == STAGES[int(np.argmax(probs.mean(axis=0)))]
