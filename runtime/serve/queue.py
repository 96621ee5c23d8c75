"""The durable job queue of `liverstage serve`: one SQLite database, DIR/queue.sqlite.

Why SQLite: the queue must survive kill -9 and power loss, be shared by the storage threads, the
worker and the sender, and be readable by `liverstage jobs` while the server runs. WAL mode lets
readers run beside the one writer; `synchronous=FULL` makes every commit durable before the
storage SCP answers "success"; every thread has its own connection (sqlite3 connections must not
be shared across threads) with a busy timeout, and every write is one `BEGIN IMMEDIATE`
transaction, so two writers never deadlock on a lock upgrade.

A series moves  received -> queued -> running -> done | skipped | failed.
- received: instances are arriving; it becomes queued once none arrived for the quiet period.
- running: `attempts` counts the starts. On start-up a series left running (the process died)
  is queued again; after MAX_ATTEMPTS starts that never finished it is failed instead, so a
  series that kills the process cannot do so forever.
- An instance arriving while its series is queued restarts the quiet period; while it runs,
  the run's result is dropped and the series is received again; after it finished (done,
  skipped, failed) the series is reopened and staged again with all its instances (Orthanc:
  a new instance makes a stable series unstable, and it becomes stable again after StableAge).
  An instance already stored (same SOPInstanceUID) is not stored again and changes nothing
  (Orthanc's default, OverwriteInstances = false).
Every transition is also appended to `events`, so each run of each series ends in exactly one
terminal event, which is what the tests count.

Sending (after done, when a destination is configured): send_state pending -> sending ->
sent | failed, with send_attempts, send_error and send_next_at (the backoff) in the same row;
a send left `sending` by a dead process is pending again on start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator

from ..errors import InputError

DB_NAME = "queue.sqlite"
SCHEMA_VERSION = 1
STATES = ("received", "queued", "running", "done", "skipped", "failed")
FINAL_STATES = ("done", "skipped", "failed")
SEND_STATES = ("", "pending", "sending", "sent", "failed")
MAX_ATTEMPTS = 3
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS series (
    series_uid     TEXT PRIMARY KEY,
    study_uid      TEXT NOT NULL,
    series_number  TEXT NOT NULL DEFAULT '',
    description    TEXT NOT NULL DEFAULT '',
    modality       TEXT NOT NULL DEFAULT '',
    calling_ae     TEXT NOT NULL DEFAULT '',
    instances      INTEGER NOT NULL DEFAULT 0,
    state          TEXT NOT NULL CHECK (state IN {STATES}),
    reason         TEXT NOT NULL DEFAULT '',
    attempts       INTEGER NOT NULL DEFAULT 0,
    runs           INTEGER NOT NULL DEFAULT 0,
    restage        INTEGER NOT NULL DEFAULT 0,
    stage          TEXT,
    uncertain      INTEGER,
    first_received REAL NOT NULL,
    last_received  REAL NOT NULL,
    queued_at      REAL,
    started_at     REAL,
    finished_at    REAL,
    send_state     TEXT NOT NULL DEFAULT '' CHECK (send_state IN {SEND_STATES}),
    send_attempts  INTEGER NOT NULL DEFAULT 0,
    send_error     TEXT NOT NULL DEFAULT '',
    send_next_at   REAL,
    sent_at        REAL,
    sent_files     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_state ON series (state);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid     TEXT PRIMARY KEY,
    series_uid  TEXT NOT NULL REFERENCES series (series_uid),
    path        TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS events (
    id         INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    at         REAL NOT NULL,
    event      TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_series ON events (series_uid);
"""


@dataclasses.dataclass(frozen=True)
class Job:
    """A series claimed by the worker (or the sender): what it needs to do its part."""

    series_uid: str
    attempts: int
    send_attempts: int = 0


