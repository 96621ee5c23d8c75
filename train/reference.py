"""`TorchEager`: PyTorch eager fp32 of a liverstage checkpoint, the reference `liverstage bench`
measures every exported backend against (its speed-ups are ratios to this, in the same run).

It lives with the training code because it needs torch; the runtime's bench takes it as a
factory from its caller (the bench command passes it where torch is installed), so the runtime
itself never imports torch or this package. torch is imported when a reference is built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchEager:
    """A bench runner: `.run(images) -> {"probs", "cosine", "embedding"}` as numpy arrays.

    On a GPU it runs in strict float32 (TF32 off, as PyTorch does for matmuls by default) with
    cudnn.benchmark on, numpy in and out like every other backend, so the copies are timed too.
    """

    precision = "fp32"

    def __init__(self, checkpoint: Path, threads: int | None, device: str = "cpu") -> None:
        import torch  # noqa: PLC0415

        from .checkpoint import load_checkpoint  # noqa: PLC0415
        from .evaluate import resolve_device, strict_float32  # noqa: PLC0415

        self.torch = torch
        self.strict_float32 = strict_float32
        self.device = resolve_device(device)
        self.name = "torch-eager" if self.device.type == "cpu" else "torch-eager-cuda"
        if threads is not None:
            torch.set_num_threads(threads)
        self.model, _ = load_checkpoint(checkpoint, map_location="cpu")
        self.model.eval().to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode(), self.strict_float32():
            x = torch.from_numpy(images).to(self.device)
            emb = self.model(x)
            probs = torch.softmax(self.model.class_logits(emb), dim=1)
            cos = self.model.cosine(emb)
        return {"probs": probs.cpu().numpy(), "cosine": cos.cpu().numpy(), "embedding": emb.cpu().numpy()}
