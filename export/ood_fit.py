"""Fit the out-of-distribution gate at export, and measure it (runtime/ood.py says what it is).

Everything is computed from the exported model's own outputs (the candidate ONNX model run with
ONNX Runtime, as the parity check does), so an fp16 or int8 model gets banks and thresholds that
fit it rather than the float32 network's.

Where the crops come from:
- bank: training patients' crops (at most MAX_BANK, evenly spaced), the embeddings stored in
  their own top BASIS_DIM principal directions and the image descriptors (runtime/ood.py);
- thresholds: held-out in-distribution crops, i.e. the checkpoint's validation and test
  patients; if it has none, fresh phantoms when it was trained on phantoms, else the training
  patients are split in two by patient (bank / thresholds; such thresholds are a little low,
  so the gate errs towards "uncertain");
- with only `--calibration-manifest` reachable, its patients are split the same way;
- with no in-distribution crops at all there is no gate (every result of the model is then
  uncertain) and the export says so.
Each part's crop threshold is the (1 - FALSE_ALARM_RATE / 2) quantile of its distances on the
threshold crops, so the two parts together flag at most about FALSE_ALARM_RATE of them. The
threshold crops are the held-out crops and, leave-one-patient-out, the bank's own: each bank
crop's distance to the bank without that patient's crops (the jackknife+ idea: Barber, Candes,
Ramdas, Tibshirani, "Predictive inference with the jackknife+", Ann. Statist. 2021). Why: a
part whose distances vary from patient to patient more than from crop to crop (the early-stage
statistics of gate format 2 did) has its threshold set by the few most atypical held-out patients; the demo has
12, so a new patient beyond all of them was flagged whole (4 of 100 fresh phantoms on the
64-px demo with held-out crops alone, 1 of 100 with the bank's 48 patients added;
README: the out-of-distribution gate). The bank crops' principal basis and the image
descriptor's standardisation include the left-out patient: a small optimism, measured as no
larger than the held-out patients' (their distances' medians agree within 2 %).

Measured and written into the parity JSON and the model card (never the banks): the false-alarm
rate on the threshold crops and their patients' volumes, cross-fitted (thresholds from one half
of those patients, rates on the other half, both ways round: a rate measured on the crops a
threshold was fitted on would only repeat the chosen rate), and per far-out-of-distribution kind
(export/ood_sets.py) the share of volumes flagged or refused and of crops flagged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import numpy as np

from liverstage.runtime.errors import InputError
from liverstage.runtime.ood import (BANK_REGION_WORDS, BANK_REGIONS_WITH_AUTO, BASIS_DIM, DESCRIPTOR_FAMILIES,
                                    FAR_OOD_TARGET, GATE_FORMAT_VERSION, GATE_METHOD, PARTS, SPHERE_PARTS, THRESHOLD,
                                    CropScores, OodGate, encode_array, image_descriptor, normalise_rows)

FALSE_ALARM_RATE = 0.02  # per crop, on held-out in-distribution crops, both parts together
K_NEIGHBOURS = 5
MAX_BANK = 1024
MIN_SCALE = 1e-3  # floor of a descriptor feature's standard deviation over the bank
OOD_CROPS_PER_CASE = 16


def _evenly(n: int, limit: int) -> np.ndarray:
    return np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).round().astype(int)


def _sphere_part(values: np.ndarray, k: int) -> tuple[dict[str, Any], float]:
    """A sphere part's entry (runtime/ood.py): its basis and the bank's coordinates in it, and
    the share of the bank's energy that basis holds."""
    rows = normalise_rows(values)
    basis, energy = principal_basis(rows, BASIS_DIM)
    basis = basis.astype(np.float16).astype(np.float32)  # the bank's coordinates in the basis the runtime decodes
    return {"k": k, "threshold": 1.0, "basis": encode_array(basis), "bank": encode_array(rows @ basis)}, energy


def _quantile(false_alarm_rate: float) -> float:
    """Each part's threshold quantile: the parts share the false-alarm rate equally."""
    return 1.0 - false_alarm_rate / len(PARTS)


class FittedGate(NamedTuple):
    """A fitted gate: the `ModelMetadata.ood` entry, and the threshold crops' distances with a
    patient group per crop (`threshold_scores`), which export's cross-fitted figure reuses."""

    config: dict[str, Any]
    scores: CropScores
    groups: np.ndarray


