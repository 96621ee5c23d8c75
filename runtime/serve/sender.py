"""Sending results to the PACS: every *.dcm in DIR/results/<series>/, by C-STORE, with retries.

Its own thread, so a PACS that is down or slow never holds up staging. A failed send is tried
again after a backoff that doubles from BACKOFF_FIRST up to BACKOFF_MAX seconds, MAX_SEND_ATTEMPTS
times in all; the state (pending, sent, failed, attempts, last error, next try) lives in the
queue, so a restart carries on where the last process stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from pathlib import Path
from typing import Sequence

from ..errors import InputError
from .queue import JobQueue
from .loop import run_steps, sleep_until
from .worker import RESULTS

log = logging.getLogger("liverstage.serve")

BACKOFF_FIRST = 2.0
BACKOFF_MAX = 300.0
MAX_SEND_ATTEMPTS = 10
NETWORK_TIMEOUT = 30.0
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 printable chars, no backslash


def check_ae_title(value: str, option: str) -> str:
    """A valid AE title (1-16 printable characters, no backslash, not all spaces), else InputError."""
    if not _AE_RE.match(value) or not value.strip():
        raise InputError(f"{option}: not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return value.strip()


@dataclasses.dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """AE@HOST:PORT, e.g. PACS@10.0.0.5:104."""
        match = re.match(r"^([^@]+)@([^:@]+):(\d{1,5})$", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise InputError(f"--send-to must be AE@HOST:PORT (e.g. PACS@10.0.0.5:104), got {text!r}")
        return cls(check_ae_title(match.group(1), "--send-to"), match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class SendError(Exception):
    """A send that did not complete; the message is one line."""


def send_files(files: Sequence[Path], dest: Destination, *, calling_ae: str, timeout: float = NETWORK_TIMEOUT) -> int:
    """C-STORE every file to `dest` in one association; the number sent (SendError otherwise)."""
    import pydicom  # noqa: PLC0415
    from pynetdicom import AE, evt  # noqa: PLC0415

    from .scp import tcp_nodelay  # noqa: PLC0415

    metas = {}
    for path in files:
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
            metas[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except Exception as exc:  # noqa: BLE001
            raise SendError(f"cannot read {path.name} ({type(exc).__name__}: {exc})") from None
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted(set(metas.values())):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tcp_nodelay)])
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "could not be set up"
        raise SendError(f"association with {dest} {what}")
    sent = 0
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code != 0 and not 0xB000 <= code <= 0xBFFF:
                raise SendError(f"{dest} answered {path.name} with status "
                                f"{'none (timeout or abort)' if code < 0 else hex(code)}")
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


class Sender:
    """Sends done series' DICOM results; `run` is the thread's body."""

    def __init__(self, queue: JobQueue, dest: Destination, *, calling_ae: str, stop: threading.Event,
                 backoff_first: float = BACKOFF_FIRST, backoff_max: float = BACKOFF_MAX,
                 max_attempts: int = MAX_SEND_ATTEMPTS) -> None:
        self.queue = queue
        self.dest = dest
        self.calling_ae = calling_ae
        self.stop = stop
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.max_attempts = max_attempts
        self.wake = threading.Event()

    def run(self) -> None:
        run_steps("sender", self.step, stop=self.stop, close=self.queue.close)

    def step(self) -> None:
        """Send one due series, or sleep until the next one is due."""
        self.wake.clear()
        job = self.queue.claim_send()
        if job is None:
            sleep_until(self.wake, self.queue.next_send_due())
            return
        self.send(job)

    def send(self, job) -> None:
        uid = job.series_uid
        files = sorted((self.queue.work_dir / RESULTS / uid).glob("*.dcm"))
        try:
            sent = send_files(files, self.dest, calling_ae=self.calling_ae) if files else 0
        except Exception as exc:  # noqa: BLE001  (network, PACS or file trouble: retry with backoff)
            error = " ".join(str(exc).split()) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"
            if job.send_attempts >= self.max_attempts:
                log.error("series %s: sending to %s failed for good after %d attempts: %s",
                          uid, self.dest, job.send_attempts, error)
                self.queue.finish_send(job, error=error)
                return
            delay = min(self.backoff_first * 2 ** (job.send_attempts - 1), self.backoff_max)
            log.warning("series %s: sending to %s failed (attempt %d: %s); next try in %.1f s",
                        uid, self.dest, job.send_attempts, error, delay)
            self.queue.finish_send(job, error=error, retry_at=time.time() + delay)
            return
        log.info("series %s: sent %d file(s) to %s", uid, sent, self.dest)
        self.queue.finish_send(job, files=sent)
