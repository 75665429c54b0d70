"""The job queue: a bounded line of waiting jobs, worker threads that run them, one writer thread that saves.

Who generates is the queue's `runner`: `LocalRunner` (the default) runs this process's engine with one worker
thread; `zstudio.server.replicas.RayRunner` sends each job to one of N Ray Serve engine replicas, with one worker
thread per replica. Everything else (history, waiting line, cancel, progress, saving) is this one job system.

Every accepted job is in the history database before `submit` returns, and is "done" there only once its files are on
disk. The GPU worker generates job N+1 while the writer encodes and writes job N's files; at most
`max_pending_saves` results wait for the writer (then the worker waits: memory cannot grow).

Nothing a job does can stop the worker: every database and file operation is guarded, a failure fails that job with
its reason ("disk full: ..." when it is one) and the worker goes on. A watchdog thread restarts a worker or writer
that died anyway, probes a full disk until writes succeed again, and drops finished jobs from memory after
`keep_finished_s` (the history database keeps them). While the worker, the engine or the disk cannot do the work,
`unavailable()` says why, and the HTTP layer answers 503 instead of accepting jobs that would not run.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..cancel import cancellable
from ..engine import GenerationCancelled, GenerationResult, Generator, ProgressCallback
from ..lora import take_prompt_loras
from ..params import DEFAULT_MAX_MEGAPIXEL_STEPS, GenerationParams, ParamError
from .history import FINAL, History

log = logging.getLogger(__name__)
DEFAULT_MAX_WAITING = 32
DEFAULT_KEEP_FINISHED_S = 300.0
MAX_KEPT_FINISHED = 500
MAX_PENDING_SAVES = 2
WATCH_INTERVAL_S = 0.5
PROBE_BYTES = 256 * 1024
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR}
SQLITE_STORAGE_ERRORS = ("disk is full", "disk i/o error", "readonly database", "unable to open database")


class QueueFull(Exception):
    """The waiting line is at its bound; the caller should retry later."""


class Unavailable(Exception):
    """The server cannot run jobs now (worker down, engine unusable, disk full); the message says which."""


class Runner(Protocol):
    """Runs one job's generation somewhere: this process's engine, or a replica."""

    slots: int  # jobs that can run at once (one worker thread each)

    def run(self, params: GenerationParams, progress: ProgressCallback, cancelled: Callable[[], bool]
            ) -> GenerationResult: ...  # fmt: skip

    def unavailable(self) -> str | None: ...


class LocalRunner:
    """The in-process engine: one job at a time, cancelled at its next transformer block."""

    slots = 1

    def __init__(self, generator: Generator):
        self.generator = generator

    def run(self, params: GenerationParams, progress: ProgressCallback, cancelled: Callable[[], bool]
            ) -> GenerationResult:  # fmt: skip
        if getattr(self.generator, "parallel_degree", 1) > 1:  # ranks run in step: a cancel waits for the image end
            return self.generator.generate_images(params, progress=progress)
        with cancellable(self.generator.pipe, cancelled):
            return self.generator.generate_images(params, progress=progress)

    def unavailable(self) -> str | None:
        return "the model is not loaded" if self.generator.pipe is None else None


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
    finished_at: float | None = None
    accepted_at: float = field(default_factory=time.monotonic)
    version: int = 0  # bumped on every change, so waiters know when to look again
    listeners: set[Callable[[], None]] = field(default_factory=set, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status in FINAL


def describe(err: BaseException, folder: Path | None = None) -> str:
    """One line for a failure; a full or unwritable disk is said plainly, with the folder."""
    where = f" {folder}" if folder else ""
    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: cannot write to{where} ({err.strerror})"
    if isinstance(err, sqlite3.Error) and "disk is full" in text.lower():
        return f"disk full: cannot write the history database in{where} ({text})"
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return f"cannot write to{where}: {err.strerror}"
    if isinstance(err, sqlite3.Error):
        return f"history database in{where}: {text}"
    return f"{type(err).__name__}: {text}"


def is_storage_error(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in STORAGE_ERRNOS
    return isinstance(err, sqlite3.Error) and any(s in str(err).lower() for s in SQLITE_STORAGE_ERRORS)


def breaks_engine(err: BaseException) -> bool:
    """Errors after which the device context cannot be trusted (an illegal access poisons the CUDA context)."""
    text = str(err)
    return isinstance(err, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)


class JobQueue:
    def __init__(
        self,
        generator: Generator,
        history: History,
        max_waiting: int = DEFAULT_MAX_WAITING,
        max_megapixel_steps: float = DEFAULT_MAX_MEGAPIXEL_STEPS,
        keep_finished_s: float = DEFAULT_KEEP_FINISHED_S,
        max_pending_saves: int = MAX_PENDING_SAVES,
        outputs: Path | None = None,
        runner: Runner | None = None,
    ):
        self.generator = generator  # validates and saves; `runner` generates (by default with this generator)
        self.runner = runner or LocalRunner(generator)
        self.outputs = Path(outputs) if outputs is not None else generator.outputs  # this queue's, not the engine's
        self.history = history
        self.max_waiting = max_waiting
        self.max_megapixel_steps = max_megapixel_steps
        self.keep_finished_s = keep_finished_s
        self.jobs: dict[str, Job] = {}
        self.waiting: collections.deque[str] = collections.deque()
        self.running_ids: list[str] = []  # oldest first
        self.counts: collections.Counter[str] = collections.Counter()
        # Called with ("queue_wait" | "image", seconds) as jobs start and finish (the /metrics histograms).
        self.observers: list[Callable[[str, float], None]] = []
        self.restarts = 0
        self.problems: dict[str, str] = {}  # "storage" / "engine" -> why jobs cannot run now
        self._unrecorded: dict[str, dict[str, Any]] = {}  # history updates that failed, retried once writes work
        self._changed = threading.Condition()
        self._saves: queue.Queue[tuple[Job, GenerationResult] | None] = queue.Queue(maxsize=max_pending_saves)
        self._stopping = False
        self._workers = [self._worker_thread(slot) for slot in range(self.runner.slots)]
        self._writer = self._thread(self._write, "zstudio-writer")
        self._watchdog = self._thread(self._watch, "zstudio-watchdog")
        self._crash: dict[int, str] = {}  # worker slot -> why it died
        self._crashed_job: dict[int, Job] = {}

    @property
    def running(self) -> str | None:
        """The longest-running job, or None (with replicas several run at once: see `running_ids`)."""
        return self.running_ids[0] if self.running_ids else None

    def _worker_thread(self, slot: int) -> threading.Thread:
        return self._thread(lambda: self._work(slot), f"zstudio-gpu-worker-{slot}")

    @staticmethod
    def _thread(target: Callable[[], None], name: str) -> threading.Thread:
        return threading.Thread(target=target, name=name, daemon=True)

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._recover()
        for worker in self._workers:
            worker.start()
        self._writer.start()
        self._watchdog.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work: the running job fails with the reason; finished images are still written."""
        with self._changed:
            self._stopping = True
            for job_id in self.running_ids:
                self.jobs[job_id].cancel_requested = True
            self._changed.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        try:
            self._saves.put(None, timeout=max(0.1, deadline - time.monotonic()))
        except queue.Full:
            log.error("the writer did not drain its queue before shutdown")
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._watchdog.join(1.0)

    def _recover(self) -> None:
        """Jobs the last process left: queued ones run again; running or saving ones failed (they may have crashed
        it); queued ones whose parameters no longer validate failed with that reason."""
        for record in self.history.unfinished():
            if record["status"] == "queued":
                try:
                    params = GenerationParams.from_dict(record["params"])
                except (ParamError, TypeError) as err:
                    self._record(record["id"], status="failed", finished=time.time(),
                                 error=f"its stored parameters no longer validate: {err}")  # fmt: skip
                    continue
                job = Job(id=record["id"], params=params, total_steps=record["total_steps"])
                self.jobs[job.id] = job
                self.waiting.append(job.id)
                log.info("re-queued job %s left waiting by the previous run", job.id)
            else:
                where = "running" if record["status"] == "running" else "writing its images"
                self._record(record["id"], status="failed", finished=time.time(),
                             error=f"interrupted: the server stopped while this job was {where}")  # fmt: skip

    # --------------------------------------------------------------------------------------------- health
    def unavailable(self) -> str | None:
        """Why jobs cannot run now, or None when they can."""
        if self._stopping:
            return "the server is shutting down"
        for slot, worker in enumerate(self._workers):
            if not worker.is_alive():
                return f"the GPU worker stopped ({self._crash.get(slot) or 'not started'}); it is being restarted"
        if not self._writer.is_alive():
            return "the image writer stopped; it is being restarted"
        if (reason := self.runner.unavailable()) is not None:
            return reason
        for reason in self.problems.values():
            return reason
        return None

    # ------------------------------------------------------------------------------------------- requests
    def submit(self, params: GenerationParams) -> Job:
        """Accept a job (recorded before this returns) or raise ParamError, QueueFull or Unavailable."""
        # A size the model cannot draw, or too much work, is refused now rather than failed after queueing.
        resolved = self.generator.profile.resolve(params)
        resolved.check_cost(self.max_megapixel_steps)
        for name, _ in take_prompt_loras(params).loras:  # an unknown LoRA is refused now, as the field it came in
            self.generator.loras.folder.find(name)
        total = resolved.num_inference_steps
        reason = self.unavailable()
        if reason:
            raise Unavailable(reason)
        with self._changed:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} jobs are waiting (the limit); try again shortly")
            job = Job(id=uuid.uuid4().hex[:16], params=params, total_steps=total)
            try:
                self.history.add(job.id, params.to_dict(), total)
            except (sqlite3.Error, OSError) as err:
                reason = self._storage_failed(err, self.history.path.parent)
                raise Unavailable(f"the job could not be recorded: {reason}") from None
            self.jobs[job.id] = job
            self.waiting.append(job.id)
            self.counts["queued"] += 1
            self._changed.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        """1 = next to run; 0 = running; None = not waiting."""
        if job_id in self.running_ids:
            return 0
        try:
            return list(self.waiting).index(job_id) + 1
        except ValueError:
            return None

    def cancel(self, job_id: str) -> Job | None:
        """A waiting job ends at once; a running one at its next transformer block. Saving jobs finish."""
        with self._changed:
            job = self.jobs.get(job_id)
            if job is None or job.finished:
                return job
            if job_id in self.waiting:
                self.waiting.remove(job_id)
                self._finish(job, "cancelled")
            elif job.status == "running":
                job.cancel_requested = True
            self._changed.notify_all()
        return job

    def wait(self, job: Job, seen_version: int, timeout: float) -> bool:
        """Block this thread until the job changes past `seen_version` (True) or the timeout passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: job.version != seen_version or self._stopping, timeout)

    async def wait_async(self, job: Job, seen_version: int, timeout: float) -> bool:
        """`wait` for the event loop: an asyncio event per waiter, set from the worker's thread (no thread pool)."""
        import asyncio

        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

        with self._changed:
            if job.version != seen_version:
                return True
            job.listeners.add(wake)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._changed:
                job.listeners.discard(wake)

    # ---------------------------------------------------------------------------------------------- worker
    def _work(self, slot: int = 0) -> None:
        job = None
        try:
            while (job := self._next_job()) is not None:
                self._run(job)
        except BaseException as err:  # recorded for the watchdog, which fails `job` and starts a new worker
            self._crash[slot] = describe(err)
            if job is not None:
                self._crashed_job[slot] = job
            raise

    def _next_job(self) -> Job | None:
        with self._changed:
            self._changed.wait_for(lambda: self.waiting or self._stopping)
            if self._stopping:
                return None
            job = self.jobs[self.waiting.popleft()]
            self.running_ids.append(job.id)
            self._set(job, status="running")
        return job

    def _run(self, job: Job) -> None:
        """Generate one job and hand it to the writer; any failure ends this job only."""
        try:
            self._observe("queue_wait", time.monotonic() - job.accepted_at)
            if not self._record(job.id, status="running", started=time.time()):
                raise Unavailable(f"the job could not be recorded: {self.problems.get('storage')}")

            def progress(step: int, total: int) -> None:
                if job.cancel_requested:
                    raise GenerationCancelled()
                with self._changed:
                    self._set(job, step=step, total_steps=total)

            result = self.runner.run(job.params, progress, lambda: job.cancel_requested)
            if job.cancel_requested:
                raise GenerationCancelled()
        except GenerationCancelled:
            if self._stopping:
                self._finish(job, "failed", error="the server was stopped (Ctrl-C or a signal) while this job ran")
            else:
                self._finish(job, "cancelled")
        except Unavailable as err:
            self._finish(job, "failed", error=str(err))
        except Exception as err:
            log.exception("job %s failed", job.id)
            if breaks_engine(err):
                self.problems["engine"] = f"the engine is unusable after {describe(err)}; restart the server"
            self._finish(job, "failed", error=describe(err))
        else:
            job.params = result.params  # resolved: the profile's defaults filled in, the seed actually used
            with self._changed:
                self._set(job, status="saving", seeds=result.seeds, seconds=result.timings["total"])
            self._record(job.id, status="saving", params=result.params.to_dict())
            self._saves.put((job, result))  # waits only while MAX_PENDING_SAVES results are already waiting
        finally:
            with self._changed:
                self.running_ids.remove(job.id)
                self._changed.notify_all()

    # ---------------------------------------------------------------------------------------------- writer
    def _write(self) -> None:
        while (item := self._saves.get()) is not None:
            job, result = item
            try:
                paths = self.generator.save(result, self.outputs)
            except Exception as err:
                log.error("job %s: saving failed: %s", job.id, err)
                reason = self._storage_failed(err, self.outputs) if is_storage_error(err) else describe(err)
                self._finish(job, "failed", error=f"its images could not be saved: {reason}")
                continue
            seconds = result.timings["total"]
            self._observe("image", seconds / len(paths))
            self._finish(job, "done", outputs=[Path(p).name for p in paths], seeds=result.seeds, seconds=seconds)

    def _observe(self, what: str, seconds: float) -> None:
        for observer in self.observers:
            observer(what, seconds)

    # -------------------------------------------------------------------------------------------- watchdog
    def _watch(self) -> None:
        while not self._stopping:
            time.sleep(WATCH_INTERVAL_S)
            try:
                self._revive()
                if "storage" in self.problems:
                    self._probe_storage()
                self._evict()
            except Exception:  # the watchdog itself must not die: log and look again next time
                log.exception("watchdog check failed")

    def _revive(self) -> None:
        if self._stopping:
            return
        for slot, worker in enumerate(self._workers):
            if worker.is_alive():
                continue
            crash = self._crash.get(slot)
            log.error("the GPU worker died (%s); starting a new one", crash)
            job = self._crashed_job.pop(slot, None)
            if job is not None and not job.finished:
                self._finish(job, "failed", error=f"the GPU worker crashed while running this job: {crash}")
            self.restarts += 1
            self._workers[slot] = self._worker_thread(slot)
            self._workers[slot].start()
        if not self._writer.is_alive():
            log.error("the image writer died; starting a new one")
            self.restarts += 1
            self._writer = self._thread(self._write, "zstudio-writer")
            self._writer.start()

    def _probe_storage(self) -> None:
        """Writes failed earlier: try a file in each folder and the pending history updates; clear when all work."""
        for folder in {self.outputs, self.history.path.parent}:
            probe = Path(folder) / f".zstudio-probe-{os.getpid()}"
            try:
                with open(probe, "wb") as handle:
                    handle.write(b"\0" * PROBE_BYTES)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError:
                return
            finally:
                probe.unlink(missing_ok=True)
        for job_id, fields in list(self._unrecorded.items()):
            try:
                self.history.update(job_id, **fields)
            except (sqlite3.Error, OSError):
                return
            self._unrecorded.pop(job_id, None)
        log.warning("writes work again: %s", self.problems.pop("storage", ""))

    def _evict(self) -> None:
        """Finished jobs leave memory after `keep_finished_s` (and past MAX_KEPT_FINISHED); history keeps them."""
        now = time.monotonic()
        with self._changed:
            finished = [j for j in self.jobs.values() if j.finished and j.id not in self._unrecorded]
            finished.sort(key=lambda j: j.finished_at or 0)
            excess = len(finished) - MAX_KEPT_FINISHED
            for index, job in enumerate(finished):
                if index < excess or now - (job.finished_at or now) >= self.keep_finished_s:
                    del self.jobs[job.id]

    # --------------------------------------------------------------------------------------------- records
    def _record(self, job_id: str, **fields: Any) -> bool:
        """Write to the history; on failure keep the update for later, mark storage failing, and say False."""
        try:
            self.history.update(job_id, **fields)
            return True
        except (sqlite3.Error, OSError) as err:
            self._unrecorded.setdefault(job_id, {}).update(fields)
            if is_storage_error(err):
                self._storage_failed(err, self.history.path.parent)
            log.error("job %s: history update failed: %s", job_id, describe(err, self.history.path.parent))
            return False

    def _storage_failed(self, err: BaseException, folder: Path) -> str:
        reason = describe(err, folder)
        self.problems["storage"] = reason
        return reason

    def _set(self, job: Job, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(job, key, value)
        job.version += 1
        for wake in list(job.listeners):
            wake()
        self._changed.notify_all()

    def _finish(self, job: Job, status: str, **changes: Any) -> None:
        """Record the end in the history first, then show it: a client that sees the job end finds it there too."""
        fields = {k: v for k, v in changes.items() if k in ("outputs", "seeds", "seconds", "error")}
        self._record(job.id, status=status, finished=time.time(), step=job.step, **fields)
        with self._changed:
            self._set(job, status=status, finished_at=time.monotonic(), **changes)
            self.counts[status] += 1