def build_gate(bank_outputs: dict[str, np.ndarray], bank_images: np.ndarray, held_outputs: dict[str, np.ndarray],
               held_images: np.ndarray, *, clip_low: float, clip_high: float, bank_patients=None, held_patients=None,
               false_alarm_rate: float = FALSE_ALARM_RATE, k: int = K_NEIGHBOURS, fit: dict | None = None) -> FittedGate:
    """Banks from the bank crops and the model's outputs for them (`embedding`),
    thresholds from the held-out ones and, given `bank_patients` (one id per bank crop), the
    bank's own crops left out by patient (module docstring)."""
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate!r}")
    if bank_patients is not None and len(bank_patients) != len(bank_images):
        raise ValueError(f"bank_patients: {len(bank_patients)} ids for {len(bank_images)} bank crops")
    for name, outputs, images in (("bank", bank_outputs, bank_images), ("held-out", held_outputs, held_images)):
        if any(len(outputs[output]) != len(images) for output in SPHERE_PARTS.values()):
            raise ValueError(f"{name}: the model outputs and the images must come in pairs")
    if len(held_images) < 1 or len(bank_images) < k:
        raise ValueError(f"need at least {k} bank crops and one held-out crop, got {len(bank_images)} and {len(held_images)}")
    raw = image_descriptor(bank_images, clip_low=clip_low, clip_high=clip_high).astype(np.float64)
    mean = raw.mean(axis=0)
    family_size = np.concatenate([np.full(n, n, dtype=np.float64) for n in DESCRIPTOR_FAMILIES.values()])
    # Each family (layout, histogram, texture) weighs the same, whatever its number of features.
    scale = np.maximum(raw.std(axis=0), MIN_SCALE) * np.sqrt(family_size)
    config: dict[str, Any] = {
        "method": GATE_METHOD, "format_version": GATE_FORMAT_VERSION,
        "false_alarm_rate": float(false_alarm_rate),
        "volume_rule": "uncertain when the median crop score is above 1 (more than half the crops atypical)",
        "image": {"k": k, "threshold": 1.0, "mean": [float(v) for v in mean], "scale": [float(v) for v in scale],
                  "bank": encode_array((raw - mean) / scale)},
        "fit": dict(fit or {}),
    }
    energies = {}
    for part, output in SPHERE_PARTS.items():
        config[part], energies[part] = _sphere_part(bank_outputs[output], k)
    # Thresholds from the decoded (float16) banks, i.e. exactly what the runtime will compute.
    gate = OodGate(config, clip_low=clip_low, clip_high=clip_high)
    scores, groups = threshold_scores(gate, bank_outputs, bank_images, bank_patients, held_outputs, held_images,
                                      held_patients)
    config = with_thresholds_from(config, scores, false_alarm_rate=false_alarm_rate)
    left_out = sum(group.startswith("bank:") for group in groups.tolist())
    config["fit"].update(bank_crops=int(len(bank_images)), threshold_crops=int(len(groups)),
                         held_out_crops=int(len(held_images)), leave_patient_out_crops=int(left_out),
                         basis_dim={part: int(config[part]["basis"]["shape"][1]) for part in SPHERE_PARTS},
                         basis_energy=energies)
    if bank_patients is not None or held_patients is not None:
        config["fit"]["threshold_patients"] = len(set(groups.tolist()))
    return FittedGate(config, scores, groups)


def leave_out_usable(bank_patients, k: int) -> np.ndarray:
    """Which bank crops can be scored leave-one-patient-out: those with at least k crops of
    other patients in the bank (none with a single patient)."""
    patients = np.asarray(list(bank_patients))
    _, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    return len(patients) - counts[inverse] >= k


