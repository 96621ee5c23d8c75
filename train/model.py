"""StagingNet: backbone trunk + classification head (softmax, ASM, AMCL or DR-AMCL).

`forward(images [N,1,H,W]) -> embedding [N, D]` (the raw pooled feature). The head is kept
separate from forward so that the exported graph (cosine head, no margin) and the training loss
(margin head) share one set of weights: `head.weight` [C, D].
"""

from __future__ import annotations

import os

import torch
from torch import nn

from liverstage.runtime.errors import InputError
from liverstage.runtime.stages import STAGES

from .backbones import build_backbone
from .config import LOSSES
from .losses import AngularMarginLoss, SoftmaxHead



class StagingNet(nn.Module):
    """Trunk + head. Attributes `backbone_name`, `loss_name`, `embedding_dim`, `num_classes`."""

    def __init__(self, trunk: nn.Module, head: nn.Module, *, backbone: str, loss: str) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.backbone_name = backbone
        self.loss_name = loss
        self.embedding_dim = int(head.weight.shape[1])
        self.num_classes = int(head.weight.shape[0])

    @property
    def scale(self) -> float:
        return float(self.head.scale)

    @property
    def margin(self) -> float:
        return float(self.head.margin)

    @property
    def is_angular(self) -> bool:
        return isinstance(self.head, AngularMarginLoss)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def class_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """[N, C] float32 scores without margin: s cos(theta) (angular) or W x + b (softmax)."""
        return self.head.logits(embedding)

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """[N, C] float32 cosine between the embedding and each class weight (any head)."""
        return self.head.cosine(embedding)

    def loss(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of this head (with margin), mean over the batch."""
        return self.head(embedding, labels)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference on a batch: embedding, cosine, logits and probabilities (softmax of logits)."""
        embedding = self.forward(images)
        logits = self.class_logits(embedding)
        return {
            "embedding": embedding.float(),
            "cosine": self.cosine(embedding),
            "logits": logits,
            "probs": torch.softmax(logits, dim=1),
        }


def build_head(loss: str, embedding_dim: int, *, num_classes: int = 3, scale: float = 30.0,
               margin: float = 0.5) -> nn.Module:
    """The head for a loss name; 'asm' is the angular head with margin 0."""
    if loss == "softmax":
        return SoftmaxHead(embedding_dim, num_classes)
    if loss == "asm":
        return AngularMarginLoss(embedding_dim, num_classes, scale=scale, margin=0.0)
    if loss == "amcl":
        return AngularMarginLoss(embedding_dim, num_classes, scale=scale, margin=margin)
    if loss == "dr-amcl":
        return AngularMarginLoss(embedding_dim, num_classes, scale=scale, margin=margin, dynamic=True)
    raise InputError(f"unknown loss {loss!r} (expected one of {', '.join(LOSSES)})")


def build_model(backbone: str, loss: str, *, num_classes: int = len(STAGES), scale: float = 30.0,
                margin: float = 0.5, pretrained: str | os.PathLike | None = None) -> StagingNet:
    """A StagingNet for torchvision backbone `backbone` and loss in LOSSES."""
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r} (expected one of {', '.join(LOSSES)})")
    trunk = build_backbone(backbone, pretrained=pretrained)
    head = build_head(loss, trunk.embedding_dim, num_classes=num_classes, scale=scale, margin=margin)
    return StagingNet(trunk, head, backbone=trunk.name, loss=loss)
