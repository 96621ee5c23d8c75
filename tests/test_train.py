"""`liverstage train` end to end on a tiny phantom cohort: every loss, every backbone, checkpoints,
exact resume, the crop cache, augmentation, and bad manifests (one line, no traceback)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from liverstage.runtime.cli import main
from liverstage.runtime.manifest import read_manifest
from liverstage.runtime.spec import PreprocessSpec
from liverstage.phantoms.synth import synth_cohort
from liverstage.train import data as data_mod
from liverstage.train.checkpoint import load_checkpoint, read_checkpoint
from liverstage.train.evaluate import predict_crops
from liverstage.train.config import RunConfig
from liverstage.train.trainer import train_run

CROP = 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """15 phantoms (5 A / 7 B / 3 C), 64 x 64 in-plane, ~12 slices: about 90 crops."""
    root = tmp_path_factory.mktemp("cohort")
    return synth_cohort(root / "phantoms", patients=15, seed=0, in_plane=64, slices=12)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("crop-cache")


def _config(cohort, cache, out, **kw):
    base = dict(manifest=cohort, out=out, backbone="resnet18", loss="amcl", epochs=1, batch_size=32,
                crop_size=CROP, cache_dir=cache, progress=False, device="cpu")
    base.update(kw)
    return RunConfig.from_options(base)


def _cli(argv):
    """Run the console entry point in-process; it exits 0 on success."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0, exc.value.code


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("loss", ["softmax", "asm", "amcl", "dr-amcl"])
def test_train_each_loss_writes_a_complete_run(cohort, cache, tmp_path, loss):
    run = train_run(_config(cohort, cache, tmp_path / "run", loss=loss, epochs=2), log=lambda _l: None)
    for name in ("model.pt", "last.pt", "history.csv", "metrics.json", "predictions.csv"):
        assert (run / name).is_file(), name
    ckpt = read_checkpoint(run / "model.pt")
    assert ckpt.loss == loss and ckpt.backbone == "resnet18" and ckpt.epoch == 2
    assert ckpt.margin == (0.0 if loss in ("softmax", "asm") else 0.5)
    splits = ckpt.splits
    assert not set(splits.train) & set(splits.test)
    assert len(splits.test) == 3  # 20 % of 15 patients, one per stage
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_patients"] == 3
    assert ckpt.metrics["accuracy"] == metrics["accuracy"]
    history = _read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert all(np.isfinite(float(r["train_loss"])) for r in history)
    preds = _read_csv(run / "predictions.csv")
    assert list(preds[0]) == ["patient_id", "slice", "label", "predicted", "prob_A", "prob_B", "prob_C",
                              "cos_A", "cos_B", "cos_C"]
    assert {r["patient_id"] for r in preds} == set(splits.test)
    assert len(preds) == metrics["n_crops"]
    probs = np.array([[float(r[f"prob_{s}"]) for s in "ABC"] for r in preds])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    model, _ = load_checkpoint(run / "model.pt")
    assert model.loss_name == loss


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_train_other_backbones(cohort, cache, tmp_path, backbone):
    run = train_run(_config(cohort, cache, tmp_path / "run", backbone=backbone, loss="dr-amcl", batch_size=64),
                    log=lambda _l: None)
    ckpt = read_checkpoint(run / "model.pt")
    assert ckpt.backbone == backbone
    assert ckpt.embedding_dim == {"vgg16": 4096, "resnet50": 2048}[backbone]
    shutil.rmtree(run)  # VGG16's last.pt (weights + Adam moments) is 1.6 GB: do not keep it around


def test_resume_is_exact(cohort, cache, tmp_path):
    straight = train_run(_config(cohort, cache, tmp_path / "a", epochs=2, batch_size=16, val_fraction=0.2),
                         log=lambda _l: None)
    train_run(_config(cohort, cache, tmp_path / "b", epochs=1, batch_size=16, val_fraction=0.2), log=lambda _l: None)
    resumed = train_run(_config(cohort, cache, tmp_path / "b", epochs=2, batch_size=16, val_fraction=0.2,
                                resume=True), log=lambda _l: None)
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((resumed / "metrics.json").read_text())
    assert a == b
    sa, sb = read_checkpoint(straight / "last.pt"), read_checkpoint(resumed / "last.pt")
    for key, value in sa.state_dict.items():
        assert torch.equal(value, sb.state_dict[key]), key
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "crops_per_second")} for r in h]  # noqa: E731
    assert strip(sa.history) == strip(sb.history)
    assert (straight / "predictions.csv").read_text() == (resumed / "predictions.csv").read_text()