def threshold_scores(gate: OodGate, bank_outputs, bank_images, bank_patients, held_outputs, held_images,
                     held_patients) -> tuple[CropScores, np.ndarray]:
    """The threshold crops' distances (held-out crops, then the bank's own crops scored against
    the bank without their patient) and a patient group per crop ('held:<id>', 'bank:<id>'; one
    group per crop where ids are not given)."""
    held = gate.scores(held_outputs, held_images)
    held_groups = (np.array([f"held:{p}" for p in held_patients]) if held_patients is not None
                   else np.array([f"held-crop:{i}" for i in range(len(held_images))]))
    if bank_patients is None:
        return held, held_groups
    patients = np.asarray(list(bank_patients))
    exclude = patients[:, None] == patients[None, :]
    usable = leave_out_usable(patients, max(gate.k.values()))
    if not usable.any():
        return held, held_groups
    bank = gate.scores({name: np.asarray(v)[usable] for name, v in bank_outputs.items()}, bank_images[usable],
                       exclude=exclude[usable])
    pooled = CropScores(**{f.name: np.concatenate([getattr(held, f.name), getattr(bank, f.name)])
                           for f in dataclasses.fields(CropScores)})
    return pooled, np.concatenate([held_groups, np.array([f"bank:{p}" for p in patients[usable]])])


