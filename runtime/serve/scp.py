"""The Storage SCP: C-STORE of MR images (classic, enhanced, legacy converted) and C-ECHO.

Transfer syntaxes: the uncompressed ones plus every compressed one for which pydicom has a
working decoder here (installing pylibjpeg or pyjpegls adds theirs), so whatever is accepted
can also be staged; pynetdicom's defaults would refuse every compressed syntax.

Associations: the called AE title must be ours; with `allow_ae` only those calling AE titles
are accepted (pynetdicom rejects the others during association negotiation).

Each C-STORE, in this order: the dataset must decode completely (pixel data of the expected
length, fragments intact), its UIDs must be valid and match the request, then it is written
durably (store.py), then recorded in the queue, and only then is success returned. Any failure
returns a failure status for that instance only; the association and the service go on.
Statuses: 0xC210 cannot decode, 0xC211 invalid or mismatching UIDs, 0xA900 not the SOP class
it claims, 0xA700 could not store (disk, database).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Sequence

from .queue import JobQueue
from .store import InstanceStore, valid_uid

log = logging.getLogger("liverstage.serve")

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_DECODE = 0xC210
STATUS_BAD_UID = 0xC211
STATUS_WRONG_CLASS = 0xA900
STATUS_NO_RESOURCES = 0xA700


def storage_classes() -> tuple[str, ...]:
    from pydicom.uid import EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage, MRImageStorage  # noqa: PLC0415

    return (MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage)


def accepted_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes, then every compressed one pydicom can decode in this environment."""
    from pydicom.pixels import get_decoder  # noqa: PLC0415
    from pydicom.uid import AllTransferSyntaxes, UncompressedTransferSyntaxes  # noqa: PLC0415

    out = list(UncompressedTransferSyntaxes)
    for uid in AllTransferSyntaxes:
        if uid in out:
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:  # no decoder exists for it at all (video, ...)
            continue
    return out


def tcp_nodelay(event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle's algorithm off on the association's socket.

    pynetdicom leaves it on; a C-STORE then ends in a small PDU that waits for the peer's delayed
    ACK, about 40 ms per instance on Linux loopback (measured here: 55 ms -> 9 ms per instance).
    """
    import socket  # noqa: PLC0415

    with contextlib.suppress(AttributeError, OSError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def check_complete(ds) -> None:
    """Raise ValueError unless `ds` parsed to its end with all its pixel data."""
    from pydicom.encaps import generate_frames  # noqa: PLC0415
    from pydicom.pixels.utils import get_expected_length  # noqa: PLC0415

    for _ in ds.iterall():  # converts every raw element: a cut-off element raises here
        pass
    if "PixelData" not in ds:
        raise ValueError("no PixelData")
    syntax = ds.file_meta.TransferSyntaxUID
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if syntax.is_encapsulated:
        got = sum(1 for _ in generate_frames(ds.PixelData, number_of_frames=frames))
        if got != frames:
            raise ValueError(f"{got} of {frames} frame(s) in the encapsulated pixel data")
    else:
        expected = get_expected_length(ds, "bytes")
        if len(ds.PixelData) < expected:
            raise ValueError(f"pixel data is {len(ds.PixelData)} bytes, expected {expected}")


class StorageSCP:
    """Accepts instances into `store` and `queue`; `on_stored` is called after each new one."""

    def __init__(self, *, store: InstanceStore, queue: JobQueue, ae_title: str,
                 allow_ae: Sequence[str] | None = None, on_stored: Callable[[], None] | None = None) -> None:
        self.store = store
        self.queue = queue
        self.ae_title = ae_title
        self.allow_ae = list(allow_ae or [])
        self.on_stored = on_stored
        self.server = None

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port."""
        from pynetdicom import AE, evt  # noqa: PLC0415
        from pynetdicom.sop_class import Verification  # noqa: PLC0415

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        if self.allow_ae:
            ae.require_calling_aet = self.allow_ae
        syntaxes = accepted_transfer_syntaxes()
        for sop_class in storage_classes():
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_CONN_OPEN, tcp_nodelay),
            (evt.EVT_ACCEPTED, self._log_association, ["accepted"]),
            (evt.EVT_REJECTED, self._log_association, ["rejected"]),
            (evt.EVT_ABORTED, self._log_association, ["aborted"]),
        ]
        self.server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        bound = int(self.server.server_address[1])
        log.info("listening on %s:%d as %s (calling AE titles: %s); %d transfer syntaxes",
                 host, bound, self.ae_title, ", ".join(self.allow_ae) or "any", len(syntaxes))
        return bound

    def stop(self) -> None:
        """Stop accepting and end open associations (an instance not yet answered is not stored)."""
        if self.server is not None:
            for assoc in list(self.server.active_associations):
                assoc.abort()
            self.server.shutdown()
            self.server = None

    @staticmethod
    def _log_association(event, what: str) -> None:
        req = event.assoc.requestor
        log.info("association %s: calling AE %r from %s:%s", what, req.ae_title, req.address, req.port)

    def handle_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            check_complete(ds)
        except Exception as exc:  # noqa: BLE001  (any decode problem: refuse this instance only)
            log.warning("refused an instance from %s: cannot decode it (%s: %s)", calling, type(exc).__name__, exc)
            return STATUS_CANNOT_DECODE
        request = event.request
        uids = {key: ds.get(key) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        bad = [f"{k}={str(v)[:80]!r}" for k, v in uids.items() if not valid_uid(None if v is None else str(v))]
        if bad or str(uids["SOPInstanceUID"]) != str(request.AffectedSOPInstanceUID):
            detail = ", ".join(bad) or "SOPInstanceUID differs from the request's"
            log.warning("refused an instance from %s: invalid UID (%s)", calling, detail)
            return STATUS_BAD_UID
        if str(ds.get("SOPClassUID", "")) != str(request.AffectedSOPClassUID):
            log.warning("refused an instance from %s: SOPClassUID differs from the request's", calling)
            return STATUS_WRONG_CLASS
        series_uid, sop_uid = str(uids["SeriesInstanceUID"]), str(uids["SOPInstanceUID"])
        try:
            if self.queue.has_instance(sop_uid):
                log.info("instance %s already stored; ignored", sop_uid)
                return STATUS_SUCCESS
            path = self.store.write(series_uid, sop_uid, event.encoded_dataset())
        except Exception as exc:  # noqa: BLE001  (disk full, permissions, database busy)
            log.error("could not store instance %s: %s: %s", sop_uid, type(exc).__name__, exc)
            return STATUS_NO_RESOURCES
        try:
            what = self.queue.record_instance(
                sop_uid=sop_uid, series_uid=series_uid, study_uid=str(uids["StudyInstanceUID"]),
                path=self.store.relative(path), series_number=str(ds.get("SeriesNumber", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""), modality=str(ds.get("Modality", "") or ""),
                calling_ae=calling, now=time.time())
        except Exception as exc:  # noqa: BLE001
            path.unlink(missing_ok=True)
            log.error("could not record instance %s: %s: %s", sop_uid, type(exc).__name__, exc)
            return STATUS_NO_RESOURCES
        if what not in ("added", "duplicate"):
            log.info("series %s: %s (from %s)", series_uid, what, calling)
        if self.on_stored is not None:
            self.on_stored()
        return STATUS_SUCCESS