def test_resume_refuses_changed_arguments_and_run_dir_is_protected(cohort, cache, tmp_path):
    train_run(_config(cohort, cache, tmp_path / "r"), log=lambda _l: None)
    from liverstage.runtime.errors import InputError

    with pytest.raises(InputError, match="--resume"):
        train_run(_config(cohort, cache, tmp_path / "r", epochs=2, resume=True, lr=1e-3), log=lambda _l: None)
    with pytest.raises(InputError, match="already holds a run"):
        train_run(_config(cohort, cache, tmp_path / "r"), log=lambda _l: None)


def test_imposed_test_patients(cohort, cache, tmp_path):
    rows = read_manifest(cohort)
    test = sorted({r.patient_id for r in rows if r.stage == s}.pop() for s in "ABC")
    run = train_run(_config(cohort, cache, tmp_path / "t", test_patients=test), log=lambda _l: None)
    assert list(read_checkpoint(run / "model.pt").splits.test) == test


def test_cli_train_then_evaluate_agree(cohort, cache, tmp_path, capsys):
    run = tmp_path / "cli"
    rows = read_manifest(cohort)
    chosen = sorted(next(r.patient_id for r in rows if r.stage == s) for s in "ABC")
    (tmp_path / "chosen.txt").write_text("\n".join(chosen) + "\n")
    _cli(["train", "--manifest", str(cohort), "--out", str(run), "--loss", "dr-amcl", "--epochs", "1",
          "--crop-size", str(CROP), "--batch-size", "32", "--cache-dir", str(cache), "--no-progress",
          "--test-patients", str(tmp_path / "chosen.txt"), "--val-fraction", "0.2"])
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.out + captured.err
    ckpt = read_checkpoint(run / "model.pt")
    assert list(ckpt.splits.test) == chosen and len(ckpt.splits.val) == 3
    assert ckpt.args["val_fraction"] == 0.2 and ckpt.args["loss"] == "dr-amcl"
    patients = tmp_path / "test.txt"
    patients.write_text("\n".join(ckpt.splits.test) + "\n")
    _cli(["evaluate", str(run / "model.pt"), "--manifest", str(cohort), "--patients", str(patients),
          "--out", str(tmp_path / "eval.json"), "--cache-dir", str(cache)])
    again = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "kappa_quadratic", "patient_accuracy", "confusion", "n_crops"):
        assert again[key] == trained[key], key


def test_crop_cache_is_used_and_keyed_by_spec(cohort, tmp_path, monkeypatch):
    rows = read_manifest(cohort)[:2]
    spec = PreprocessSpec(crop_size=CROP)
    first = data_mod.load_crops(rows, spec, cache_dir=tmp_path)
    files = sorted((tmp_path / spec.hash).glob("*.npz"))
    assert len(files) == 2

    def boom(*a, **k):
        raise AssertionError("volume re-read although cached")

    monkeypatch.setattr(data_mod, "crops_for_volume", boom)
    second = data_mod.load_crops(rows, spec, cache_dir=tmp_path)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.slices, second.slices)
    with pytest.raises(AssertionError):  # another spec is another cache entry
        data_mod.load_crops(rows, PreprocessSpec(crop_size=CROP + 8), cache_dir=tmp_path)


