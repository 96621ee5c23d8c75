"""Shared fixtures. Keep everything small: CI runs on 2 CPU cores."""

import os

import pytest

# Two cores: keep torch / BLAS from oversubscribing when tests run model code.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests with a stated reason where no CUDA GPU is present."""
    try:
        import torch  # noqa: PLC0415

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
