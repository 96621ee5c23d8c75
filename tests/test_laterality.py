"""The liver region's side of the body (runtime/laterality.py): phantoms (synthetic, not
patients) are on the right, their mirrored copies are flagged through predict, and a body cut
by the field of view is not judged."""

import numpy as np
import pytest
from nibabel import orientations

from liverstage.phantoms.synth import synth_patient
from liverstage.runtime.io import Volume, load_mask, load_volume, volume_from_array
from liverstage.runtime.laterality import region_side, side_reason
from liverstage.runtime.ood import NO_GATE
from liverstage.runtime.predict import with_side


def canonical_phantom(index: int, *, seed: int = 9_000_001, in_plane: int = 96) -> tuple[Volume, np.ndarray]:
    phantom = synth_patient(index, seed=seed, in_plane=in_plane, slices=16)
    volume = volume_from_array(phantom.data, phantom.affine, source=f"phantom {index}")
    liver = np.asfortranarray(orientations.apply_orientation(phantom.mask, volume.ornt) > 0)
    return volume, liver


def mirrored(volume: Volume, liver: np.ndarray) -> tuple[Volume, np.ndarray]:
    """Image and liver flipped along canonical x, the affine kept: the liver on the patient's left."""
    return (volume_from_array(np.ascontiguousarray(volume.data[::-1]), volume.affine, source="mirrored"),
            np.asfortranarray(liver[::-1]))


@pytest.mark.parametrize("index", range(6))
def test_phantom_livers_are_right_of_the_midline_and_their_mirrors_left(index):
    volume, liver = canonical_phantom(index)
    side = region_side(volume, liver)
    assert side is not None and side > 0.1 and side_reason(side) is None
    flipped = region_side(*mirrored(volume, liver))
    assert flipped is not None and flipped < -0.1
    assert "patient's left" in side_reason(flipped)


def test_side_does_not_depend_on_how_the_file_stores_its_axes(small_cohort):
    """The cohort stores its phantoms in several axis orders and flips (affine to match): the
    side is read on the canonical grid, so every one judged is on the right (one of these 64-px
    phantoms has its flank cut by the field of view, beyond EDGE_FILL: not judged)."""
    from liverstage.runtime.manifest import read_manifest  # noqa: PLC0415

    rows = read_manifest(small_cohort)
    sides = []
    for row in rows:
        volume = load_volume(row.image)
        sides.append(region_side(volume, load_mask(row.mask, like=volume)))
    judged = [s for s in sides if s is not None]
    assert len(judged) >= len(sides) - 2 and all(s > 0.1 for s in judged), sides


def test_a_body_that_fills_the_field_of_view_is_not_judged():
    volume, liver = canonical_phantom(0)
    x0, x1 = np.nonzero(liver.any(axis=(1, 2)))[0][[0, -1]]
    cut = volume_from_array(np.ascontiguousarray(volume.data[max(0, x0 - 4):x1 + 5]), volume.affine, source="cut")
    assert region_side(cut, np.asfortranarray(liver[max(0, x0 - 4):x1 + 5])) is None  # a field of view cut to the liver
    noise = np.random.default_rng(0).uniform(0, 1, volume.shape).astype(np.float32)
    assert region_side(volume_from_array(noise, volume.affine, source="noise"), liver) is None


def test_with_side_makes_the_verdict_uncertain_and_keeps_the_gate_figures():
    assert with_side(NO_GATE, None) is NO_GATE and with_side(NO_GATE, 0.3) is NO_GATE
    left = with_side(NO_GATE, -0.2)
    assert left.uncertain and left.reason.startswith("the liver region lies on the patient's left (0.20 half body")
    assert NO_GATE.reason in left.reason and left.score is NO_GATE.score


def test_predict_flags_a_mirrored_liver_and_keeps_its_stage(gated_model, predict_strict):
    """End to end from NIfTI files: the same phantom as stored and mirrored; the mirrored one is
    uncertain with the side's reason (exit 3 under --strict), the stored one is not flagged by
    its side, and the side is in both reports."""
    volume, liver = canonical_phantom(1, in_plane=64)
    reports = {name: predict_strict(name, vol.data, mask, vol.affine, gated_model)
               for name, (vol, mask) in {"stored": (volume, liver), "mirrored": mirrored(volume, liver)}.items()}
    code, result = reports["mirrored"]
    assert code == 3 and result["uncertain"] is True and result["region_side"] < -0.1
    assert result["uncertain_reason"].startswith("the liver region lies on the patient's left")
    _, stored = reports["stored"]
    assert stored["region_side"] > 0.1 and "patient's left" not in (stored["uncertain_reason"] or "")


def test_a_dicom_series_reads_on_the_same_side(dicom_series, tmp_path):
    """The phantom written as a scanner stores an axial series (LPS geometry, columns to the
    patient's left): read back, the liver is still on the right, at the same side as the NIfTI."""
    from liverstage.runtime.dicom import load_dicom_series  # noqa: PLC0415

    volume, liver = canonical_phantom(0, in_plane=64)
    scaled = volume_from_array(np.round(np.asarray(volume.data)).astype(np.int16), volume.affine, source="int16")
    dicom_series.volume_as_series(scaled, tmp_path / "series")
    loaded = load_dicom_series(tmp_path / "series")
    assert loaded.shape == volume.shape
    side = region_side(loaded, liver)
    assert side is not None and side > 0.1 and side == pytest.approx(region_side(scaled, liver), abs=1e-9)
