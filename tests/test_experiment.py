"""`liverstage experiment` end to end on the tiny phantom cohort (crop 32, 1 epoch, 2 runs).

One experiment (resnet18, softmax + amcl, 2 runs = 4 trainings) is made once per module and then
inspected: its tables and figures, the recomputation of the tables from predictions.csv, the
pairing of test patients, and restarts (finished runs skipped, a killed run resumed, other settings
refused).
"""

import csv
import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from liverstage.runtime.cli import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("resnet18-softmax", "resnet18-amcl-m0.50")
RUNS = 2


def _args(manifest, out, *extra):
    cache = out.parent / "crop-cache"
    return ["experiment", "--cache-dir", str(cache), "--manifest", str(manifest), "--out", str(out), "--backbones", "resnet18",
            "--losses", "softmax,amcl", "--margins", "0.5", "--runs", str(RUNS), "--epochs", "1",
            "--crop-size", "32", "--batch-size", "16", "--device", "cpu", "--note", "phantoms",
            "--no-progress", *extra]


def _run_cli(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


@pytest.fixture(scope="module")
def experiment(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "exp"
    code = _run_cli(_args(small_cohort, out))
    assert code == 0
    return out


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_experiment_writes_all_tables_figures_and_results(experiment):
    for name in ("table1", "table2", "table4", "table5"):
        assert (experiment / f"{name}.md").read_text().strip()
        assert _read_csv(experiment / f"{name}.csv")
    assert not (experiment / "table3.md").exists()  # one margin: no margin sweep
    t1 = (experiment / "table1.md").read_text()
    assert "| ResNet18 |" in t1 and "| ResNet18+AMCL |" in t1 and "phantoms" in t1 and "±" in t1
    assert (experiment / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    summary = (experiment / "summary.md").read_text()
    assert "phantoms" in summary and "epochs 1" in summary and "crop_size 32" in summary and t1 in summary
    results = json.loads((experiment / "results.json").read_text())
    assert len(results["runs"]) == RUNS * len(METHODS)
    for entry in results["runs"]:
        run_dir = experiment / entry["run_dir"]
        for name in ("model.pt", "history.csv", "metrics.json", "predictions.csv"):
            assert (run_dir / name).is_file(), run_dir / name
        for name in ("confusion.png", "curves.png", "angles.png"):
            assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0
    assert results["paired_vs_softmax"][0]["runs"] == list(range(RUNS))


def _independent_metrics(pred_csv):
    """Accuracy, MR and F1 straight from predictions.csv (argmax of the probabilities)."""
    from sklearn.metrics import f1_score

    rows = _read_csv(pred_csv)
    y = np.array(["ABC".index(r["label"]) if r["label"] in "ABC" else int(r["label"]) for r in rows])
    p = np.array([[float(r[f"prob_{s}"]) for s in "ABC"] for r in rows]).argmax(1)
    f1 = f1_score(y, p, labels=[0, 1, 2], average=None, zero_division=0)
    a, c = y == 0, y == 2
    return {"accuracy": float(np.mean(y == p)), "f1_A": f1[0], "f1_B": f1[1], "f1_C": f1[2],
            "mr_a_to_c": float(np.mean(p[a] == 2)) if a.any() else math.nan,
            "mr_c_to_a": float(np.mean(p[c] == 0)) if c.any() else math.nan}


def test_table_numbers_are_recomputable_from_predictions_csv(experiment):
    results = json.loads((experiment / "results.json").read_text())
    per_method = {}
    for entry in results["runs"]:
        run_dir = experiment / entry["run_dir"]
        m = _independent_metrics(run_dir / "predictions.csv")
        # the trainer's own metrics.json agrees with the predictions it wrote
        assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == pytest.approx(m["accuracy"])
        per_method.setdefault(run_dir.name, []).append(m)
    rows = {r["loss"]: r for r in _read_csv(experiment / "table1.csv")}
    rows2 = {r["loss"]: r for r in _read_csv(experiment / "table2.csv")}
    for name, loss in (("resnet18-softmax", "softmax"), ("resnet18-amcl-m0.50", "amcl")):
        ms = per_method[name]
        assert len(ms) == RUNS
        for key, table in (("accuracy", rows), ("mr_a_to_c", rows), ("mr_c_to_a", rows),
                           ("f1_A", rows2), ("f1_B", rows2), ("f1_C", rows2)):
            vals = [m[key] for m in ms if math.isfinite(m[key])]
            cell = table[loss][f"{key}_mean"]
            if not vals:
                assert cell == ""
                continue
            assert float(cell) == pytest.approx(np.mean(vals), abs=1e-12)
            if len(vals) > 1:
                assert float(table[loss][f"{key}_std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    # the paired difference in table5 is the mean over runs of amcl - softmax accuracy
    t5 = _read_csv(experiment / "table5.csv")[0]
    diffs = [a["accuracy"] - s["accuracy"] for a, s in zip(per_method["resnet18-amcl-m0.50"],
                                                            per_method["resnet18-softmax"])]
    assert float(t5["d_accuracy_mean"]) == pytest.approx(np.mean(diffs), abs=1e-12)
    low, high = float(t5["d_accuracy_t95_low"]), float(t5["d_accuracy_t95_high"])
    assert low <= np.mean(diffs) <= high


def test_methods_of_a_run_share_test_patients_disjoint_from_training(experiment):
    for run in range(RUNS):
        split = json.loads((experiment / "runs" / str(run) / "split.json").read_text())
        assert not set(split["train"]) & set(split["test"])
        seen = []
        for method in METHODS:
            ids = {r["patient_id"] for r in _read_csv(experiment / "runs" / str(run) / method / "predictions.csv")}
            seen.append(ids)
        assert seen[0] == seen[1] == set(split["test"])


def test_restart_skips_finished_runs_and_resumes_a_killed_one(experiment, small_cohort, capsys):
    model_files = sorted(experiment.glob("runs/*/*/model.pt"))
    assert len(model_files) == RUNS * len(METHODS)
    before = {p: p.stat().st_mtime_ns for p in model_files}
    # a kill during training leaves model.pt (checkpointed every epoch) but no metrics.json
    killed = experiment / "runs" / "1" / METHODS[1]
    (killed / "metrics.json").unlink()
    (killed / "predictions.csv").unlink()
    capsys.readouterr()
    assert _run_cli(_args(small_cohort, experiment)) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier, skipped") == RUNS * len(METHODS) - 1
    assert f"run 1 {METHODS[1]}: resuming" in err
    for p, mtime in before.items():
        if p.parent != killed:
            assert p.stat().st_mtime_ns == mtime, f"{p} was retrained"
    assert (killed / "metrics.json").is_file() and (killed / "predictions.csv").is_file()
    assert len(json.loads((experiment / "results.json").read_text())["runs"]) == RUNS * len(METHODS)


def test_restart_with_other_settings_is_refused(experiment, small_cohort, capsys):
    argv = _args(small_cohort, experiment)
    argv[argv.index("--epochs") + 1] = "2"
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "epochs" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag,value,needle", [
    ("--losses", "softmax,arcface", "unknown loss"),
    ("--backbones", "resnet9000", "unknown backbone"),
    ("--margins", "0.5,x", "--margins"),
    ("--train-option", "no_such_option=1", "no_such_option"),
])
def test_bad_options_give_one_line(small_cohort, tmp_path, capsys, flag, value, needle):
    argv = _args(small_cohort, tmp_path / "exp")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "exp" / "runs").exists()


def test_settings_from_before_a_new_trainer_option_still_match(small_cohort, tmp_path):
    """An experiment started before the trainer gained an option used that option's default."""
    from liverstage.runtime.errors import InputError
    from liverstage.train.experiment import ExperimentConfig, _check_or_write_settings

    config = ExperimentConfig(manifest=small_cohort, out=tmp_path / "e", backbones=["resnet18"],
                              losses=["softmax"], runs=1, train_options={"epochs": 1})
    (tmp_path / "e").mkdir()
    _check_or_write_settings(config)
    path = tmp_path / "e" / "experiment.json"
    record = json.loads(path.read_text())
    del record["pinned"]["train_options"]["lr"]  # as if `lr` had not existed then
    path.write_text(json.dumps(record))
    _check_or_write_settings(config)  # the default lr is what those runs used: accepted
    record = json.loads(path.read_text())
    del record["pinned"]["train_options"]["lr"]
    path.write_text(json.dumps(record))
    config.train_options["lr"] = 1e-3
    with pytest.raises(InputError, match="lr"):
        _check_or_write_settings(config)
