"""HTTP routes: the native API under /api/v1, OpenAI's images endpoint under /v1, and /metrics.

Routes translate HTTP into the engine's one parameters type and the job queue. Every failure is one line naming what
was wrong: bad input 422 (400 in OpenAI's shape on /v1), a full queue 429, a server that cannot run jobs now (worker
down, engine unusable, disk full) 503, each with the reason.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..devices import free_memory_bytes
from ..params import GenerationParams, ParamError, printable, resolve_size
from .history import PAGE_BYTES
from .jobs import Job, JobQueue, QueueFull, Unavailable, describe
from .metrics import metrics_registry, metrics_text
from .protocol import (
    Accepted,
    Deleted,
    ErrorBody,
    GenerationRequest,
    Health,
    HistoryPage,
    InvalidRequest,
    OpenAIError,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    answers,
)
from .protocol import Job as JobBody

IMAGE_NAME = re.compile(r"^outputs_\d{14}(_\d+)?\.(png|jpg|webp)$")
RETRY_AFTER_S = 5
MAX_OFFSET = 10**9
SSE_PING_S = 15
DISCONNECT_POLL_S = 0.5


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate echoed from bad input becomes its \\uXXXX escape, not a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace"
        )


class Studio:
    """What the routes share: the queue (which holds the generator and history), the outputs folder, and the
    folders where the web UI keeps copies of images (so deleting an entry deletes those too)."""

    def __init__(self, queue: JobQueue, outputs: Path):
        self.queue = queue
        self.outputs = outputs.resolve()
        self.cache_dirs: list[Path] = []
        self.blocks = None  # the web UI (gradio.Blocks), when mounted
        self.metrics = metrics_registry(queue)

    def delete_entry(self, job_id: str) -> dict[str, Any] | None:
        """Forget a finished job: its row (overwritten in the database file), its images and every cached copy."""
        job = self.queue.get(job_id)
        if job is not None and not job.finished:
            raise HTTPException(409, "the job is still queued, running or saving; cancel it first")
        record = self.queue.history.delete(job_id)
        if record is not None:
            for name in record["outputs"]:
                if IMAGE_NAME.match(name):
                    (self.outputs / name).unlink(missing_ok=True)
                    for cache in self.cache_dirs:
                        for copy in cache.glob(f"*/{name}"):
                            copy.unlink(missing_ok=True)
            self.queue.jobs.pop(job_id, None)
        return record


def error_response(status: int, message: str, field: str | None = None, **headers: str) -> SafeJSONResponse:
    content: dict[str, Any] = {"error": message}
    if field is not None:
        content["detail"] = [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    return SafeJSONResponse(status_code=status, content=content, headers=headers or None)


def unavailable_response(reason: str) -> SafeJSONResponse:
    return error_response(503, reason, **{"Retry-After": str(RETRY_AFTER_S)})


def submit_or_refuse(queue: JobQueue, make_params: Callable[[], GenerationParams]) -> Job | SafeJSONResponse:
    """The accepted job, or the answer that refuses it: 422 naming the field, 429 when the line is full, 503 when
    jobs cannot run now (each with the reason)."""
    try:
        return queue.submit(make_params())
    except ParamError as err:
        return error_response(422, str(err), err.field)
    except QueueFull as err:
        return error_response(429, str(err), **{"Retry-After": str(RETRY_AFTER_S)})
    except Unavailable as err:
        return unavailable_response(str(err))


async def wait_finished(request: Request, queue: JobQueue, job: Job) -> bool:
    """Wait for the job to end; False (and the job cancelled) if the client goes away first."""
    while not job.finished:
        seen = job.version
        await queue.wait_async(job, seen, DISCONNECT_POLL_S)
        if not job.finished and await request.is_disconnected():
            queue.cancel(job.id)
            return False
    return True


def add_error_handlers(app: FastAPI) -> None:
    """One-line errors for everything the framework raises, and 503 (not 500) when the disk or database fails."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": ["body"], "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"] or ["body"]
        if first.get("type") == "json_invalid":  # its loc is a character position, not a field
            loc = ["body"]
        message = printable(f"{'.'.join(loc)}: {first.get('msg', 'invalid')}")
        detail = [{"loc": ["body", *loc], "msg": message, "type": first.get("type", "value_error")}]
        return SafeJSONResponse(status_code=422, content={"error": message, "detail": detail})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = printable(str(err.detail))
        return SafeJSONResponse(status_code=err.status_code, content={"error": message, "detail": message},
                                headers=getattr(err, "headers", None))  # fmt: skip

    @app.exception_handler(sqlite3.Error)
    async def database_error(request: Request, err: sqlite3.Error):
        queue: JobQueue = request.app.state.studio.queue
        return unavailable_response(describe(err, queue.history.path.parent))

    @app.exception_handler(OSError)
    async def storage_error(request: Request, err: OSError):
        return unavailable_response(describe(err))


