"""Parity of an exported model against the PyTorch float32 graph, on real crops.

Measured after every export and written beside the model (`PATH.parity.json`): max |delta
cosine|, max |delta probs|, stage agreement (same argmax), finiteness and, on labelled crops, the
accuracy of both and its difference. Targets: fp32 max |delta cosine| <= 1e-4; fp16 <=
1e-2 with no NaN/Inf (also on inputs with a large embedding norm); int8 stage agreement >= 98 %
and accuracy within 1 point of fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from liverstage.runtime.model_meta import INPUT_NAME, OUTPUT_NAMES

TARGETS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_delta_cosine": 1e-4},
    "fp16": {"max_abs_delta_cosine": 1e-2},
    "int8": {"stage_agreement": 0.98, "max_accuracy_delta": 0.01},
}


def ort_session(model: bytes | str, *, threads: int = 2):
    """A CPU onnxruntime session (the reference runtime on every machine)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(session, images: np.ndarray, *, batch_size: int = 32) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32)
        for name, value in zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *,
            labels: np.ndarray | None = None) -> dict[str, Any]:
    """Figures for `candidate` against `reference` (both dicts of cosine/probs/embedding)."""
    finite = all(bool(np.isfinite(candidate[name]).all()) for name in OUTPUT_NAMES)
    with np.errstate(invalid="ignore"):
        delta_cos = np.abs(candidate["cosine"].astype(np.float64) - reference["cosine"])
        delta_probs = np.abs(candidate["probs"].astype(np.float64) - reference["probs"])
    ref_pred = reference["probs"].argmax(axis=1)
    cand_pred = candidate["probs"].argmax(axis=1)
    n = int(len(ref_pred))
    out: dict[str, Any] = {
        "n_crops": n,
        "finite": finite,
        "max_abs_delta_cosine": float(np.nanmax(delta_cos)) if finite else float("inf"),
        "mean_abs_delta_cosine": float(np.nanmean(delta_cos)) if finite else float("inf"),
        "max_abs_delta_probs": float(np.nanmax(delta_probs)) if finite else float("inf"),
        "stage_agreement": float((ref_pred == cand_pred).mean()) if n else None,
        "disagreements": int((ref_pred != cand_pred).sum()),
    }
    if labels is not None and len(labels) == n and n:
        labels = np.asarray(labels)
        out["accuracy_reference"] = float((ref_pred == labels).mean())
        out["accuracy"] = float((cand_pred == labels).mean())
        out["accuracy_delta"] = out["accuracy"] - out["accuracy_reference"]
    return out


def check_targets(precision: str, figures: dict[str, Any]) -> list[str]:
    """Failed targets as readable lines (empty list: all met)."""
    failures = []
    if not figures.get("finite", False):
        failures.append("outputs contain NaN or Inf")
    target = TARGETS[precision]
    if "max_abs_delta_cosine" in target and figures["max_abs_delta_cosine"] > target["max_abs_delta_cosine"]:
        failures.append(f"max |delta cosine| {figures['max_abs_delta_cosine']:.3g} > {target['max_abs_delta_cosine']:g}")
    if "stage_agreement" in target and (figures["stage_agreement"] or 0.0) < target["stage_agreement"]:
        failures.append(f"stage agreement {figures['stage_agreement']:.2%} < {target['stage_agreement']:.0%}")
    if "max_accuracy_delta" in target and "accuracy_delta" in figures:
        if abs(figures["accuracy_delta"]) > target["max_accuracy_delta"] + 1e-12:
            failures.append(f"accuracy differs from fp32 by {figures['accuracy_delta'] * 100:+.1f} points "
                            f"(limit {target['max_accuracy_delta'] * 100:.0f})")
    large = figures.get("large_norm")
    if large is not None and not large.get("finite", False):
        failures.append("NaN or Inf on large-norm inputs")
    return failures


def large_norm_inputs(images: np.ndarray, *, crop_size: int) -> np.ndarray:
    """Inputs whose raw feature norm is far above 256 (the norm whose square overflows float16):
    real crops scaled by 30 and 100 and a constant bright image, i.e. what a crop cut from an
    unnormalised volume could look like. Larger factors overflow the FP16 backbone activations
    themselves, which no float32 head can repair."""
    base = images[: min(4, len(images))].astype(np.float32)
    parts = [base * 30.0, base * 100.0, np.full((2, 1, crop_size, crop_size), 20.0, np.float32)]
    return np.concatenate(parts)


def large_norm_check(graph, session, *, images: np.ndarray, crop_size: int) -> dict[str, Any]:
    """Run `session` on large-norm inputs; report finiteness and the fp32 feature norms reached."""
    from .graph import torch_reference  # noqa: PLC0415

    inputs = large_norm_inputs(images, crop_size=crop_size)
    reference = torch_reference(graph, inputs)
    candidate = run_session(session, inputs)
    norms = np.linalg.norm(reference["feature"].astype(np.float64), axis=1)
    ref_finite = np.isfinite(reference["cosine"]).all(axis=1)
    figures = compare({k: v[ref_finite] for k, v in reference.items()},
                      {k: v[ref_finite] for k, v in candidate.items()})
    return {
        "n_inputs": int(len(inputs)),
        "finite": all(bool(np.isfinite(candidate[name]).all()) for name in OUTPUT_NAMES),
        "max_feature_norm": float(norms.max()),
        "max_abs_delta_cosine": figures["max_abs_delta_cosine"],
    }


def format_report(precision: str, figures: dict[str, Any], failures: list[str]) -> str:
    """Human-readable lines for the terminal."""
    phantoms = " - synthetic phantoms, not patients" if figures.get("phantoms") else ""
    lines = [f"parity ({precision} vs PyTorch fp32, {figures['n_crops']} crops from {figures.get('source', '?')}{phantoms}):"]
    lines.append(f"  max |delta cosine| {figures['max_abs_delta_cosine']:.3g}   "
                 f"max |delta probs| {figures['max_abs_delta_probs']:.3g}   "
                 f"stage agreement {figures['stage_agreement']:.2%}   finite {figures['finite']}")
    if "accuracy" in figures:
        lines.append(f"  accuracy {figures['accuracy']:.4f} (fp32 {figures['accuracy_reference']:.4f}, "
                     f"delta {figures['accuracy_delta'] * 100:+.2f} points)")
    if "large_norm" in figures:
        large = figures["large_norm"]
        lines.append(f"  large-norm inputs: finite {large['finite']}, feature norm up to {large['max_feature_norm']:.3g}")
    lines.append("  targets met" if not failures else "  TARGETS MISSED: " + "; ".join(failures))
    return "\n".join(lines)
