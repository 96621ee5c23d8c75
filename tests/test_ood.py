"""The out-of-distribution gate in the runtime: scores, the volume rule, predict, the report, --strict.

`gated_model` (conftest.py): the tiny ONNX model with a gate fitted, as export fits one, on the
crops of the session's phantom cohort (synthetic, not patients).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from liverstage.export.ood_fit import MAX_BANK, build_gate, payload_bytes
from liverstage.runtime.backends import open_backend
from liverstage.runtime.errors import ModelError
from liverstage.runtime.ood import (DESCRIPTOR_DIM, FAR_OOD_TARGET, NO_GATE_REASON, PARTS, OodGate, decode_array,
                                    encode_array, image_descriptor, descriptor_factor)
from liverstage.runtime.predict import Predictor

CROP = 32


def noise_volume(folder, seed=0):
    """Pure Gaussian noise with a liver-sized box mask (the issue's first example)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(500, 100, (64, 64, 16)).astype(np.float32)
    mask = np.zeros(data.shape, np.uint8)
    mask[30:56, 18:46, :] = 1
    affine = np.diag([3.0, 3.0, 6.0, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), folder / "noise.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), folder / "noise_mask.nii.gz")
    return folder / "noise.nii.gz", folder / "noise_mask.nii.gz"


def test_bank_round_trip_in_float16():
    bank = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    back = decode_array(encode_array(bank))
    assert back.dtype == np.float32 and back.shape == (7, 5)
    np.testing.assert_allclose(back, bank, atol=2e-3)
    bad = encode_array(bank)
    bad["shape"] = [7, 6]
    with pytest.raises(ValueError):
        decode_array(bad)


def test_image_descriptor_any_crop_size():
    rng = np.random.default_rng(1)
    for size in (8, 32, 50, 64, 224):
        images = rng.uniform(-0.5, 1.5, (3, 1, size, size)).astype(np.float32)
        d = image_descriptor(images, clip_low=-0.5, clip_high=1.5)
        assert d.shape == (3, DESCRIPTOR_DIM) and np.isfinite(d).all()
        hist = d[:, 64:80]
        np.testing.assert_allclose(hist.sum(axis=1), 1.0, atol=1e-6)  # the histogram counts every pixel once
    flat = image_descriptor(np.full((1, 1, 32, 32), 0.5, np.float32), clip_low=-0.5, clip_high=1.5)
    assert np.isfinite(flat).all()


def test_large_crops_are_described_as_their_block_means():
    """A 224-px crop is described at 56 px and a 64-px crop at 32 px: exactly as their 4 x 4 and
    2 x 2 block means would be."""
    assert [descriptor_factor(s) for s in (32, 63, 64, 111, 112, 223, 224, 448, 512)] == [1, 1, 2, 2, 2, 4, 4, 8, 16]
    rng = np.random.default_rng(3)
    for size, factor in ((224, 4), (64, 2)):
        images = rng.uniform(0.0, 1.0, (4, 1, size, size)).astype(np.float32)
        side = size // factor
        blocks = images.reshape(4, 1, side, factor, side, factor).mean(axis=(3, 5), dtype=np.float64).astype(np.float32)
        np.testing.assert_allclose(image_descriptor(images, clip_low=0.0, clip_high=1.0),
                                   image_descriptor(blocks, clip_low=0.0, clip_high=1.0), atol=1e-5)
    from liverstage.runtime.ood import _block_mean, _pool2

    for size in (5, 28, 63, 64):  # the levels' 2 x 2 pooling is the block mean's factor-2 case
        x = rng.uniform(-0.5, 1.5, (3, size, size)).astype(np.float32)
        assert _pool2(x).tobytes() == _block_mean(x, 2).tobytes()


def test_descriptor_parts_are_the_plain_computations():
    """The layout matrix, roughness and spread are faster forms of plain numpy: the layout's
    blocks are those of np.linspace edges (pixels repeated for images under 8 px), roughness is
    the mean |np.diff| along both axes, spread is np.std."""
    from liverstage.runtime.ood import _block_means, _roughness, _spread

    rng = np.random.default_rng(5)
    for size in (1, 3, 5, 8, 13, 14, 16, 28, 56):
        x = rng.uniform(-0.5, 1.5, (3, size, size)).astype(np.float32)
        big = x if size >= 8 else np.repeat(np.repeat(x, -(-8 // size), axis=1), -(-8 // size), axis=2)
        edges = np.linspace(0, big.shape[1], 9).round().astype(int)
        plain = np.array([[[big[n, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(dtype=np.float64)
                            for j in range(8)] for i in range(8)] for n in range(3)])
        np.testing.assert_allclose(_block_means(x, 8), plain, atol=1e-6)
        np.testing.assert_allclose(_spread(x), x.std(axis=(1, 2), dtype=np.float64), rtol=1e-5, atol=1e-7)
        if size > 1:
            rough = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
            np.testing.assert_allclose(_roughness(x), rough, rtol=1e-5)


def test_the_volume_median_is_numpys():
    from liverstage.runtime.ood import _median

    rng = np.random.default_rng(4)
    for n in range(1, 40):
        values = rng.random(n) * 10.0 ** rng.integers(-3, 4)
        assert _median(values) == float(np.median(values))


def test_kth_largest_is_numpys_partition_value():
    from liverstage.runtime.ood import REMOVE_MAXIMA_UP_TO_K, kth_largest

    rng = np.random.default_rng(5)
    for trial in range(300):
        width = int(rng.integers(1, 60))
        values = rng.integers(-3, 4, size=(int(rng.integers(1, 9)), width)).astype(np.float32)  # many ties
        if trial % 3 == 0:
            values[rng.random(values.shape) < 0.3] = -np.inf  # excluded bank rows (export)
        k = int(rng.integers(1, width + 1))
        expected = np.partition(values, width - k, axis=1)[:, width - k]
        assert np.array_equal(kth_largest(values.copy(), k), expected), (trial, k)
    assert REMOVE_MAXIMA_UP_TO_K < 59  # both branches were exercised above


@pytest.fixture
def numpy_gate_code():
    """Runs a test's gate with the numpy reference code, and puts the kernels back afterwards."""
    from liverstage.runtime import ood

    before = ood.gate_kernels()
    ood.use_gate_kernels("numpy")
    yield
    ood.use_gate_kernels(before)


def test_gate_kernels_are_built_where_a_compiler_is():
    """setup.py builds them optionally: a failed build must not pass unnoticed on a machine that
    can compile (the numpy code would run, twice as slow)."""
    import shutil
    import sysconfig

    from liverstage.runtime.ood import gate_kernels, use_gate_kernels

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: the numpy code runs")
    assert gate_kernels() == "compiled"
    with pytest.raises(ValueError, match="'compiled' or 'numpy'"):
        use_gate_kernels("fast")


def test_compiled_descriptor_is_the_numpy_reference():
    """Every crop size the levels and the layout treat differently (under 4, under 8, odd, the
    descriptor's block factor), scales far outside the clip range, constant and sparse crops: the
    histogram is the same bit for bit (the same float32 operations bin the same pixels), the
    rest agrees to float32 rounding."""
    from liverstage.runtime import ood

    if ood.gate_kernels() != "compiled":
        pytest.skip("the gate's compiled kernels were not built here")
    rng = np.random.default_rng(11)
    for size in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 31, 32, 33, 56, 63, 64, 111, 112, 224):
        for scale, offset in ((1.0, 0.0), (50.0, -20.0), (1e-3, 0.5), (0.0, 0.7)):
            images = (rng.standard_normal((5, 1, size, size)) * scale + offset).astype(np.float32)
            images[1, 0, : size // 2] = 0.0  # a crop half blank
            compiled = ood.image_descriptor(images, clip_low=-1.5, clip_high=2.5)
            x = ood._block_mean(images.reshape(5, size, size), ood.descriptor_factor(size))
            reference = ood.image_descriptor_numpy(x, clip_low=-1.5, clip_high=2.5)
            assert compiled.dtype == np.float32 and compiled.shape == (5, DESCRIPTOR_DIM)
            assert np.array_equal(compiled[:, 64:80], reference[:, 64:80]), (size, scale)
            np.testing.assert_allclose(compiled, reference, rtol=2e-5, atol=1e-6 * max(scale, 1e-3), err_msg=f"{size}, {scale}")


def test_kth_largest_is_the_same_in_both_codes(numpy_gate_code):
    """The numpy form (kth_largest_numpy, where the kernels were not built) against np.partition,
    as test_kth_largest_is_numpys_partition_value checks the form in use."""
    test_kth_largest_is_numpys_partition_value()


def test_knn_distance_is_the_same_in_both_codes():
    """The distances from the compiled knn_distance and from the numpy code, bit for bit, on the
    same products: the image part's (kth_distance: queries against a bank) and a sphere part's
    (OodGate.sphere_distance: unit rows), with ties, k = 1 and k = the bank's size, rows far from
    and on top of the bank; and a bank row excluded (export) always takes the numpy code."""
    from liverstage.runtime import ood

    if ood.gate_kernels() != "compiled":
        pytest.skip("the gate's compiled kernels were not built here")
    rng = np.random.default_rng(13)
    for trial in range(60):
        n, dim, width = int(rng.integers(1, 20)), int(rng.integers(1, 90)), int(rng.integers(1, 400))
        bank = rng.integers(-2, 3, size=(width, dim)).astype(np.float32) * np.float32(rng.choice([1.0, 0.37, 30.0]))
        queries = np.concatenate([bank[rng.integers(0, width, size=n // 2)],  # on top of bank rows: distance 0
                                  rng.standard_normal((n - n // 2, dim)).astype(np.float32) * 5]).astype(np.float32)
        k = int(rng.choice([1, width, int(rng.integers(1, width + 1))]))
        bank_t, bank_sq = np.ascontiguousarray(bank.T), np.einsum("ij,ij->i", bank, bank)
        compiled = ood.kth_distance(queries, bank_t, bank_sq, k)
        ood.use_gate_kernels("numpy")
        try:
            reference = ood.kth_distance(queries, bank_t, bank_sq, k)
        finally:
            ood.use_gate_kernels("compiled")
        assert compiled.dtype == np.float64 and np.array_equal(compiled, reference), (trial, n, width, k)
        sims = np.clip(rng.integers(-8, 9, size=(n, width)).astype(np.float32) / 8, -1, 1)  # cosines, ties
        out = np.empty(n, dtype=np.float64)
        ood._gate_kernels.knn_distance(sims, n, width, k, None, None, out)
        expected = np.sqrt(np.clip(2.0 - 2.0 * ood.kth_largest_numpy(sims.copy(), k).astype(np.float64), 0.0, 4.0))
        assert np.array_equal(out, expected), (trial, k)
    exclude = np.zeros((n, width), dtype=bool)
    exclude[:, 0] = True
    assert not ood._compiled_knn(np.zeros((n, width), dtype=np.float32), 1, exclude)
    with pytest.raises(ValueError, match="knn_distance"):
        ood._gate_kernels.knn_distance(sims, n, width, width + 1, None, None, out)
    with pytest.raises(ValueError, match="knn_distance"):  # bank_sq without query_sq
        ood._gate_kernels.knn_distance(sims, n, width, 1, bank_sq, None, out)


def test_gate_scores_are_the_same_in_both_codes(gated_model, cohort_crops):
    """The whole per-batch work, compiled and numpy, on the tiny model's own outputs: the
    embedding part's distances bit for bit, the image part to float32 rounding (its descriptor);
    every verdict the same."""
    from liverstage.runtime import ood

    if ood.gate_kernels() != "compiled":
        pytest.skip("the gate's compiled kernels were not built here")
    backend = open_backend(gated_model, device="cpu")
    gate = OodGate.from_metadata(backend.metadata)
    for _, _, crops in cohort_crops:
        outputs = backend.run(crops)
        compiled = gate.scores(outputs, crops)
        ood.use_gate_kernels("numpy")
        try:
            reference = gate.scores(outputs, crops)
        finally:
            ood.use_gate_kernels("compiled")
        assert np.array_equal(compiled.embedding, reference.embedding)
        np.testing.assert_allclose(compiled.image, reference.image, rtol=1e-4, atol=1e-5)
        assert gate.judge(compiled).uncertain == gate.judge(reference).uncertain


def test_gate_payload_for_resnet50_outputs():
    """ResNet50's 2048-d embedding: its bank is stored in 64 principal directions, far below 4 MB."""
    rng = np.random.default_rng(2)
    outputs = {"embedding": np.abs(rng.standard_normal((300, 2048))).astype(np.float32)}  # post-ReLU
    images = rng.uniform(0, 1, (300, 1, 32, 32)).astype(np.float32)
    held = {name: value[:40] for name, value in outputs.items()}
    gate = build_gate(outputs, images, held, images[:40], clip_low=-0.5, clip_high=1.5).config
    assert gate["embedding"]["basis"]["shape"] == [2048, 64] and gate["embedding"]["bank"]["shape"] == [300, 64]
    assert "early" not in gate  # gate format 3: no early-stage part
    per_crop = 2 * (64 + DESCRIPTOR_DIM)
    bases = 2 * 2048 * 64
    assert payload_bytes(gate) == bases + 300 * per_crop
    assert bases + MAX_BANK * per_crop <= 4 * 2**20  # the largest bank export writes


def test_thresholds_pool_held_out_and_leave_one_patient_out_bank_crops():
    """Each bank crop is scored against the bank without its own patient's crops, and those
    distances join the held-out crops' in the thresholds' quantiles (export/ood_fit.py)."""
    from liverstage.export.ood_fit import leave_out_usable, threshold_scores  # noqa: PLC0415

    rng = np.random.default_rng(5)
    n_bank, n_held = 60, 12
    outputs = {"embedding": rng.standard_normal((n_bank + n_held, 16)).astype(np.float32)}
    images = rng.uniform(0, 1, (n_bank + n_held, 1, 32, 32)).astype(np.float32)
    bank_out = {k: v[:n_bank] for k, v in outputs.items()}
    held_out = {k: v[n_bank:] for k, v in outputs.items()}
    patients = [f"p{i // 10}" for i in range(n_bank)]  # 6 patients of 10 crops
    clip = dict(clip_low=-0.5, clip_high=1.5)
    config, fitted_scores, fitted_groups = build_gate(bank_out, images[:n_bank], held_out, images[n_bank:],
                                                      bank_patients=patients, held_patients=["h0"] * 6 + ["h1"] * 6, **clip)
    assert config["fit"]["threshold_crops"] == n_held + n_bank and config["fit"]["leave_patient_out_crops"] == n_bank
    assert config["fit"]["threshold_patients"] == 8
    gate = OodGate(config, **clip)
    scores, groups = threshold_scores(gate, bank_out, images[:n_bank], patients, held_out, images[n_bank:],
                                      ["h0"] * 6 + ["h1"] * 6)
    assert len(set(groups.tolist())) == 8 and groups[-1] == "bank:p5"
    # what build_gate returns (and export's cross-fitted figure reuses) are these same distances
    assert fitted_groups.tolist() == groups.tolist()
    for part in PARTS:
        np.testing.assert_array_equal(getattr(fitted_scores, part), getattr(scores, part))
    # brute force for one bank crop of patient p2: the k-th nearest among the other patients' crops
    i = 25
    others = [j for j in range(n_bank) if patients[j] != patients[i]]
    feats = gate.image_features(images[:n_bank])
    bank_rows = np.asarray(gate._image_bank[0]).T
    d = np.sort(np.linalg.norm(bank_rows[others] - feats[i], axis=1))
    assert scores.image[n_held + i] == pytest.approx(d[gate.k["image"] - 1], rel=1e-4)
    alone = gate.scores({k: v[[i]] for k, v in bank_out.items()}, images[[i]])
    d_all = np.sort(np.linalg.norm(bank_rows - feats[i], axis=1))  # itself included, at distance ~0
    assert alone.image[0] == pytest.approx(d_all[gate.k["image"] - 1], rel=1e-4) and d_all[0] < 1e-3
    assert alone.image[0] < scores.image[n_held + i]
    for part in PARTS:  # the thresholds are the quantiles of the pooled distances
        q = np.quantile(getattr(scores, part), 1 - config["false_alarm_rate"] / len(PARTS))
        assert config[part]["threshold"] == pytest.approx(max(q, 1e-6))
    assert not leave_out_usable(["a"] * 10, 5).any()
    assert leave_out_usable(["a"] * 3 + ["b"] * 5, 5).tolist() == [True] * 3 + [False] * 5
    with pytest.raises(ValueError, match="exclude must be"):
        gate.scores(bank_out, images[:n_bank], exclude=np.zeros((2, 2), dtype=bool))


def test_a_gate_leaves_numpy_blas_one_thread(gated_model):
    """The gate's products must not wait for a second BLAS thread on cores the model is using."""
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        OodGate.from_metadata(open_backend(gated_model, device="cpu").metadata)
        blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
        assert blas and all(lib["num_threads"] == 1 for lib in blas)


def test_gate_flags_noise_and_passes_held_out_phantoms(gated_model, cohort_crops, tmp_path):
    backend = open_backend(gated_model, device="cpu")
    gate = OodGate.from_metadata(backend.metadata)
    verdicts = [gate.judge(gate.scores(backend.run(c), c)) for _, _, c in cohort_crops]
    assert sum(v.uncertain for v in verdicts) <= 1  # in-distribution: at most one false alarm in 12
    vol, mask = noise_volume(tmp_path)
    run = Predictor(backend, mask=mask).run([vol])
    r = run.results[0]
    assert r.verdict.uncertain and r.verdict.ood.score > 1.0
    assert "look unlike the liver crops" in r.verdict.ood.reason
    assert r.ood_scores.score.shape == (len(r.slices),)
    assert np.median(r.ood_scores.score) == pytest.approx(r.verdict.ood.score)


def test_the_reason_names_a_region_cut_otherwise_than_the_bank(gated_model, tmp_path):
    """Crops cut from a box or by --roi auto differ from mask-cut training crops; the reason says
    so (and what to do) instead of calling liver MRI "not liver MRI", and only where the bank's
    crops were cut otherwise (its `fit.bank_regions`, recorded at export; unknown for older models)."""
    backend = open_backend(gated_model, device="cpu")
    vol, mask = noise_volume(tmp_path)
    crops = Predictor(backend, mask=mask).run([vol]).results[0]
    assert crops.region == "mask" and crops.verdict.uncertain
    metadata = backend.metadata
    spec = metadata.preprocess

    def reason(bank_regions, region):
        config = json.loads(json.dumps(metadata.ood))
        config["fit"]["bank_regions"] = bank_regions
        gate = OodGate(config, clip_low=spec.clip_low, clip_high=spec.clip_high)
        return gate.judge(crops.ood_scores, region=region).reason

    plain = "not liver MRI like the training data, so the stage is not reliable"
    assert reason("mask", "mask").endswith(plain) and reason(None, "mask").endswith(plain)
    assert reason("auto", "auto").endswith(plain) and reason("mixed", "auto").endswith(plain)
    told = reason("mask", "auto")
    assert "cut from a rough liver region found without a mask (--roi auto), the model's training crops from liver masks" in told
    assert "give a liver mask" in told and not told.endswith(plain)
    assert "a box (--bbox), the model's training crops with --roi auto" in reason("auto", "bbox")
    assert "if the model's training crops were cut from liver masks" in reason(None, "bbox")  # not recorded
    assert reason("mask", "auto").split(":")[0] == reason("mask", "mask").split(":")[0]  # the same counts first
    with pytest.raises(ValueError, match="region must be one of"):
        OodGate.from_metadata(metadata).judge(crops.ood_scores, region="box")
    bbox_run = Predictor(backend, bbox=(30, 18, 0, 56, 46, 16)).run([vol]).results[0]
    assert bbox_run.region == "bbox"
    assert bbox_run.verdict.uncertain and "(--bbox)" in bbox_run.verdict.ood.reason


def test_a_gate_below_its_detection_target_warns_on_every_result(gated_model, cohort_crops):
    """A gate that flagged fewer far-out-of-distribution volumes at export than FAR_OOD_TARGET
    (its `fit.far_ood_detection`) lets more input the model was not made for through as staged;
    predict then warns on every result of that model, and changes nothing else."""
    backend = open_backend(gated_model, device="cpu")
    metadata = backend.metadata
    spec = metadata.preprocess

    def config_with(detection):
        config = json.loads(json.dumps(metadata.ood))
        config["fit"]["far_ood_detection"] = detection
        return config

    def warning(detection):
        return OodGate(config_with(detection), clip_low=spec.clip_low, clip_high=spec.clip_high).detection_warning()

    assert OodGate.from_metadata(metadata).detection_warning() is None  # not recorded (older exports)
    assert warning(1.0) is None and warning(FAR_OOD_TARGET) is None
    for odd in (True, 1.5, -0.1, "0.5", None, float("nan")):
        assert warning(odd) is None, odd
    weak = warning(0.676)
    assert "flagged only 67.6% of the far-out-of-distribution test volumes at export (target 99%)" in weak
    vol, mask, _ = cohort_crops[8]
    before = Predictor(backend, mask=mask).run([vol]).results[0]
    backend.metadata = metadata.replace(ood=config_with(0.676))
    after = Predictor(backend, mask=mask).run([vol]).results[0]
    assert weak in after.warnings and weak not in before.warnings
    assert after.verdict.stage == before.verdict.stage and after.verdict.uncertain == before.verdict.uncertain
    np.testing.assert_array_equal(after.ood_scores.score, before.ood_scores.score)


def test_staging_is_unchanged_by_the_gate(gated_model, tiny_model, cohort_crops):
    """The same volumes through the same network with and without a gate: identical stages and probabilities."""
    with_gate = Predictor(open_backend(gated_model, device="cpu"))
    without = Predictor(open_backend(tiny_model, device="cpu"))
    for vol, mask, _ in cohort_crops[8:]:
        with_gate.mask = without.mask = mask
        a, b = with_gate.run([vol]).results[0], without.run([vol]).results[0]
        assert a.verdict.stage == b.verdict.stage
        assert a.verdict.probabilities == b.verdict.probabilities
        np.testing.assert_array_equal(a.probs, b.probs)
        assert b.verdict.uncertain and b.verdict.ood.reason == NO_GATE_REASON and b.ood_scores is None


def test_cli_report_table_and_strict(gated_model, tmp_path, run_cli, small_volume_path):
    noise, noise_mask = noise_volume(tmp_path)
    liver, liver_mask = small_volume_path
    report = tmp_path / "r.json"
    code, out, err = run_cli(["predict", noise, "--model", gated_model, "--mask", noise_mask, "--report", report])
    assert code == 0, err  # uncertain is an answer, not an error
    assert "uncertain" in out and "look unlike the liver crops" in out
    result = json.loads(report.read_text())["results"][0]
    assert result["uncertain"] is True and result["ood_score"] > result["ood_threshold"] == 1.0
    assert "look unlike" in result["uncertain_reason"]
    assert all(c["ood_score"] is not None for c in result["crops"])
    report.unlink()
    code, _, err = run_cli(["predict", noise, "--model", gated_model, "--mask", noise_mask, "--report", report,
                            "--strict", "--quiet"])
    assert code == 3 and report.is_file() and err == ""  # routed to a person, the report still written
    code, _, err = run_cli(["predict", liver, "--model", gated_model, "--mask", liver_mask, "--strict", "--quiet"])
    assert code == 0, err


def test_model_without_gate_is_uncertain_not_an_error(tiny_model, small_volume_path, tmp_path, run_cli):
    vol, mask = small_volume_path
    report = tmp_path / "r.json"
    code, out, err = run_cli(["predict", vol, "--model", tiny_model, "--mask", mask, "--report", report])
    assert code == 0, err
    result = json.loads(report.read_text())["results"][0]
    assert result["uncertain"] is True and result["uncertain_reason"] == NO_GATE_REASON
    assert result["ood_score"] is None and result["stage"] in "ABC"
    code, _, _ = run_cli(["predict", vol, "--model", tiny_model, "--mask", mask, "--strict", "--quiet"])
    assert code == 3


def test_malformed_gate_is_one_clear_line(tiny_onnx, tmp_path, run_cli, small_volume_path):
    vol, mask = small_volume_path
    meta = tiny_onnx.tiny_metadata(crop_size=CROP, ood={"method": "knn-embedding+knn-image", "format_version": 1})
    model = tiny_onnx.build_tiny_onnx(tmp_path / "bad.onnx", crop_size=CROP, metadata=meta)
    with pytest.raises(ModelError, match="invalid out-of-distribution gate"):
        Predictor(open_backend(model, device="cpu"))
    report = tmp_path / "r.json"
    code, _, err = run_cli(["predict", vol, "--model", model, "--mask", mask, "--report", report])
    assert code == 2 and "invalid out-of-distribution gate" in err and len(err.strip().splitlines()) == 1
    assert not report.exists()


def test_bench_says_which_gate_code_ran(gated_model, capsys):
    """The gate's time depends on whether its compiled kernels were built: bench records which
    code ran and, when it was the numpy code, says so above the table."""
    from liverstage.runtime import ood
    from liverstage.runtime.bench import BenchConfig, run_bench
    from liverstage.runtime.cli.bench_cmd import print_bench

    built = ood.gate_kernels()
    kinds = ("compiled", "numpy") if built == "compiled" else ("numpy",)
    try:
        for kind in kinds:
            ood.use_gate_kernels(kind)
            result = run_bench(BenchConfig(model=gated_model, backends=("onnx",), batch_sizes=(4,), warmup=1, iters=2))
            assert result["machine"]["ood_gate_kernels"] == kind
            print_bench(result)
            note = "OOD gate: numpy code" in capsys.readouterr().out
            assert note is (kind == "numpy")
    finally:
        ood.use_gate_kernels(built)


def test_bench_times_the_gate(gated_model, tiny_model):
    from liverstage.runtime.bench import BenchConfig, run_bench

    for model, gated in ((gated_model, True), (tiny_model, False)):
        result = run_bench(BenchConfig(model=model, backends=("onnx",), batch_sizes=(16,), warmup=1, iters=3))
        row = result["results"][0]
        assert (row["ood_gate_ms"] is not None) is gated
        if gated:
            assert row["ood_gate_ms"] > 0 and row["ood_gate_fraction"] == pytest.approx(row["ood_gate_ms"] / row["p50_ms"])
