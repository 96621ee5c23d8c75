"""Where received instances live: DIR/incoming/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.

UIDs come from the network, so they are checked against DICOM's own grammar (PS3.5 9.1:
digits and dots, no leading zero in a component, at most 64 characters) before they become
path parts; "../../x" or "1.2/../../x" never reach the file system. The final path is checked
to lie inside the store as well.

Durability, in this order, before the SCP may answer "success": the bytes go to a temporary
file beside the final one (its name starts with "." so readers skip it), fsync, rename, fsync of
the folder (so the rename itself survives a power cut). A failure at any step removes the
temporary file: nothing half-written stays under a final name.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX = 64
INCOMING = "incoming"


def valid_uid(value: object) -> bool:
    """True for a conformant DICOM UID (PS3.5 9.1), the only strings that become path parts."""
    return isinstance(value, str) and 0 < len(value) <= UID_MAX and UID_RE.match(value) is not None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """The incoming folder of a work folder; `write` stores one instance durably."""

    def __init__(self, work_dir: str | Path) -> None:
        self.root = (Path(work_dir) / INCOMING).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def series_dir(self, series_uid: str) -> Path:
        if not valid_uid(series_uid):
            raise ValueError(f"not a valid UID: {series_uid!r:.80}")
        folder = self.root / series_uid
        if folder.parent != self.root:
            raise ValueError(f"series folder outside the store: {series_uid!r:.80}")
        return folder

    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        if not valid_uid(sop_uid):
            raise ValueError(f"not a valid UID: {sop_uid!r:.80}")
        path = self.series_dir(series_uid) / f"{sop_uid}.dcm"
        if path.parent.parent != self.root:
            raise ValueError(f"instance path outside the store: {sop_uid!r:.80}")
        return path

    def write(self, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Store `data` as the instance's file, durably; returns its path (OSError on failure)."""
        path = self.path_for(series_uid, sop_uid)
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{sop_uid}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
            _fsync_dir(folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return path

    def relative(self, path: Path) -> str:
        """`path` relative to the work folder, as the queue records it."""
        return str(Path(path).relative_to(self.root.parent))

    def remove_leftovers(self) -> int:
        """Delete temporary files a killed process left behind; returns how many."""
        count = 0
        for tmp in self.root.glob("*/.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                count += 1
        return count
