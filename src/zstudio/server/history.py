"""Every accepted job, kept in SQLite under the outputs folder, so history survives restarts.

The schema carries a version (`PRAGMA user_version`) and upgrades itself through the MIGRATIONS list, oldest first.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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


class History:
    """A thread-safe record of jobs: written before a job is acknowledged, updated as it runs."""

    def __init__(self, outputs: Path):
        outputs.mkdir(parents=True, exist_ok=True)
        self.path = outputs / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self.migrate()

    def migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    @property
    def version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def add(self, job_id: str, params: dict[str, Any], total_steps: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, params, created, total_steps) VALUES (?, 'queued', ?, ?, ?)",
                (job_id, json.dumps(params, ensure_ascii=False), time.time(), total_steps),
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

    def list(self, limit: int = 20, offset: int = 0, status: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM jobs", []
        if status:
            query, args = query + " WHERE status = ?", [status]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC LIMIT ? OFFSET ?", (*args, limit, offset))
            return [_record(r) for r in rows.fetchall()]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def delete(self, job_id: str) -> dict[str, Any] | None:
        record = self.get(job_id)
        if record is not None:
            with self._lock:
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return record

    def interrupted(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Jobs a previous process left unfinished: (queued, running)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created")
            records = [_record(r) for r in rows.fetchall()]
        return [r for r in records if r["status"] == "queued"], [r for r in records if r["status"] == "running"]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    record["params"] = json.loads(record["params"])
    record["outputs"] = json.loads(record["outputs"])
    record["seeds"] = json.loads(record["seeds"])
    return record
