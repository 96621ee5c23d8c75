"""The body of the node's two background threads (worker and sender): one step at a time until
stopped, a step's unexpected error logged and retried after a pause, every sleep bounded."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("liverstage.serve")

MAX_SLEEP = 1.0  # s: the longest a thread sleeps, so a stop request is seen within a second


def run_steps(name: str, step: Callable[[], None], *, stop: threading.Event, close: Callable[[], None]) -> None:
    """Call `step` until `stop` is set; `close` (the thread's queue connection) at the end."""
    try:
        while not stop.is_set():
            try:
                step()
            except Exception:  # noqa: BLE001  (a database hiccup must not end the thread)
                log.exception("%s: unexpected error; going on in %g s", name, MAX_SLEEP)
                stop.wait(MAX_SLEEP)
    finally:
        close()


def sleep_until(wake: threading.Event, due: float | None) -> None:
    """Sleep until `due` (a time.time() value; None: nothing due), `wake` is set, or MAX_SLEEP."""
    wake.wait(MAX_SLEEP if due is None else min(max(due - time.time(), 0.0) + 0.001, MAX_SLEEP))
