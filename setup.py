"""Only the optional compiled kernels of the out-of-distribution gate; everything else is in
pyproject.toml. `optional=True`: where no C compiler (or no Python headers) is found, the install
goes on without them and runtime/ood.py runs its numpy code, which gives the same scores, slower
(`liverstage.runtime.ood.gate_kernels()` says which one runs)."""

import sys

from setuptools import Extension, setup

# No contraction of a * b + c into one rounding, so the block means and the histogram's bins keep
# numpy's bits (MSVC contracts only when asked to with /fp:contract).
FLAGS = ["/O2", "/fp:precise"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(ext_modules=[Extension(
    "liverstage.runtime._gate_kernels",
    sources=["runtime/_gate_kernels.c"],
    extra_compile_args=FLAGS,
    optional=True,
)])