def test_precut_png_and_npy_crops(tmp_path, cache):
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = ["patient_id,image,mask,stage"]
    for p in range(15):
        stage = "ABC"[p % 3]
        for k in range(3):
            img = (rng.random((40, 48)) * 255).astype(np.uint8)
            if k == 0:
                Image.fromarray(img).save(tmp_path / f"p{p}_{k}.png")
                lines.append(f"p{p},p{p}_{k}.png,,{stage}")
            else:
                np.save(tmp_path / f"p{p}_{k}.npy", img.astype(np.float32))
                lines.append(f"p{p},p{p}_{k}.npy,,{stage}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    spec = PreprocessSpec(crop_size=CROP)
    data = data_mod.load_crops(read_manifest(tmp_path / "m.csv"), spec)
    assert data.images.shape == (45, 1, CROP, CROP)
    assert list(data.slices[:3]) == [0, 1, 2]
    run = train_run(_config(tmp_path / "m.csv", cache, tmp_path / "run", batch_size=8), log=lambda _l: None)
    assert (run / "metrics.json").is_file()


def test_augmentation_is_a_function_of_seed_and_epoch_and_mild():
    a = data_mod.draw_augmentation(8, data_mod.epoch_generator(3, 5))
    b = data_mod.draw_augmentation(8, data_mod.epoch_generator(3, 5))
    c = data_mod.draw_augmentation(8, data_mod.epoch_generator(3, 6))
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, c.theta)
    # Linear part = rotation by <= 10 degrees times a zoom in [0.9, 1.1]: determinant > 0 (no flip).
    det = torch.linalg.det(a.theta[:, :, :2])
    assert (det > 0).all()
    # An image with its bright half on the left keeps it on the left.
    x = torch.zeros(8, 1, 32, 32)
    x[..., :16] = 1.0
    y = data_mod.augment(x, a)
    assert (y[..., :8].mean((1, 2, 3)) > y[..., -8:].mean((1, 2, 3)) + 0.5).all()


def _bad_manifest(tmp_path, cohort, mutate):
    lines = Path(cohort).read_text().splitlines()
    root = Path(cohort).parent
    rows = [ln.split(",") for ln in lines[1:]]
    for r in rows:  # absolute paths so the manifest can live elsewhere
        r[1], r[2] = str(root / r[1]), str(root / r[2])
    rows = mutate(rows)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    return path


def _empty_mask(tmp_path, like):
    """A mask with the geometry of `like` but no liver voxel: that patient yields no crop."""
    import nibabel as nib

    ref = nib.load(like)
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine), str(tmp_path / "empty_mask.nii.gz"))
    return str(tmp_path / "empty_mask.nii.gz")