def job_view(studio: Studio, job: Job | None, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One shape for a job, whether it is in memory (this process) or only in the history database."""
    if job is not None:
        data = {
            "id": job.id,
            "status": job.status,
            "params": job.params.to_dict(),
            "step": job.step,
            "total_steps": job.total_steps,
            "outputs": job.outputs,
            "seeds": job.seeds,
            "seconds": job.seconds,
            "error": job.error,
            "position": studio.queue.position(job.id),
        }
    else:
        assert record is not None
        keys = ("id", "status", "params", "step", "total_steps", "outputs", "seeds", "seconds", "error", "created",
                "started", "finished")  # fmt: skip
        data = {k: record[k] for k in keys}
        data["position"] = None
    data["images"] = [
        {"url": f"/api/v1/images/{name}", "seed": seed} for name, seed in zip(data["outputs"], data["seeds"])
    ]
    return data


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(default_response_class=SafeJSONResponse)
    queue = studio.queue

    def find(job_id: str) -> dict[str, Any]:
        job = queue.get(job_id)
        record = None if job else queue.history.get(job_id)
        if job is None and record is None:
            raise HTTPException(404, f"no job {printable(job_id)}")
        return job_view(studio, job, record)

    @router.post("/api/v1/generations", status_code=202, tags=["generations"],
                 responses=answers(Accepted, 202, e422=InvalidRequest, e429=ErrorBody, e503=ErrorBody))  # fmt: skip
    def create_generation(body: GenerationRequest):
        """Validate and enqueue; answers 202 with the job id and queue position (429 when the line is full, 503 when
        jobs cannot run now, each with the reason)."""
        job = submit_or_refuse(queue, lambda: GenerationParams.from_dict(body.model_dump(exclude_unset=True)))
        if not isinstance(job, Job):
            return job
        return SafeJSONResponse(
            status_code=202, content={"id": job.id, "status": job.status, "position": queue.position(job.id)}
        )

    @router.get(
        "/api/v1/generations/{job_id}",
        tags=["generations"],
        responses=answers(JobBody, e404=ErrorBody, e422=InvalidRequest),
    )
    def get_generation(job_id: str):
        return find(job_id)

    @router.delete(
        "/api/v1/generations/{job_id}",
        tags=["generations"],
        responses=answers(JobBody, e404=ErrorBody, e422=InvalidRequest),
    )
    def cancel_generation(job_id: str):
        """Cancel: a waiting job at once, a running one before its next transformer block."""
        if queue.cancel(job_id) is None:
            raise HTTPException(404, f"no running or waiting job {printable(job_id)}")
        return find(job_id)

    @router.get(
        "/api/v1/generations/{job_id}/events",
        tags=["generations"],
        responses=answers(e404=ErrorBody, e422=InvalidRequest),
    )
    async def generation_events(job_id: str):
        """Server-Sent Events: one `progress` event per change, then `done`, `failed` or `cancelled`."""
        job = queue.get(job_id)
        if job is None:
            record = await run_in_threadpool(find, job_id)  # 404 if unknown; an earlier run's job: its final state

            async def once():
                yield {"event": record["status"], "data": json.dumps(record, ensure_ascii=False)}

            return EventSourceResponse(once())

        async def stream():
            seen = -1
            while True:
                if job.version != seen:
                    seen = job.version
                    event = job.status if job.finished else "progress"
                    yield {"event": event, "data": json.dumps(job_view(studio, job), ensure_ascii=False)}
                    if job.finished:
                        return
                await queue.wait_async(job, seen, SSE_PING_S)

        return EventSourceResponse(stream(), ping=SSE_PING_S)

    @router.get("/api/v1/images/{name}", tags=["images"], responses=answers(e404=ErrorBody, e422=InvalidRequest))
    def get_image(name: str):
        """A generated file, by name, only from the outputs folder."""
        if not IMAGE_NAME.match(name):
            raise HTTPException(404, "no such image")
        path = studio.outputs / name
        if not path.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(path)

    @router.get("/api/v1/history", tags=["history"], responses=answers(HistoryPage, e422=InvalidRequest))
    def history(limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0, le=MAX_OFFSET)):
        """Newest first; a page holds at most `limit` entries and about 1 MB (then `next_offset` continues)."""
        records = queue.history.page(limit=limit, offset=offset, max_bytes=PAGE_BYTES)
        total = queue.history.count()
        following = offset + len(records)
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "next_offset": following if following < total else None,
            "items": [job_view(studio, None, r) for r in records],
        }

    @router.delete(
        "/api/v1/history/{job_id}",
        tags=["history"],
        responses=answers(Deleted, e404=ErrorBody, e409=ErrorBody, e422=InvalidRequest),
    )
    def delete_history(job_id: str):
        """Forget a finished job: its database row, its files and the web UI's copies of them."""
        record = studio.delete_entry(job_id)
        if record is None:
            raise HTTPException(404, f"no job {printable(job_id)}")
        return {"deleted": job_id, "files": record["outputs"]}

    @router.get("/api/v1/health", tags=["status"], responses=answers(Health, e503=Health))
    def health():
        """200 while jobs are accepted; 503 with the reason while the worker, the engine or the disk cannot."""
        data = status(studio)
        return SafeJSONResponse(status_code=200 if data["status"] == "ok" else 503, content=data)

    @router.get("/metrics", tags=["status"])
    def metrics():
        return Response(metrics_text(studio.metrics), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.post("/v1/images/generations", tags=["openai"], responses=answers(
        OpenAIImagesResponse, e400=OpenAIError, e422=InvalidRequest, e429=OpenAIError, e500=OpenAIError,
        e503=OpenAIError))  # fmt: skip
    async def openai_images(request: Request, body: OpenAIImageRequest):
        """OpenAI-compatible and synchronous: prompt, n, size "WxH", response_format b64_json|url, optional seed.
        If the client goes away before the images are ready, its job is cancelled."""
        try:
            params = openai_params(body)
            job = await run_in_threadpool(queue.submit, params)
        except ParamError as err:
            field = {"num_images": "n", "width": "size", "height": "size"}.get(err.field, err.field)
            return openai_error(400, str(err), "invalid_request_error", field)
        except QueueFull as err:
            return openai_error(429, str(err), "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        except Unavailable as err:
            return openai_error(503, str(err), "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        if not await wait_finished(request, queue, job):
            return Response(status_code=499)  # nobody reads it: the client has gone
        if job.status != "done":
            code = 503 if queue.unavailable() else 500 if job.status == "failed" else 409
            return openai_error(code, job.error or f"the job was {job.status}", "server_error")
        fmt = body.response_format or "b64_json"
        data = []
        for name, seed in zip(job.outputs, job.seeds):
            if fmt == "url":
                data.append({"url": str(request.base_url).rstrip("/") + f"/api/v1/images/{name}", "seed": seed})
            else:
                raw = await run_in_threadpool((studio.outputs / name).read_bytes)
                data.append({"b64_json": base64.b64encode(raw).decode(), "seed": seed,
                             "revised_prompt": job.params.prompt})  # fmt: skip
        return {"created": int(time.time()), "data": data}

    return router


def openai_error(status: int, message: str, kind: str, param: str | None = None, headers=None) -> SafeJSONResponse:
    error = {"message": printable(message), "type": kind, "param": param}
    return SafeJSONResponse(status_code=status, content={"error": error}, headers=headers)


def openai_params(body: OpenAIImageRequest) -> GenerationParams:
    """Map OpenAI's request onto ours."""
    width, height = resolve_size(body.size) if body.size else (None, None)
    return GenerationParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or "",
        width=width,
        height=height,
        num_images=body.n if body.n is not None else 1,
        seed=body.seed if body.seed is not None else -1,
    )


def status(studio: Studio) -> dict[str, Any]:
    queue = studio.queue
    generator = queue.generator
    free = free_memory_bytes(generator.device)
    info = generator.info()
    reason = queue.unavailable()
    return {
        "status": "ok" if reason is None else "unavailable",
        "reason": reason,
        "version": __version__,
        "model": info["model"],
        "model_sizes": info["sizes"],
        "model_loaded": info["loaded"],
        "embedded_default": info["embedded_default"],
        "device": info["device"],
        "dtype": info["dtype"],
        "speed": info["speed"],
        "memory_mode": info["memory_mode"],
        "free_gpu_memory_gb": round(free / 2**30, 2) if free is not None else None,
        "queue": {"waiting": len(queue.waiting), "running": queue.running, "worker_restarts": queue.restarts},
    }
