"""Classification heads with their losses: softmax (Eq. 1), ASM (Eq. 2), AMCL (Eq. 3), DR-AMCL (Eq. 5).

Every head is an `nn.Module` with a `.weight` Parameter of shape [num_classes, embedding_dim];
calling it with `(embeddings [N, D], labels [N])` returns the mean loss over the batch, and
`logits(embeddings)` gives the inference scores (no margin), `cosine(embeddings)` the cosine of
each embedding to each class weight.

Numerics (see docs/architecture.md, "Numerics worth knowing"):
- The angular heads always run in float32 with autocast disabled: a 2048-d ReLU feature's sum of
  squares overflows float16, and F.normalize's eps rounds to 0 there.
- cos(theta + m) is computed as cos(t) cos(m) - sin(t) sin(m) with sin(t) = sqrt(1 - cos^2 t)
  clamped away from 0, so there is no acos (whose gradient is infinite at +-1) in the graph.
- Where theta + m > pi, cos(theta + m) would turn back up and reward a *larger* angle; the target
  logit falls back to cos(theta) - m sin(m) (insightface's `th = cos(pi - m)`,
  `mm = sin(pi - m) * m`; pytorch-metric-learning does the same), which keeps it monotone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from liverstage.runtime import checks

# Floor on DR-AMCL's numerator, relative to its own first term e^{s cos(theta_y + m)}.
DR_NUMERATOR_FLOOR = 1e-4
# sin(theta) is clamped at sqrt(_SIN2_MIN) so that d sin / d cos stays finite at cos = +-1.
_SIN2_MIN = 1e-12
_NORM_EPS = 1e-12


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _no_autocast(device_type: str):
    """Context that disables autocast on the tensor's device type (cpu / cuda / ...)."""
    return torch.autocast(device_type=device_type, enabled=False)


