"""The staging worker: one thread that turns quiet series into jobs and stages them, one at a time.

One at a time because the model already uses every core it is given; a second concurrent
staging would only slow both. The thread sleeps until the next series is due to become
complete (its last instance plus the quiet period) or until the SCP wakes it, so a complete
series starts within milliseconds of its quiet period ending.

Results go to DIR/results/<SeriesInstanceUID>/ through `atomic_dir`: the folder appears whole,
replacing an older run's, before the queue records "done". A kill between the two stages the
series again on restart and replaces the folder; the queue still records one "done".
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import LiverstageError
from ..predict import one_line
from .queue import MAX_ATTEMPTS, Job, JobQueue
from .loop import run_steps, sleep_until
from .staging import read_headers, series_verdict, stage_series, write_results

log = logging.getLogger("liverstage.serve")

RESULTS = "results"


class Worker:
    """Stages queued series with `predictor` (model loaded once); `run` is the thread's body."""

    def __init__(self, queue: JobQueue, predictor, *, quiet_seconds: float, wake: threading.Event,
                 stop: threading.Event, send: bool = False) -> None:
        self.queue = queue
        self.predictor = predictor
        self.quiet_seconds = quiet_seconds
        self.wake = wake
        self.stop = stop
        self.send = send
        self.results_root = queue.work_dir / RESULTS
        self.current: Job | None = None

    def run(self) -> None:
        run_steps("worker", self.step, stop=self.stop, close=self.queue.close)

    def step(self) -> None:
        """Queue the series that became complete, then stage one job or sleep until one is due."""
        self.wake.clear()
        for uid in self.queue.promote_quiet(self.quiet_seconds):
            log.info("series %s complete (no instance for %g s): queued", uid, self.quiet_seconds)
        job = self.queue.claim()
        if job is None:
            sleep_until(self.wake, self.queue.next_quiet_due(self.quiet_seconds))
            return
        self.current = job
        try:
            self.process(job)
        finally:
            self.current = None

    def process(self, job: Job) -> str:
        """Stage one claimed series; returns the state the queue recorded."""
        uid = job.series_uid
        t0 = time.perf_counter()
        log.info("series %s: staging (attempt %d)", uid, job.attempts)
        try:
            files = self.queue.instance_paths(uid)
            ok, why = series_verdict(read_headers(files))
            if not ok:
                return self._finish(job, "skipped", reason=why)
            report, result = stage_series(self.predictor, files[0].parent)
            with atomic_dir(self.results_root / uid) as tmp:
                write_results(tmp, report=report, result=result)
        except LiverstageError as exc:
            return self._finish(job, "failed", reason=one_line(exc))
        except Exception as exc:  # noqa: BLE001  (anything else may be transient: retry, then give up)
            reason = one_line(exc)
            log.exception("series %s: attempt %d raised", uid, job.attempts)
            if job.attempts < MAX_ATTEMPTS:
                self.queue.requeue(job, f"attempt {job.attempts} raised {reason}; retrying")
                return "queued"
            return self._finish(job, "failed", reason=f"{reason} (after {job.attempts} attempts)")
        result = report["results"][0]
        state = self._finish(job, "done", stage=result["stage"], uncertain=bool(result["uncertain"]), send=self.send)
        if state == "done":
            log.info("series %s: done, stage %s%s in %.2f s", uid, result["stage"],
                     " (UNCERTAIN)" if result["uncertain"] else "", time.perf_counter() - t0)
        return state

    def _finish(self, job: Job, state: str, **kwargs) -> str:
        after = self.queue.finish(job, state, **kwargs)
        if after == "received":
            log.info("series %s: instances arrived during staging; staged again once complete", job.series_uid)
        elif after in ("skipped", "failed"):
            log.warning("series %s: %s: %s", job.series_uid, after, kwargs.get("reason", ""))
        elif not after:
            log.warning("series %s: attempt %d no longer owns the series; its result is dropped",
                        job.series_uid, job.attempts)
        return after