@pytest.mark.parametrize("case,expect", [
    ("missing", "not found"),
    ("stage", "unknown stage"),
    ("duplicate", "more than one volume"),
    ("nocrop", "empty"),
    ("toofew", "too few patients"),
])
def test_bad_manifest_is_one_line(tmp_path, cohort, cache, capsys, case, expect):
    def mutate(rows):
        if case == "missing":
            rows[0][1] = rows[0][1].replace(".nii.gz", "-gone.nii.gz")
        elif case == "stage":
            rows[0][3] = "D"
        elif case == "duplicate":
            rows.append(list(rows[0]))
        elif case == "nocrop":
            rows[0][2] = _empty_mask(tmp_path, rows[0][2])
        elif case == "toofew":
            rows = [r for r in rows if r[3] != "C"][:-1] + [next(r for r in rows if r[3] == "C")]
        return rows

    manifest = _bad_manifest(tmp_path, cohort, mutate)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--epochs", "1",
              "--crop-size", str(CROP), "--cache-dir", str(cache), "--no-progress"])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("liverstage: error:"), err
    assert expect in err[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_bad_manifest_subprocess_has_no_traceback(tmp_path, cohort):
    manifest = _bad_manifest(tmp_path, cohort, lambda rows: [r[:3] + ["X"] for r in rows])
    proc = subprocess.run([sys.executable, "-m", "liverstage.train", "--manifest", str(manifest), "--out",
                           str(tmp_path / "run"), "--epochs", "1"], capture_output=True, text=True,
                          env={**os.environ, "LIVERSTAGE_DEBUG": ""}, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown stage" in proc.stderr


@pytest.mark.parametrize("change,match", [
    ({"loss": "arcface"}, "--loss"), ({"epochs": 0}, "--epochs"), ({"batch_size": 1}, "--batch-size"),
    ({"lr": -1.0}, "--lr"), ({"margin": 2.0}, "--margin"), ({"val_fraction": 0.9}, "--val-fraction"),
    ({"loss": "softmax", "warmup_epochs": 2}, "warmup"), ({"device": "tpu"}, "--device"),
])
def test_config_validation(tmp_path, change, match):
    from liverstage.runtime.errors import InputError

    with pytest.raises(InputError, match=match):
        RunConfig.from_options({"manifest": tmp_path / "m.csv", "out": tmp_path / "run", **change})


@pytest.mark.slow
def test_resume_after_a_real_kill(cohort, cache, tmp_path):
    """SIGKILL a training process after its first epoch; --resume ends where an unbroken run ends."""
    import signal

    def argv(out, *extra):
        return [sys.executable, "-m", "liverstage.train", "--manifest", str(cohort), "--out", str(out),
                "--epochs", "3", "--crop-size", str(CROP), "--batch-size", "16", "--loss", "dr-amcl",
                "--cache-dir", str(cache), "--no-progress", "--device", "cpu", *extra]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = subprocess.run(argv(tmp_path / "a"), capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(argv(tmp_path / "b"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("epoch 1/3"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "model.pt").exists()
    assert read_checkpoint(tmp_path / "b" / "last.pt").epoch >= 1
    resumed = subprocess.run(argv(tmp_path / "b", "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    assert (tmp_path / "a" / "predictions.csv").read_text() == (tmp_path / "b" / "predictions.csv").read_text()


@pytest.mark.gpu
def test_train_on_gpu_with_amp(cohort, cache, tmp_path):
    """CUDA path: autocast (bf16 where supported), channels_last, angular head in fp32."""
    run = train_run(_config(cohort, cache, tmp_path / "gpu", loss="dr-amcl", epochs=2, device="cuda"),
                    log=lambda _l: None)
    history = _read_csv(run / "history.csv")
    assert all(np.isfinite(float(r["train_loss"])) for r in history)
    model, _ = load_checkpoint(run / "model.pt")
    model = model.cuda().to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        emb = model(torch.rand(4, 1, CROP, CROP, device="cuda").contiguous(memory_format=torch.channels_last))
        assert model.class_logits(emb).dtype == torch.float32
    # Evaluation is strict float32 on the GPU too: the same probabilities as on the CPU, and
    # PyTorch's TF32 setting is left as it was.
    images = np.random.default_rng(0).random((16, 1, CROP, CROP), dtype=np.float32)
    tf32_before = torch.backends.cudnn.allow_tf32
    on_gpu = predict_crops(model, images, device="cuda")
    assert torch.backends.cudnn.allow_tf32 == tf32_before
    on_cpu = predict_crops(load_checkpoint(run / "model.pt")[0], images)
    assert np.allclose(on_gpu["probs"], on_cpu["probs"], atol=1e-4)
    assert np.allclose(on_gpu["cosine"], on_cpu["cosine"], atol=1e-4)


def test_train_takes_every_crops_option_and_stores_it(cohort, cache, tmp_path):
    """The preprocessing options of `liverstage crops` (and its --spec file) train a model whose
    checkpoint carries exactly that PreprocessSpec."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(PreprocessSpec(crop_size=40, clip_low=-1.0).to_json())
    _cli(["train", "--manifest", str(cohort), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32",
          "--spec", str(spec_file), "--crop-size", str(CROP), "--box-margin", "0.3", "--min-area-fraction", "0.4",
          "--percentile-low", "1", "--percentile-high", "99", "--percentile-inset", "1", "--clip-high", "2", "--cache-dir", str(cache),
          "--device", "cpu", "--no-progress"])
    expected = PreprocessSpec(crop_size=CROP, box_margin=0.3, min_area_fraction=0.4, percentile_low=1.0,
                              percentile_high=99.0, percentile_inset=1, clip_low=-1.0, clip_high=2.0)
    ckpt = read_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt.preprocess == expected
    assert {k: ckpt.args[k] for k in PreprocessSpec.option_names()} == {
        k: v for k, v in expected.to_dict().items() if k != "version"}
