"""Shared fixtures. Keep everything small: CI runs on 2 CPU cores."""

import os

import pytest

# Two cores: keep torch / BLAS from oversubscribing when tests run model code.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory):
    """Compiled-model caches (OpenVINO's) go to a folder of this session, not the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache_home"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests with a stated reason where no CUDA GPU is present."""
    try:
        import torch  # noqa: PLC0415

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_cli(capsys):
    """Run the console entry point in-process: run_cli(argv) -> (exit code, stdout, stderr)."""
    from liverstage.runtime.cli import main  # noqa: PLC0415

    def run(argv):
        code = 0
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def predict_strict(run_cli, tmp_path):
    """predict_strict(name, data, mask, affine, model) -> (exit code, the report's one result):
    `data` and `mask` saved as NAME.nii.gz and NAME_mask.nii.gz and staged by `predict --strict
    --quiet` with the mask (asserting nothing on stderr), as a user stages one volume."""
    import json  # noqa: PLC0415

    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    def run(name, data, mask, affine, model):
        image, mask_file, report = (tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_mask.nii.gz",
                                    tmp_path / f"{name}.json")
        nib.save(nib.Nifti1Image(np.asarray(data), affine), image)
        nib.save(nib.Nifti1Image(np.asarray(mask).astype(np.uint8), affine), mask_file)
        code, _, err = run_cli(["predict", image, "--model", model, "--mask", mask_file, "--report", report,
                                "--strict", "--quiet"])
        assert err == ""
        return code, json.loads(report.read_text())["results"][0]

    return run


@pytest.fixture(scope="module")
def benchmark_module():
    """Import a benchmarks/ script by its module name, with benchmarks/ on sys.path for the test
    module: the scripts import each other (ood_heldout -> ood_eval) and fuzz_inputs' spawned
    workers import it by that name."""
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(folder)


# --- runtime (predict/bench) tests: a tiny liverstage-shaped ONNX model built without torch ------
def _load_helper(filename: str):
    """A tests/_*.py helper by path (pytest runs with --import-mode=importlib: tests/ is not on sys.path)."""
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    name = "liverstage_tests" + Path(filename).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]



@pytest.fixture(scope="session")
def tiny_onnx():
    """The tests/_tiny_onnx.py module: build_tiny_onnx(path, crop_size=...), tiny_metadata(...)."""
    return _load_helper("_tiny_onnx.py")


@pytest.fixture(scope="session")
def reference():
    """The tests/_reference.py module: the stored fixed-seed reference run and how to remake it."""
    return _load_helper("_reference.py")


@pytest.fixture(scope="session")
def dicom_series():
    """The tests/_dicom_series.py module: write_series, volume_as_series, legacy_enhanced, testdata."""
    pytest.importorskip("pydicom", reason="the DICOM tests need the dicom extra")
    pytest.importorskip("highdicom", reason="the DICOM tests need the dicom extra")
    return _load_helper("_dicom_series.py")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_onnx):
    """A tiny ONNX model (crop_size 32) carrying valid liverstage metadata."""
    return tiny_onnx.build_tiny_onnx(tmp_path_factory.mktemp("tiny_model") / "tiny.onnx", crop_size=32)


# ---------------------------------------------------------------------------------------------
# Phantom data (synthetic, not patients), generated once per test session.

SMALL_COHORT = {"patients": 12, "seed": 0, "in_plane": 64, "slices": 16}


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """Path to manifest.csv of a tiny phantom cohort: 12 patients, 64x64 in-plane, ~16 slices.

    Stages (seed 0): a mix of A, B and C; NIfTI volumes + liver masks (label 1), stored in
    several axis orders. Treat it as read-only: it is shared by every test in the session.
    """
    from liverstage.phantoms.synth import synth_cohort

    return synth_cohort(tmp_path_factory.mktemp("phantoms") / "cohort", **SMALL_COHORT)


@pytest.fixture(scope="session")
def small_volume_path(small_cohort):
    """(volume .nii.gz, mask .nii.gz) of the first phantom of `small_cohort`."""
    from liverstage.runtime.manifest import read_manifest

    row = read_manifest(small_cohort)[0]
    return row.image, row.mask


@pytest.fixture(scope="session")
def cohort_crops(small_cohort, tiny_model):
    """Per phantom of `small_cohort`: (volume, mask, crops) with the tiny model's spec (crop 32)."""
    from liverstage.runtime.backends import open_backend
    from liverstage.runtime.crops import crops_for_volume
    from liverstage.runtime.manifest import read_manifest

    spec = open_backend(tiny_model, device="cpu").metadata.preprocess
    return [(row.image, row.mask, crops_for_volume(row.image, spec=spec, mask=row.mask).images)
            for row in read_manifest(small_cohort)]


@pytest.fixture(scope="session")
def gated_model(tmp_path_factory, tiny_onnx, tiny_model, cohort_crops):
    """The tiny model with an out-of-distribution gate fitted as export fits one, on its own
    outputs: bank from phantoms 0-7 of `small_cohort`, thresholds from phantoms 8-11 and the
    bank's phantoms left out one at a time."""
    import numpy as np  # noqa: PLC0415

    from liverstage.export.ood_fit import build_gate
    from liverstage.runtime.backends import open_backend

    backend = open_backend(tiny_model, device="cpu")
    spec = backend.metadata.preprocess
    bank = np.concatenate([c for _, _, c in cohort_crops[:8]])
    held = np.concatenate([c for _, _, c in cohort_crops[8:]])
    bank_patients = [str(vol) for vol, _, c in cohort_crops[:8] for _ in range(len(c))]
    held_patients = [str(vol) for vol, _, c in cohort_crops[8:] for _ in range(len(c))]
    gate = build_gate(backend.run(bank), bank, backend.run(held), held, bank_patients=bank_patients,
                      held_patients=held_patients, clip_low=spec.clip_low, clip_high=spec.clip_high,
                      fit={"source": "tests"}).config
    meta = tiny_onnx.tiny_metadata(crop_size=32, ood=gate)
    return tiny_onnx.build_tiny_onnx(tmp_path_factory.mktemp("gated") / "gated.onnx", crop_size=32, metadata=meta)
