"""Every accepted job, kept in SQLite in the server's state folder, so history survives restarts.

The database lives outside the outputs folder: the outputs folder is served (images by name), the state folder never
is. The schema carries a version (`PRAGMA user_version`) and upgrades itself through the MIGRATIONS list, oldest
first. Deleted rows are overwritten (`secure_delete`) and the write-ahead log is checkpointed and truncated, so a
deleted prompt does not stay readable in the database files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        params TEXT NOT NULL,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0,
        outputs TEXT NOT NULL DEFAULT '[]',
        seeds TEXT NOT NULL DEFAULT '[]',
        seconds REAL,
        error TEXT
    );
    CREATE INDEX jobs_created ON jobs (created DESC);
    """,
]
DB_NAME = "history.sqlite3"
FINAL = ("done", "failed", "cancelled")
UNFINISHED = ("queued", "running", "saving")
PAGE_BYTES = 1_000_000  # a history page stops growing past this much stored JSON (one long entry still fits)


def state_folder(state_root: Path, outputs: Path) -> Path:
    """One state folder per outputs folder: `<state_root>/<outputs name>-<hash of its absolute path>`."""
    resolved = outputs.expanduser().resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return state_root.expanduser() / f"{resolved.name or 'root'}-{digest}"


class History:
    """A thread-safe record of jobs: written before a job is acknowledged, updated as it runs.

    Every method may raise `sqlite3.Error` or `OSError` (a full or read-only disk); callers decide what that means.
    """

    def __init__(self, path: Path, legacy: Path | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        if legacy is not None and legacy.exists():
            _move_legacy(legacy, path)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")
        self.migrate()

    def migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    def add(self, job_id: str, params: dict[str, Any], total_steps: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, params, created, total_steps) VALUES (?, 'queued', ?, ?, ?)",
                (job_id, json.dumps(params, ensure_ascii=False), time.time(), total_steps),
            )

    def add_done(self, job_id: str, params: dict[str, Any], outputs: list[str], seconds: float, started: float,
                 finished: float) -> None:  # fmt: skip
        """Record work that ran outside the queue (an upscale) as one finished row: a single insert, so no
        restart ever finds it unfinished and tries to re-run it as a generation."""
        stored = json.dumps(params, ensure_ascii=False), json.dumps(outputs, ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, params, outputs, created, started, finished, seconds) "
                "VALUES (?, 'done', ?, ?, ?, ?, ?, ?)",
                (job_id, *stored, started, started, finished, seconds),
            )

    def update(self, job_id: str, **fields: Any) -> None:
        for key in ("outputs", "seeds", "params"):
            if key in fields:
                fields[key] = json.dumps(fields[key], ensure_ascii=False)
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def page(self, limit: int = 20, offset: int = 0, max_bytes: int = PAGE_BYTES) -> list[dict[str, Any]]:
        """Newest first: at most `limit` entries and, past the first, at most `max_bytes` of stored JSON."""
        records, size = [], 0
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ? OFFSET ?", (limit, offset))
            for row in rows:
                size += sum(len(str(row[k]).encode()) for k in ("params", "outputs", "seeds", "error"))
                if records and size > max_bytes:
                    break
                records.append(_record(row))
        return records

    def all_params(self) -> list[dict[str, Any]]:
        """Every entry's parameters (what the input store must keep: the files they name)."""
        with self._lock:
            rows = self._db.execute("SELECT params FROM jobs").fetchall()
        return [json.loads(text) for (text,) in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def delete(self, job_id: str) -> dict[str, Any] | None:
        """Remove the entry; its text is overwritten in the database and the write-ahead log emptied."""
        record = self.get(job_id)
        if record is not None:
            with self._lock:
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return record

    def unfinished(self) -> list[dict[str, Any]]:
        """Jobs a previous process left queued, running or saving, oldest first."""
        with self._lock:
            marks = ", ".join("?" * len(UNFINISHED))
            rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created", UNFINISHED)
            return [_record(r, strict=False) for r in rows.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: sqlite3.Row, strict: bool = True) -> dict[str, Any]:
    record = dict(row)
    for key, empty in (("params", {}), ("outputs", []), ("seeds", [])):
        try:
            record[key] = json.loads(record[key])
        except (TypeError, ValueError):
            if strict:
                raise
            record[key] = empty
    return record


def _move_legacy(legacy: Path, path: Path) -> None:
    """Earlier versions kept the database inside the (served) outputs folder: copy it out once, then remove it."""
    if path.exists():
        log.warning("both %s and %s exist; using %s. Delete the old one from the outputs folder.", legacy, path, path)
        return
    source = sqlite3.connect(legacy)
    try:
        target = sqlite3.connect(path)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{legacy}{suffix}").unlink(missing_ok=True)
    log.warning("moved the history database out of the served outputs folder: %s -> %s", legacy, path)
