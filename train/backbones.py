"""Backbone registry: a torchvision classification model by name -> one-channel trunk [N,1,H,W] -> [N,D].

The trunk is the torchvision model itself with two changes, so its forward (and its adaptive
pooling, which makes small crops of 32-64 px work) stays torchvision's own:
- the first 3-channel convolution becomes a 1-channel convolution (MRI crops are grey);
- the final classification Linear is removed, so the output is the pooled feature before the
  classifier: 512 for resnet18, 2048 for resnet50, 4096 for vgg16 (fc7 after its ReLU; VGG's
  classifier is kept up to fc7 + ReLU, and the dropout after it is dropped).

`pretrained=PATH` loads a torchvision ImageNet state_dict from a local file (never downloads)
into the unmodified 3-channel model first, then adapts the first convolution by summing its RGB
kernels: a grey image x replicated on three channels gives exactly the same response.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from liverstage.runtime.errors import InputError, ModelError

# Tested in CI; any other torchvision classification model name is tried through get_model.
KNOWN_BACKBONES = ("vgg16", "resnet18", "resnet50")


def available_backbones() -> list[str]:
    """Names torchvision can build as classification models."""
    import torchvision  # noqa: PLC0415

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _first_rgb_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return name, module
    raise InputError(f"backbone {type(model).__name__} has no 3-channel input convolution to adapt")


def _grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel copy of `conv` whose kernel is the sum of the RGB kernels."""
    grey = nn.Conv2d(
        1, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=1, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
    return grey


def _strip_classifier(model: nn.Module) -> int:
    """Remove the final classification Linear in place; return the embedding dimension."""
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            layers = list(head.children())
            last_linear = max((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
            if last_linear is None:
                break
            dim = layers[last_linear].in_features
            kept = layers[:last_linear]
            while kept and isinstance(kept[-1], nn.Dropout):
                kept.pop()
            setattr(model, attr, nn.Sequential(*kept) if kept else nn.Identity())
            return dim
    raise InputError(f"cannot find the classification layer of backbone {type(model).__name__}")


def _load_pretrained(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pretrained weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable file is the same user error)
        raise ModelError(f"cannot read pretrained weights {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} is not a state_dict (got {type(state).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path} does not match torchvision {name}: {first}") from None


class Trunk(nn.Module):
    """Wraps the adapted torchvision model; forward returns the pooled embedding [N, D]."""

    def __init__(self, model: nn.Module, name: str, embedding_dim: int) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.embedding_dim = int(embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        if not isinstance(out, torch.Tensor):  # e.g. GoogLeNet/Inception aux outputs in training
            out = out[0]
        return out.flatten(1)


def build_backbone(name: str, *, pretrained: str | os.PathLike | None = None) -> Trunk:
    """One-channel trunk for torchvision model `name`; `.embedding_dim` is its output width."""
    import torchvision  # noqa: PLC0415

    key = str(name).strip().lower()
    try:
        kwargs = {"aux_logits": False, "init_weights": True} if key in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(key, weights=None, **kwargs)
    except (ValueError, KeyError):
        raise InputError(
            f"unknown backbone {name!r} (tested: {', '.join(KNOWN_BACKBONES)}; any torchvision "
            "classification model name is tried)"
        ) from None
    if pretrained is not None:
        _load_pretrained(model, pretrained, key)
    conv_name, conv = _first_rgb_conv(model)
    _set_submodule(model, conv_name, _grey_conv(conv))
    dim = _strip_classifier(model)
    return Trunk(model, key, dim)
