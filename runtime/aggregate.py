"""From per-crop outputs to one stage per volume.

Rule: the volume's stage is the argmax of the MEAN probability over its crops, and its
probability is that mean. Why the mean: it is simple, uses every crop's confidence (a majority
vote throws that away and ties on few crops), and it is the rule the training metrics use for
patient-level accuracy, so the accuracy a user reads in training is the accuracy of this report.

Uncertainty: each crop's best cosine to any stage weight (max over stages) says how much the crop
looks like some stage at all; the angular embedding gives this for free. The volume is flagged
`uncertain` when the MEDIAN of those over its crops falls below the model's `cosine_threshold`
(set at export from training crops; None = never flagged). The median keeps one odd slice (a
vessel, the liver dome) from flagging a whole volume.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .stages import STAGES


@dataclasses.dataclass(frozen=True)
class VolumeStage:
    stage: str
    probability: float
    probabilities: dict[str, float]     # mean over crops, per stage
    median_max_cosine: float
    uncertain: bool


def aggregate(probs: np.ndarray, cosine: np.ndarray, *, cosine_threshold: float | None) -> VolumeStage:
    """Stage of one volume from its crops' probs [N, C] and cosines [N, C] (N >= 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    cosine = np.asarray(cosine, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] != len(STAGES) or cosine.shape != probs.shape:
        raise ValueError(f"need probs and cosine of shape [N>=1, {len(STAGES)}], got {probs.shape} and {cosine.shape}")
    mean = probs.mean(axis=0)
    best = int(np.argmax(mean))
    median_max_cos = float(np.median(cosine.max(axis=1)))
    uncertain = cosine_threshold is not None and median_max_cos < float(cosine_threshold)
    return VolumeStage(
        stage=STAGES[best],
        probability=float(mean[best]),
        probabilities={s: float(p) for s, p in zip(STAGES, mean)},
        median_max_cosine=median_max_cos,
        uncertain=bool(uncertain),
    )
