"""From per-crop outputs to one stage per volume.

Rule: the volume's stage is the argmax of the MEAN probability over its crops, and its
probability is that mean. Why the mean: it is simple, uses every crop's confidence (a majority
vote throws that away and ties on few crops), and it is the rule the training metrics use for
patient-level accuracy, so the accuracy a user reads in training is the accuracy of this report.

Uncertainty is not decided here: the out-of-distribution gate (runtime/ood.py) judges whether
the crops look like the model's training crops, and its verdict is carried along unchanged.
The stage and probabilities never depend on it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .ood import OodVerdict
from .stages import STAGES


@dataclasses.dataclass(frozen=True)
class VolumeStage:
    stage: str
    probability: float
    probabilities: dict[str, float]     # mean over crops, per stage
    ood: OodVerdict

    @property
    def uncertain(self) -> bool:
        return self.ood.uncertain


def aggregate(probs: np.ndarray, *, ood: OodVerdict) -> VolumeStage:
    """Stage of one volume from its crops' probs [N, C] (N >= 1) and the gate's verdict."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] != len(STAGES):
        raise ValueError(f"need probs of shape [N>=1, {len(STAGES)}], got {probs.shape}")
    mean = probs.mean(axis=0)
    best = int(np.argmax(mean))
    return VolumeStage(
        stage=STAGES[best],
        probability=float(mean[best]),
        probabilities={s: float(p) for s, p in zip(STAGES, mean)},
        ood=ood,
    )