class JobQueue:
    """The queue in `work_dir`; safe to use from any thread (one connection per thread)."""

    def __init__(self, work_dir: str | Path, *, create: bool = True) -> None:
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / DB_NAME
        if not create and not self.path.is_file():
            raise InputError(f"{self.work_dir}: no liverstage serve queue here (no {DB_NAME})")
        if create:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self.connection()
        if create:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise InputError(f"{self.path}: queue schema version {version}, this liverstage reads {SCHEMA_VERSION}")

    # -- connections ------------------------------------------------------------------------
    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.DatabaseError as exc:
                raise InputError(f"{self.path}: not a liverstage queue database ({exc})") from None
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (threads that end should call it)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _event(conn: sqlite3.Connection, series_uid: str, event: str, detail: str = "", now: float | None = None) -> None:
        conn.execute("INSERT INTO events (series_uid, at, event, detail) VALUES (?, ?, ?, ?)",
                     (series_uid, time.time() if now is None else now, event, detail))

    # -- start-up ---------------------------------------------------------------------------
    def recover(self, now: float | None = None) -> list[str]:
        """After a crash: running series are queued again (or failed after MAX_ATTEMPTS), sends resume.

        Returns one line per series it touched, for the log.
        """
        now = time.time() if now is None else now
        lines = []
        with self._write() as conn:
            for row in conn.execute("SELECT series_uid, attempts FROM series WHERE state = 'running'").fetchall():
                uid, attempts = row["series_uid"], row["attempts"]
                if attempts >= MAX_ATTEMPTS:
                    reason = f"gave up: {attempts} attempts never finished (the process ended during each)"
                    self._finish(conn, uid, "failed", reason, now)
                    lines.append(f"series {uid}: {reason}")
                else:
                    conn.execute("UPDATE series SET state = 'queued', queued_at = ? WHERE series_uid = ?", (now, uid))
                    self._event(conn, uid, "queued", f"requeued on start-up (attempt {attempts} did not finish)", now)
                    lines.append(f"series {uid}: attempt {attempts} did not finish; queued again")
            n = conn.execute("UPDATE series SET send_state = 'pending' WHERE send_state = 'sending'").rowcount
            if n:
                lines.append(f"{n} interrupted send(s) pending again")
        return lines

    # -- storage SCP ------------------------------------------------------------------------
    def has_instance(self, sop_uid: str) -> bool:
        row = self.connection().execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return row is not None

    def record_instance(self, *, sop_uid: str, series_uid: str, study_uid: str, path: str,
                        series_number: str = "", description: str = "", modality: str = "",
                        calling_ae: str = "", now: float | None = None) -> str:
        """Record one stored instance; returns what it did to its series, for the log.

        "duplicate" (already recorded: nothing changed), "new series", "added", "quiet period
        restarted", "restage after this run", "reopened".
        """
        now = time.time() if now is None else now
        with self._write() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO instances (sop_uid, series_uid, path, received_at) VALUES (?, ?, ?, ?)",
                (sop_uid, series_uid, path, now)).rowcount
            if not inserted:
                return "duplicate"
            row = conn.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO series (series_uid, study_uid, series_number, description, modality, calling_ae, "
                    "instances, state, first_received, last_received) VALUES (?, ?, ?, ?, ?, ?, 1, 'received', ?, ?)",
                    (series_uid, study_uid, series_number, description, modality, calling_ae, now, now))
                self._event(conn, series_uid, "received", f"first instance, from {calling_ae}", now)
                return "new series"
            conn.execute("UPDATE series SET instances = instances + 1, last_received = ? WHERE series_uid = ?",
                         (now, series_uid))
            state = row["state"]
            if state == "queued":
                conn.execute("UPDATE series SET state = 'received', queued_at = NULL WHERE series_uid = ?", (series_uid,))
                return "quiet period restarted"
            if state == "running":
                conn.execute("UPDATE series SET restage = 1 WHERE series_uid = ?", (series_uid,))
                return "restage after this run"
            if state in FINAL_STATES:
                conn.execute("UPDATE series SET state = 'received', reason = '', stage = NULL, uncertain = NULL, "
                             "attempts = 0, send_state = '', send_error = '', send_attempts = 0, send_next_at = NULL "
                             "WHERE series_uid = ?", (series_uid,))
                self._event(conn, series_uid, "reopened", f"new instance after the series was {state}", now)
                return "reopened"
            return "added"

    # -- worker -----------------------------------------------------------------------------
    def promote_quiet(self, quiet_seconds: float, now: float | None = None) -> list[str]:
        """received -> queued for every series with no instance for `quiet_seconds`."""
        now = time.time() if now is None else now
        with self._write() as conn:
            uids = [r[0] for r in conn.execute(
                "SELECT series_uid FROM series WHERE state = 'received' AND last_received <= ? ORDER BY last_received",
                (now - quiet_seconds,)).fetchall()]
            for uid in uids:
                conn.execute("UPDATE series SET state = 'queued', queued_at = ? WHERE series_uid = ?", (now, uid))
                self._event(conn, uid, "queued", f"no instance for {quiet_seconds:g} s", now)
        return uids

    def next_quiet_due(self, quiet_seconds: float) -> float | None:
        """When the next received series becomes complete (epoch seconds), or None."""
        row = self.connection().execute("SELECT MIN(last_received) FROM series WHERE state = 'received'").fetchone()
        return None if row[0] is None else float(row[0]) + quiet_seconds

    def claim(self, now: float | None = None) -> Job | None:
        """The oldest queued series, now running (attempts + 1); None if nothing is queued."""
        now = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute("SELECT series_uid, attempts FROM series WHERE state = 'queued' "
                               "ORDER BY queued_at, last_received LIMIT 1").fetchone()
            if row is None:
                return None
            attempts = row["attempts"] + 1
            conn.execute("UPDATE series SET state = 'running', attempts = ?, started_at = ?, restage = 0 "
                         "WHERE series_uid = ?", (attempts, now, row["series_uid"]))
            self._event(conn, row["series_uid"], "running", f"attempt {attempts}", now)
        return Job(series_uid=row["series_uid"], attempts=attempts)

    def instance_paths(self, series_uid: str) -> list[Path]:
        rows = self.connection().execute("SELECT path FROM instances WHERE series_uid = ? ORDER BY path",
                                         (series_uid,)).fetchall()
        return [self.work_dir / r[0] for r in rows]

    def finish(self, job: Job, state: str, *, reason: str = "", stage: str | None = None,
               uncertain: bool | None = None, send: bool = False, now: float | None = None) -> str:
        """End the running attempt `job` in `state` (done, skipped, failed).

        Returns the state the series is in afterwards: `state`, or "received" when instances
        arrived during the run (the result is dropped and the series staged again), or "" when
        this attempt no longer owns the series (it was requeued meanwhile: nothing changed).
        """
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state!r}")
        now = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute("SELECT restage FROM series WHERE series_uid = ? AND state = 'running' AND attempts = ?",
                               (job.series_uid, job.attempts)).fetchone()
            if row is None:
                return ""
            if row["restage"]:
                conn.execute("UPDATE series SET state = 'received', restage = 0, attempts = 0 WHERE series_uid = ?",
                             (job.series_uid,))
                self._event(conn, job.series_uid, "received",
                            f"instances arrived during attempt {job.attempts}; its result ({state}) is dropped", now)
                return "received"
            self._finish(conn, job.series_uid, state, reason, now, stage=stage, uncertain=uncertain, send=send)
        return state

    def _finish(self, conn: sqlite3.Connection, uid: str, state: str, reason: str, now: float, *,
                stage: str | None = None, uncertain: bool | None = None, send: bool = False) -> None:
        conn.execute(
            "UPDATE series SET state = ?, reason = ?, stage = ?, uncertain = ?, finished_at = ?, runs = runs + 1, "
            "send_state = ?, send_attempts = 0, send_error = '', send_next_at = ? WHERE series_uid = ?",
            (state, reason, stage, None if uncertain is None else int(uncertain), now,
             "pending" if send else "", now if send else None, uid))
        self._event(conn, uid, state, reason if reason else (f"stage {stage}" if stage else ""), now)

    def requeue(self, job: Job, reason: str, now: float | None = None) -> bool:
        """Put the running attempt `job` back in the queue (shutdown, a transient error)."""
        now = time.time() if now is None else now
        with self._write() as conn:
            n = conn.execute("UPDATE series SET state = 'queued', queued_at = ? "
                             "WHERE series_uid = ? AND state = 'running' AND attempts = ?",
                             (now, job.series_uid, job.attempts)).rowcount
            if n:
                self._event(conn, job.series_uid, "queued", reason, now)
        return bool(n)

    # -- sender -----------------------------------------------------------------------------
    def claim_send(self, now: float | None = None) -> Job | None:
        now = time.time() if now is None else now
        with self._write() as conn:
            row = conn.execute("SELECT series_uid, attempts, send_attempts FROM series WHERE state = 'done' "
                               "AND send_state = 'pending' AND send_next_at <= ? ORDER BY send_next_at LIMIT 1",
                               (now,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE series SET send_state = 'sending', send_attempts = send_attempts + 1 "
                         "WHERE series_uid = ?", (row["series_uid"],))
        return Job(series_uid=row["series_uid"], attempts=row["attempts"], send_attempts=row["send_attempts"] + 1)

    def next_send_due(self) -> float | None:
        row = self.connection().execute(
            "SELECT MIN(send_next_at) FROM series WHERE state = 'done' AND send_state = 'pending'").fetchone()
        return None if row[0] is None else float(row[0])

    def finish_send(self, job: Job, *, files: int = 0, error: str = "", retry_at: float | None = None,
                    now: float | None = None) -> None:
        """Record a send: sent (no error), pending again at `retry_at`, or failed for good."""
        now = time.time() if now is None else now
        with self._write() as conn:
            if not error:
                conn.execute("UPDATE series SET send_state = 'sent', send_error = '', sent_at = ?, sent_files = ? "
                             "WHERE series_uid = ? AND send_state = 'sending'", (now, files, job.series_uid))
                self._event(conn, job.series_uid, "sent", f"{files} file(s), attempt {job.send_attempts}", now)
            elif retry_at is not None:
                conn.execute("UPDATE series SET send_state = 'pending', send_error = ?, send_next_at = ? "
                             "WHERE series_uid = ? AND send_state = 'sending'", (error, retry_at, job.series_uid))
                self._event(conn, job.series_uid, "send retry", f"attempt {job.send_attempts}: {error}", now)
            else:
                conn.execute("UPDATE series SET send_state = 'failed', send_error = ? "
                             "WHERE series_uid = ? AND send_state = 'sending'", (error, job.series_uid))
                self._event(conn, job.series_uid, "send failed", f"attempt {job.send_attempts}: {error}", now)

    # -- reading ----------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        """Every series, oldest first, as plain dicts (the columns of `series`)."""
        rows = self.connection().execute("SELECT * FROM series ORDER BY first_received").fetchall()
        return [dict(r) for r in rows]

    def events(self, series_uid: str | None = None) -> list[dict]:
        sql = "SELECT series_uid, at, event, detail FROM events"
        args: tuple = ()
        if series_uid is not None:
            sql += " WHERE series_uid = ?"
            args = (series_uid,)
        return [dict(r) for r in self.connection().execute(sql + " ORDER BY id", args).fetchall()]
