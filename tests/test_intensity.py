"""CT air in a volume's raw intensities (runtime/intensity.py): phantoms (synthetic MR, not
patients) and a z-scored copy hold none, a copy mapped to Hounsfield units holds a lot and is
flagged through predict, with its reason first."""

import numpy as np
import pytest

from liverstage.phantoms.synth import synth_patient
from liverstage.runtime.intensity import AIR_LEVEL, AIR_SHARE, SLAB_SLICES, air_reason, air_share
from liverstage.runtime.io import volume_from_array
from liverstage.runtime.ood import NO_GATE
from liverstage.runtime.predict import with_reason


def phantom(index: int):
    p = synth_patient(index, seed=9_000_001, in_plane=64, slices=16)
    return p.data.astype(np.float32), p.mask, p.affine


def as_hounsfield(data: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """The phantom's intensities mapped to CT-like Hounsfield units: air -1000 around the body,
    its tissue -100 to 60 by intensity rank, the liver 55 +- 20, scanner noise 8."""
    rng = np.random.default_rng(seed)
    body = data > np.percentile(data, 30)
    lo, hi = np.percentile(data[body], [5, 95])
    ct = np.full(data.shape, -1000.0, np.float32)
    ct[body] = -100.0 + 160.0 * np.clip((data[body] - lo) / (hi - lo), 0.0, 1.0)
    ct[mask > 0] = 55.0 + rng.normal(0.0, 20.0, int((mask > 0).sum()))
    return (ct + rng.normal(0.0, 8.0, ct.shape)).astype(np.float32)


@pytest.mark.parametrize("index", range(4))
def test_mr_phantoms_hold_no_air_and_their_hounsfield_copies_much(index):
    data, mask, affine = phantom(index)
    mr = volume_from_array(data, affine, source="phantom")
    assert air_share(mr) == 0.0 and air_reason(air_share(mr)) is None
    zscored = volume_from_array((data - data.mean()) / data.std(), affine, source="z-scored")
    assert air_share(zscored) == 0.0  # a normalised MR is not a CT
    ct = volume_from_array(as_hounsfield(data, mask, seed=index), affine, source="ct")
    share = air_share(ct)
    assert share > 0.2 and "Hounsfield units" in air_reason(share)


def test_air_share_counts_every_slab():
    """More slices than one slab, the air in the last partial slab only: counted exactly."""
    data = np.zeros((8, 8, 2 * SLAB_SLICES + 3), np.float32)
    data[:, :, -1] = AIR_LEVEL  # at the level counts
    data[0, 0, -2] = AIR_LEVEL + 1.0  # above it does not
    share = air_share(volume_from_array(data, np.eye(4), source="slabs"))
    assert share == pytest.approx(64 / data.size)


def test_air_reason_from_the_threshold_on():
    assert air_reason(None) is None and air_reason(0.0) is None
    assert air_reason(np.nextafter(AIR_SHARE, 0.0)) is None
    assert air_reason(AIR_SHARE).startswith("1.0% of its voxels are at or below -500")
    flagged = with_reason(NO_GATE, air_reason(0.3))
    assert flagged.uncertain and flagged.reason.startswith("30.0% of its voxels")
    assert flagged.reason.endswith(NO_GATE.reason) and with_reason(NO_GATE, None) is NO_GATE


def test_predict_flags_a_hounsfield_volume(gated_model, predict_strict):
    """End to end from NIfTI files: a phantom as stored and mapped to Hounsfield units; the CT-like
    one is uncertain with the air reason first (exit 3 under --strict); the stored one is not
    flagged by it; `air_share` is in both reports."""
    data, mask, affine = phantom(1)
    reports = {name: predict_strict(name, values, mask, affine, gated_model)
               for name, values in {"stored": data, "hounsfield": as_hounsfield(data, mask)}.items()}
    code, ct = reports["hounsfield"]
    assert code == 3 and ct["uncertain"] is True and ct["air_share"] > 0.2
    assert ct["uncertain_reason"].startswith(f"{ct['air_share']:.1%} of its voxels are at or below -500")
    _, stored = reports["stored"]
    assert stored["air_share"] == 0.0 and "Hounsfield" not in (stored["uncertain_reason"] or "")
