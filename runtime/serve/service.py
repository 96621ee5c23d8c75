"""The node as a whole: lock the work folder, recover the queue, open the model, start the threads.

Start order: the model is opened before the port is, so a bad model ends the command (exit 2)
before any scanner can send to it. Stop order (SIGTERM, SIGINT, `stop()`): stop accepting
associations, let the running job finish for up to `stop_timeout` seconds, else put it back
in the queue, then stop the sender (a send in flight is pending again on the next start).

One process per work folder: an exclusive lock on DIR/serve.lock (released by the kernel when
the process dies, kill -9 included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from ..errors import InputError
from .queue import JobQueue
from .sender import Destination, Sender, check_ae_title
from .store import InstanceStore

log = logging.getLogger("liverstage.serve")

LOCK_NAME = "serve.lock"
WORKER_THREAD = "liverstage-worker"
SENDER_JOIN_S = 5.0  # a send in flight is pending again on the next start


@contextlib.contextmanager
def logging_to_stderr(level: int = logging.INFO):
    """Timestamped lines on stderr while the service runs; pynetdicom's own chatter from warnings up.

    The previous logging set-up comes back afterwards (the command may run inside another program).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                           datefmt="%Y-%m-%dT%H:%M:%S"))
    root, netdicom = logging.getLogger(), logging.getLogger("pynetdicom")
    saved = (root.level, netdicom.level)
    root.addHandler(handler)
    root.setLevel(level)
    netdicom.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        netdicom.setLevel(saved[1])


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Every option of `liverstage serve`; checked when made."""

    model: Path
    work: Path
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "LIVERSTAGE"
    allow_ae: tuple[str, ...] = ()
    quiet_seconds: float = 10.0
    send_to: Destination | None = None
    mask_dir: Path | None = None
    mask_label: int | None = None
    bbox: tuple[int, ...] | None = None
    roi: str | None = None
    batch_size: int = 32
    backend: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None
    hint: str = "latency"
    stop_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= int(self.port) < 65536:
            raise InputError(f"--port must be 0-65535, got {self.port}")
        check_ae_title(self.ae_title, "--ae-title")
        for title in self.allow_ae:
            check_ae_title(title, "--allow-ae")
        if not self.quiet_seconds >= 0:
            raise InputError(f"--quiet-seconds must be >= 0, got {self.quiet_seconds}")
        if not self.stop_timeout >= 0:
            raise InputError(f"--stop-timeout must be >= 0, got {self.stop_timeout}")
        if Path(self.work).exists() and not Path(self.work).is_dir():
            raise InputError(f"--work is not a folder: {self.work}")


def _lock(work: Path):
    import fcntl  # noqa: PLC0415  (POSIX)

    work.mkdir(parents=True, exist_ok=True)
    fh = open(work / LOCK_NAME, "a+")  # noqa: SIM115  (held open for the life of the service)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise InputError(f"{work}: another liverstage serve is using this work folder") from None
    return fh


class Service:
    """`start()` then `stop()`, or `serve_forever()` (blocks until SIGTERM / SIGINT)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.queue: JobQueue | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_file = None
        self.scp = None
        self.worker = None
        self.sender = None

    def start(self) -> int:
        from ..predict import Predictor  # noqa: PLC0415
        from .scp import StorageSCP  # noqa: PLC0415
        from .staging import open_model  # noqa: PLC0415
        from .worker import Worker  # noqa: PLC0415

        cfg = self.config
        work = Path(cfg.work)
        self._lock_file = _lock(work)
        try:
            self.queue = JobQueue(work)
            store = InstanceStore(work)
            if n := store.remove_leftovers():
                log.info("removed %d temporary file(s) left by an earlier process", n)
            for line in self.queue.recover():
                log.warning("%s", line)
            backend, model_info = open_model(cfg.model, backend=cfg.backend, precision=cfg.precision,
                                             device=cfg.device, threads=cfg.threads, hint=cfg.hint)
            predictor = Predictor(backend, mask_dir=cfg.mask_dir, mask_label=cfg.mask_label, bbox=cfg.bbox,
                                  roi=cfg.roi, batch_size=cfg.batch_size, keep_preview=True,
                                  model_info=model_info)
            log.info("model %s (%s), quiet period %g s", model_info["path"], model_info["reason"],
                     cfg.quiet_seconds)
            self.worker = Worker(self.queue, predictor, quiet_seconds=cfg.quiet_seconds, wake=self._wake,
                                 stop=self._stop, send=cfg.send_to is not None)
            self._spawn(self.worker.run, WORKER_THREAD)
            if cfg.send_to is not None:
                self.sender = Sender(self.queue, cfg.send_to, calling_ae=cfg.ae_title, stop=self._stop)
                self._spawn(self.sender.run, "liverstage-sender")
                log.info("results go to %s", cfg.send_to)
            self.scp = StorageSCP(store=store, queue=self.queue, ae_title=cfg.ae_title, allow_ae=cfg.allow_ae,
                                  on_stored=self._wake.set)
            self.port = self.scp.start(cfg.host, cfg.port)
        except BaseException:
            self.stop()
            raise
        return self.port

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> bool:
        """Stop everything; False if the running job had to be put back in the queue."""
        finished = True
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        self._stop.set()
        self._wake.set()
        if self.sender is not None:
            self.sender.wake.set()
        for thread in self._threads:
            thread.join(self.config.stop_timeout if thread.name == WORKER_THREAD else SENDER_JOIN_S)
        worker_alive = any(t.is_alive() for t in self._threads if t.name == WORKER_THREAD)
        job = self.worker.current if self.worker is not None else None
        if job is not None and worker_alive:
            finished = False
            if self.queue.requeue(job, "shutdown before the attempt finished"):
                log.warning("series %s: still staging at shutdown; queued again", job.series_uid)
        if self.queue is not None:
            self.queue.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        self._threads = []
        return finished

    def serve_forever(self) -> bool:
        """Run until SIGTERM or SIGINT; returns what `stop()` returned."""
        stop_requested = threading.Event()

        def on_signal(signum, _frame):
            log.info("%s received: stopping", signal.Signals(signum).name)
            stop_requested.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop_requested.wait(1.0):
                pass
        finally:
            finished = self.stop()
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
        log.info("stopped")
        return finished


def exit_now(code: int = 0) -> None:
    """End the process at once, for when a worker thread is still inside the model at shutdown."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