def principal_basis(rows: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
    """The top `dim` right singular vectors of `rows` [K, D] (uncentred) as [D, m], and the share
    of the rows' energy they hold. From the eigenvectors of the smaller Gram matrix (K x K or
    D x D): as exact as an SVD and many times faster on a busy 2-core machine."""
    r = np.asarray(rows, dtype=np.float64)
    k, d = r.shape
    if k <= d:
        eigval, eigvec = np.linalg.eigh(r @ r.T)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        m = int(min(dim, np.count_nonzero(eigval > eigval[0] * 1e-12)))
        basis = (r.T @ eigvec[:, :m]) / np.sqrt(eigval[:m])[None, :]
    else:
        eigval, eigvec = np.linalg.eigh(r.T @ r)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        m = min(dim, d)
        basis = eigvec[:, :m]
    energy = float(eigval[:m].sum() / max(eigval.sum(), 1e-300))
    return basis.astype(np.float32), energy


def with_thresholds_from(config: dict[str, Any], scores: CropScores, *, false_alarm_rate: float) -> dict[str, Any]:
    """A copy of `config` whose thresholds come from these (unnormalised) distances; a part whose
    held-out crops all equal bank crops (distance 0) gets a tiny threshold: any distance is atypical."""
    out = {**config, **{part: dict(config[part]) for part in PARTS}}
    for part in PARTS:
        out[part]["threshold"] = max(float(np.quantile(getattr(scores, part), _quantile(false_alarm_rate))), 1e-6)
    return out


def volume_flags(gate: OodGate, scores: CropScores, groups: np.ndarray) -> tuple[float, float]:
    """(share of crops atypical, share of groups (volumes) uncertain) under `gate`'s thresholds."""
    score = gate.crop_score(scores)
    volumes = [float(np.median(score[groups == g])) > THRESHOLD for g in dict.fromkeys(groups.tolist())]
    return float(np.mean(score > THRESHOLD)), float(np.mean(volumes))


def cross_fitted_false_alarms(config: dict[str, Any], scores: CropScores, groups: np.ndarray, *,
                              clip_low: float, clip_high: float) -> dict[str, Any] | None:
    """False-alarm rates on the threshold crops and their patients' volumes with thresholds
    fitted on the other half of the patients (`threshold_scores` gives both arguments)."""
    ids = sorted(set(groups.tolist()))
    if len(ids) < 2:
        return None
    halves = [set(ids[0::2]), set(ids[1::2])]
    crop_rates, volume_rates = [], []
    for fit_half, test_half in (halves, halves[::-1]):
        fit_mask = np.isin(groups, list(fit_half))
        test_mask = np.isin(groups, list(test_half))
        fitted = OodGate(with_thresholds_from(config, scores.select(fit_mask), false_alarm_rate=config["false_alarm_rate"]),
                         clip_low=clip_low, clip_high=clip_high)
        crops, volumes = volume_flags(fitted, scores.select(test_mask), groups[test_mask])
        crop_rates.append(crops)
        volume_rates.append(volumes)
    return {"crops": float(np.mean(crop_rates)), "volumes": float(np.mean(volume_rates)),
            "patients": len(ids), "n_crops": int(len(groups))}


def detection(config: dict[str, Any], embed: Callable[[np.ndarray], dict[str, np.ndarray]], spec, cases) -> dict[str, Any]:
    """Per far-OOD kind: volumes flagged or refused, and crops flagged, under `config`."""
    from nibabel import orientations  # noqa: PLC0415

    from liverstage.runtime.crops import make_crops  # noqa: PLC0415
    from liverstage.runtime.io import volume_from_array  # noqa: PLC0415

    gate = OodGate(config, clip_low=spec.clip_low, clip_high=spec.clip_high)
    kinds: dict[str, dict[str, Any]] = {}
    for case in cases:
        entry = kinds.setdefault(case.kind, {"volumes": 0, "refused": 0, "flagged": 0, "crops": 0, "crops_flagged": 0})
        entry["volumes"] += 1
        try:
            volume = volume_from_array(case.data, case.affine, source=case.name)
            region = np.ascontiguousarray(orientations.apply_orientation(case.region, volume.ornt))
            crops = make_crops(volume, region, spec)
            if len(crops) == 0:
                raise InputError(f"{case.name}: no crops")
        except InputError:
            entry["refused"] += 1
            continue
        images = crops.images[_evenly(len(crops), OOD_CROPS_PER_CASE)]
        scores = gate.scores(embed(images), images)
        verdict = gate.judge(scores)
        entry["flagged"] += int(verdict.uncertain)
        entry["crops"] += int(len(images))
        entry["crops_flagged"] += int((scores.score > THRESHOLD).sum())
    for entry in kinds.values():
        entry["detection"] = (entry["refused"] + entry["flagged"]) / entry["volumes"]
        entry["crop_detection"] = entry["crops_flagged"] / entry["crops"] if entry["crops"] else None
    total = sum(e["volumes"] for e in kinds.values())
    caught = sum(e["refused"] + e["flagged"] for e in kinds.values())
    return {"kinds": kinds, "volumes": total, "detection": caught / total if total else None}


def _split_by_patient(crops):
    ids = sorted(set(crops.patients))
    first = set(ids[0::2])
    return crops.select(first, crops.source + " (half of the patients)"), crops.select(set(ids) - first, crops.source + " (other half)")


def gate_crops(crops, ckpt, spec) -> tuple[Any, Any, str] | None:
    """(bank crops, held-out crops, how they were chosen) or None when nothing in-distribution is reachable."""
    from . import data  # noqa: PLC0415

    bank, held = getattr(crops, "bank", None), getattr(crops, "held_out", None)
    if bank is not None and len(bank) and held is not None and len(held):
        return bank, held, "bank: training patients; thresholds: validation/test patients"
    if bank is not None and len(bank):
        if data.is_phantom_manifest(ckpt.manifest_path()):
            return bank, data.phantom_crops(spec, patients=8, seed=20261201), \
                "bank: training patients; thresholds: fresh phantoms (no validation/test patients)"
        if len(set(bank.patients)) >= 2:
            first, second = _split_by_patient(bank)
            return first, second, "bank and thresholds: the training patients split in two (no validation/test patients)"
    if crops.calibration is not None and not crops.phantoms and len(set(crops.calibration.patients)) >= 2:
        first, second = _split_by_patient(crops.calibration)
        return first, second, "bank and thresholds: the calibration manifest's patients split in two"
    return None


def fit_for_export(session, crops, ckpt, spec, *, echo: Callable[[str], None] = print,
                   ood_cases=None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(ModelMetadata.ood or None, figures for the parity JSON and the model card)."""
    from .ood_sets import far_ood_cases  # noqa: PLC0415
    from .parity import run_session  # noqa: PLC0415

    def embed(images: np.ndarray) -> dict[str, np.ndarray]:
        return run_session(session, images)

    chosen = gate_crops(crops, ckpt, spec)
    if chosen is None:
        echo("out-of-distribution gate: NONE (no in-distribution crops reachable: keep the training manifest "
             "where it was or pass --calibration-manifest); every result of this model will be 'uncertain'")
        return None, {"gate": None, "reason": "no in-distribution crops reachable at export"}
    bank, held, how = chosen
    bank = bank.subsample(MAX_BANK)
    fit = {"source": f"{how}, and each bank patient left out in turn", "bank_source": bank.source,
           "bank_regions": bank.regions,
           "threshold_source": f"{held.source}, and the bank's patients left out one at a time"}
    clip = dict(clip_low=spec.clip_low, clip_high=spec.clip_high)
    held_outputs, bank_outputs = embed(held.images), embed(bank.images)
    config, scores, groups = build_gate(bank_outputs, bank.images, held_outputs, held.images,
                                        bank_patients=bank.patients, held_patients=held.patients, fit=fit, **clip)
    cases = far_ood_cases() if ood_cases is None else ood_cases
    figures = {
        "method": config["method"], "false_alarm_rate_target": config["false_alarm_rate"],
        "k": config["embedding"]["k"], "thresholds": {p: config[p]["threshold"] for p in PARTS},
        "fit": config["fit"],
        "held_out_false_alarms": cross_fitted_false_alarms(config, scores, groups, **clip),
        "far_ood": detection(config, embed, spec, cases),
        "bank_bytes": payload_bytes(config),
        "far_ood_target": FAR_OOD_TARGET,
    }
    config["fit"]["far_ood_detection"] = figures["far_ood"]["detection"]  # predict warns below the target
    figures["warning"] = detection_shortfall(figures)
    echo(format_figures(figures))
    return config, figures


def _cut(fit: dict[str, Any]) -> str:
    """How the bank's crops were cut, for the card: a volume cut otherwise is flagged by that alone."""
    regions = fit.get("bank_regions")
    return f" cut {BANK_REGION_WORDS[regions]}" if regions in BANK_REGION_WORDS else ""


def detection_shortfall(figures: dict[str, Any]) -> str | None:
    """The warning for a gate that flagged or refused fewer far-out-of-distribution volumes than
    FAR_OOD_TARGET at export (None when it met it or nothing was measured)."""
    ood = figures.get("far_ood") or {}
    rate = ood.get("detection")
    if rate is None or rate >= FAR_OOD_TARGET:
        return None
    missed = sorted((entry["detection"], kind) for kind, entry in ood["kinds"].items() if entry["detection"] < 1.0)
    text = (f"the out-of-distribution gate flagged or refused {rate:.1%} of {ood['volumes']} far-out-of-distribution "
            f"volumes, below the target of {FAR_OOD_TARGET:.0%} (missed most: "
            + ", ".join(f"{kind} {share:.0%}" for share, kind in missed[:3])
            + "); predict warns on every result of this model")
    if figures["fit"].get("bank_regions") in BANK_REGIONS_WITH_AUTO:
        text += ("; its bank crops were cut with --roi auto (on the demo's phantoms, a model trained on crops cut "
                 "both ways flagged 68% of these volumes, one trained on mask crops 100%): train on crops cut "
                 "from liver masks")
    return text


def format_figures(figures: dict[str, Any]) -> str:
    """Terminal lines for the gate's figures."""
    fit = figures["fit"]
    lines = [f"out-of-distribution gate ({figures['method']}, k {figures['k']}, {fit['source']}; "
             f"{fit['bank_crops']} bank crops{_cut(fit)}, {fit['threshold_crops']} threshold crops of "
             f"{fit['threshold_patients']} patients):"]
    far = figures.get("held_out_false_alarms")
    if far:
        lines.append(f"  false alarms on in-distribution crops not in the bank (cross-fitted over {far['patients']} "
                     f"patients): crops {far['crops']:.1%}, "
                     f"volumes {far['volumes']:.1%} "
                     f"(thresholds set for {figures['false_alarm_rate_target']:.0%} of crops; fitted on half the patients and "
                     "measured on the other half, which overstates what the full fit flags)")
    ood = figures["far_ood"]
    if ood["volumes"]:
        kinds = ", ".join(f"{k} {v['detection']:.0%}" for k, v in ood["kinds"].items())
        lines.append(f"  far-out-of-distribution volumes flagged or refused: {ood['detection']:.1%} of {ood['volumes']} ({kinds})")
    if figures.get("warning"):
        lines.append(f"  WARNING: {figures['warning']}")
    return "\n".join(lines)


def payload_bytes(config: dict[str, Any]) -> int:
    """The gate's raw payload: its basis and banks as float16 (base64 in the metadata adds a third)."""
    arrays = [config[part][name] for part in SPHERE_PARTS for name in ("basis", "bank")] + [config["image"]["bank"]]
    return sum(2 * math.prod(a["shape"]) for a in arrays)
