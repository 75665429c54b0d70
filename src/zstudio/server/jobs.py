"""The job queue: a bounded line of waiting jobs and one worker thread that owns the GPU.

Every accepted job is in the history database before `submit` returns. Progress is pushed to waiters through a
condition variable (for SSE and the UI). A failed job is recorded and the worker goes on with the next one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import GenerationCancelled, Generator
from ..params import GenerationParams
from .history import FINAL, History

log = logging.getLogger(__name__)
DEFAULT_MAX_WAITING = 32


class QueueFull(Exception):
    """The waiting line is at its bound; the caller should retry later."""


@dataclass
class Job:
    id: str
    params: GenerationParams
    total_steps: int
    status: str = "queued"
    step: int = 0
    outputs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    seconds: float | None = None
    error: str | None = None
    cancel_requested: bool = False
    version: int = 0  # bumped on every change, so waiters know when to look again

    @property
    def finished(self) -> bool:
        return self.status in FINAL


class JobQueue:
    def __init__(self, generator: Generator, history: History, max_waiting: int = DEFAULT_MAX_WAITING):
        self.generator = generator
        self.history = history
        self.max_waiting = max_waiting
        self.jobs: dict[str, Job] = {}
        self.waiting: collections.deque[str] = collections.deque()
        self.running: str | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.image_seconds: list[float] = []
        self._changed = threading.Condition()
        self._stop = False
        self._worker = threading.Thread(target=self._work, name="zstudio-gpu-worker", daemon=True)

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._recover()
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._changed:
            self._stop = True
            if self.running:
                self.jobs[self.running].cancel_requested = True
            self._changed.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def _recover(self) -> None:
        """Jobs the last process left behind: queued ones run again; running ones failed (they may have crashed it)."""
        queued, running = self.history.interrupted()
        for record in running:
            self.history.update(
                record["id"],
                status="failed",
                finished=time.time(),
                error="interrupted: the server stopped while this job was running",
            )
        for record in queued:
            params = GenerationParams.from_dict(record["params"])
            job = Job(id=record["id"], params=params, total_steps=record["total_steps"])
            self.jobs[job.id] = job
            self.waiting.append(job.id)
            log.info("re-queued job %s left waiting by the previous run", job.id)

    # ------------------------------------------------------------------------------------------- requests
    def submit(self, params: GenerationParams) -> Job:
        self.generator.profile.resolve(params)  # refuse a size the model cannot draw now, not after queueing
        total = params.num_inference_steps or self.generator.profile.num_inference_steps
        with self._changed:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} jobs are waiting (the limit); try again shortly")
            job = Job(id=uuid.uuid4().hex[:16], params=params, total_steps=total)
            self.history.add(job.id, params.to_dict(), total)
            self.jobs[job.id] = job
            self.waiting.append(job.id)
            self.counts["queued"] += 1
            self._changed.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        """1 = next to run; 0 = running; None = not waiting."""
        if self.running == job_id:
            return 0
        try:
            return list(self.waiting).index(job_id) + 1
        except ValueError:
            return None

    def cancel(self, job_id: str) -> Job | None:
        with self._changed:
            job = self.jobs.get(job_id)
            if job is None or job.finished:
                return job
            if job_id in self.waiting:
                self.waiting.remove(job_id)
                self._finish(job, "cancelled")
            else:
                job.cancel_requested = True  # the worker stops it at the next step
            self._changed.notify_all()
        return job

    def wait(self, job: Job, seen_version: int, timeout: float) -> bool:
        """Block until the job changes past `seen_version` (True) or the timeout passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: job.version != seen_version or self._stop, timeout)

    def run_sync(self, params: GenerationParams, timeout: float = 3600) -> Job:
        """Submit and wait for the end: for synchronous APIs (OpenAI's images endpoint)."""
        job = self.submit(params)
        with self._changed:
            self._changed.wait_for(lambda: job.finished, timeout)
        return job

    # ---------------------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self.waiting or self._stop)
                if self._stop:
                    return
                job = self.jobs[self.waiting.popleft()]
                self.running = job.id
                self._set(job, status="running")
            self.history.update(job.id, status="running", started=time.time())
            try:
                self._run(job)
            except GenerationCancelled:
                self._finish(job, "cancelled")
            except Exception as err:  # any failure ends this job only; the worker serves the next one
                log.exception("job %s failed", job.id)
                self._finish(job, "failed", error=f"{type(err).__name__}: {err}")
            finally:
                with self._changed:
                    self.running = None
                    self._changed.notify_all()

    def _run(self, job: Job) -> None:
        def progress(step: int, total: int) -> None:
            if job.cancel_requested:
                raise GenerationCancelled()
            with self._changed:
                self._set(job, step=step, total_steps=total)
            self.history.update(job.id, step=step, total_steps=total)

        result = self.generator.generate_images(job.params, progress=progress)
        if job.cancel_requested:
            raise GenerationCancelled()
        paths = self.generator.save(result)
        job.params = result.params  # resolved: the profile's defaults filled in, the seed actually used
        self.history.update(job.id, params=result.params.to_dict())
        seconds = result.timings["total"]
        self.image_seconds.append(seconds / len(paths))
        self.image_seconds = self.image_seconds[-200:]
        self._finish(job, "done", outputs=[Path(p).name for p in paths], seeds=result.seeds, seconds=seconds)

    def _set(self, job: Job, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(job, key, value)
        job.version += 1
        self._changed.notify_all()

    def _finish(self, job: Job, status: str, **changes: Any) -> None:
        with self._changed:
            self._set(job, status=status, **changes)
            self.counts[status] += 1
        fields = {k: v for k, v in changes.items() if k in ("outputs", "seeds", "seconds", "error")}
        self.history.update(job.id, status=status, finished=time.time(), step=job.step, **fields)