def normalised_cosine(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos(theta) [N, C] between each embedding and each class weight, in float32."""
    with _no_autocast(embeddings.device.type):
        x = F.normalize(_fp32(embeddings), dim=1, eps=_NORM_EPS)
        w = F.normalize(_fp32(weight), dim=1, eps=_NORM_EPS)
        return x @ w.t()


def dynamic_margin(weight: torch.Tensor) -> torch.Tensor:
    """m_DM of Eq. 4: sum over class pairs j < k of w_j . w_k, on the l2-normalised class weights.

    Computed as (|sum_c w_c|^2 - C) / 2, which equals the pair sum for unit vectors. Range
    [-C/2, C(C-1)/2], i.e. [-1.5, 3] for three classes.
    """
    with _no_autocast(weight.device.type):
        w = F.normalize(_fp32(weight), dim=1, eps=_NORM_EPS)
        gram = w @ w.t()
        return torch.triu(gram, diagonal=1).sum()


class AngularMarginLoss(nn.Module):
    """Additive angular margin softmax: AMCL (Eq. 3), ASM (margin=0, Eq. 2), DR-AMCL (dynamic=True, Eq. 5).

    AMCL is ArcFace: the target logit is s cos(theta_y + m), the others s cos(theta_c).

    DR-AMCL subtracts the dynamic margin m_DM (Eq. 4, from the normalised class weights) from the
    target term e^{s cos(theta_y + m)}. It is evaluated in log space:

        loss_i = softplus( logsumexp_{c != y} s cos(theta_c) - log(e^{a} - m_DM) ),  a = s cos(theta_y + m)
        log(e^{a} - m_DM) = logaddexp(a, log(-m_DM))                 where m_DM <= 0
                          = a + log(max(1 - m_DM e^{-a}, FLOOR))      where m_DM > 0

    Guard: the literal numerator e^{a} - m_DM is <= 0 whenever m_DM >= e^{a}; at initialisation
    (theta_y near 90 degrees, e^{a} ~ 6e-7, m_DM ~ N(0, 0.08)) that happens in about half of all
    random starts and a literal implementation returns NaN on step one. The numerator is floored
    at `DR_NUMERATOR_FLOOR` (1e-4) times its own first term e^{a}: where the subtraction would
    swallow the target term, the loss becomes AMCL with the target term shrunk 10^4-fold
    (an extra log(1e4)/s in the target logit). It stays finite, and its gradient still pulls
    theta_y down with bounded magnitude (|d loss / d a| <= 1). Wherever the literal numerator is
    above the floor, the value equals Eq. 5 exactly.

    m_DM carries NO gradient (it is detached): the paper calls it a *margin* that the training
    status adjusts, the way AdaCos (the paper's ref. [22]) sets its adaptive scale under no_grad.
    Its gradient in the literal formula is d loss / d m_DM = 1 / numerator-ish, about 1e6 at
    initialisation, which would swamp the class-weight update and push W to a fixed simplex
    regardless of the data. Detached, m_DM acts as intended: a margin that grows (harder target)
    while the class weights are similar and shrinks as they separate.

    Known weakness of Eq. 5 itself (seen on the phantoms): where m_DM < 0 the numerator is at
    least |m_DM| whatever the target angle, so while e^{a} << |m_DM| (at initialisation e^{a} is
    about 6e-7) the target logit gets almost no gradient, and the loss is minimised by pushing the
    embedding away from *every* class weight (all cosines negative, loss -> 0, accuracy at
    chance). Trained class weights spread apart, so m_DM < 0 is the usual case. `warmup = True`
    (the trainer's --warmup-epochs) trains plain ASM first; on the phantoms, 2 warm-up epochs let
    it train (ResNet18, 10 epochs, lr 1e-3: accuracy 0.58 +- 0.05 over 3 splits, against 0.44
    without warm-up), although the loss still falls to about 0.01 within a few epochs. This is
    Eq. 5 as printed; it is kept literal on purpose.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int = 3,
        scale: float = 30.0,
        margin: float = 0.5,
        dynamic: bool = False,
    ) -> None:
        super().__init__()
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.scale = checks.positive(scale, "scale")
        self.margin = checks.margin(margin, "margin")
        self.dynamic = bool(dynamic)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_dim))
        # Gaussian rows point in uniformly random directions: nearly orthogonal classes at start.
        nn.init.normal_(self.weight)
        self._cos_m = math.cos(self.margin)
        self._sin_m = math.sin(self.margin)
        self._th = math.cos(math.pi - self.margin)  # theta + m > pi  <=>  cos(theta) < th
        self._mm = math.sin(math.pi - self.margin) * self.margin  # = m sin(m)
        # Warm-up switch (not a parameter, not saved): while True the loss is plain ASM (Eq. 2),
        # no margin and no dynamic margin. The trainer sets it for --warmup-epochs.
        self.warmup = False

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
                f"scale={self.scale}, margin={self.margin}, dynamic={self.dynamic}")

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(theta) [N, C] to each class weight, float32, no margin."""
        return normalised_cosine(embeddings, self.weight)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Inference logits s cos(theta) [N, C] (no margin): softmax of these is the probability."""
        return self.scale * self.cosine(embeddings)

    def target_cosine_with_margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        """cos(theta + m) where theta + m <= pi, else the monotone fall-back cos(theta) - m sin(m)."""
        if self.margin == 0.0:
            return cos_t
        sin_t = torch.sqrt(torch.clamp(1.0 - cos_t * cos_t, min=_SIN2_MIN))
        phi = cos_t * self._cos_m - sin_t * self._sin_m
        return torch.where(cos_t >= self._th, phi, cos_t - self._mm)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be [N, {self.embedding_dim}], got {list(embeddings.shape)}")
        labels = labels.long()
        with _no_autocast(embeddings.device.type):
            cos = self.cosine(embeddings)  # [N, C] float32
            target = F.one_hot(labels, self.num_classes).bool()
            cos_t = cos.gather(1, labels[:, None]).squeeze(1)
            if self.warmup:
                return F.cross_entropy(self.scale * cos, labels)
            a = self.scale * self.target_cosine_with_margin(cos_t)  # target logit [N]
            if not self.dynamic:
                logits = torch.where(target, a[:, None], self.scale * cos)
                return F.cross_entropy(logits, labels)
            # DR-AMCL in log space (see class docstring).
            m_dm = dynamic_margin(self.weight).detach()
            others = (self.scale * cos).masked_fill(target, float("-inf"))
            log_others = torch.logsumexp(others, dim=1)
            # Branch-free (no host sync): m_DM is a detached scalar, so the unused branch of the
            # `where` never feeds a NaN gradient back.
            tiny = torch.finfo(torch.float32).tiny
            log_num_neg = torch.logaddexp(a, torch.log(torch.clamp(-m_dm, min=tiny)))
            ratio = -torch.expm1(torch.log(torch.clamp(m_dm, min=tiny)) - a)  # 1 - m_DM e^{-a}
            log_num_pos = a + torch.log(torch.clamp(ratio, min=DR_NUMERATOR_FLOOR))
            log_num = torch.where(m_dm > 0, log_num_pos, log_num_neg)
            return F.softplus(log_others - log_num).mean()


class SoftmaxHead(nn.Module):
    """The softmax baseline of Eq. 1: a linear layer with bias, then cross entropy.

    Same call signature as AngularMarginLoss; `.weight` [C, D] and `.bias` [C] are initialised as
    in nn.Linear. Runs in float32 like the angular heads (the cost is negligible).
    """

    def __init__(self, embedding_dim: int, num_classes: int = 3) -> None:
        super().__init__()
        if int(embedding_dim) < 1 or int(num_classes) < 2:
            raise ValueError(f"need embedding_dim >= 1 and num_classes >= 2, got {embedding_dim!r}, {num_classes!r}")
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        reference = nn.Linear(self.embedding_dim, self.num_classes)
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())
        # Kept for a uniform interface with the angular heads (predictions/export read them).
        self.scale = 1.0
        self.margin = 0.0
        self.dynamic = False

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}"

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(theta) [N, C] between the embedding and each class's weight row (diagnostic only)."""
        return normalised_cosine(embeddings, self.weight)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """W x + b [N, C], float32."""
        with _no_autocast(embeddings.device.type):
            return F.linear(_fp32(embeddings), _fp32(self.weight), _fp32(self.bias))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with _no_autocast(embeddings.device.type):
            return F.cross_entropy(self.logits(embeddings), labels.long())
