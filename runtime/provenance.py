"""Where a file or a model came from: content hashes and package versions.

One implementation for checkpoints, exports, engine keys, reports and experiments, so the same
file always gets the same recorded hash.
"""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks (models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Python's version and each installed package's version (absent packages are left out)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
