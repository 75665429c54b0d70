"""HTTP routes: the native API under /api/v1, OpenAI's images endpoint under /v1, and /metrics.

Routes translate HTTP into the engine's one parameters type and the job queue; validation errors are the
engine's own `ParamError`, answered as 422 with the field named.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from .. import __version__
from ..devices import free_memory_bytes
from ..params import GenerationParams, ParamError, resolve_size
from .jobs import Job, JobQueue, QueueFull

IMAGE_NAME = re.compile(r"^outputs_\d{14}(_\d+)?\.(png|jpg|webp)$")
RETRY_AFTER_S = 5


class Studio:
    """What the routes share: the queue (which holds the generator and history) and the outputs folder."""

    def __init__(self, queue: JobQueue, outputs: Path):
        self.queue = queue
        self.outputs = outputs.resolve()

    def delete_entry(self, job_id: str) -> dict[str, Any] | None:
        """Forget a finished job and delete its files; None if there is no such entry."""
        job = self.queue.get(job_id)
        if job is not None and not job.finished:
            raise HTTPException(409, "the job is still queued or running; cancel it first")
        record = self.queue.history.delete(job_id)
        if record is not None:
            for name in record["outputs"]:
                if IMAGE_NAME.match(name):
                    (self.outputs / name).unlink(missing_ok=True)
            self.queue.jobs.pop(job_id, None)
        return record


def param_error_response(err: ParamError) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": ["body", err.field], "msg": str(err), "type": "value_error"}], "error": str(err)},
    )


def queue_full_response(err: QueueFull) -> JSONResponse:
    return JSONResponse(status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)}, content={"error": str(err)})


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
        data = {
            k: record[k]
            for k in (
                "id",
                "status",
                "params",
                "step",
                "total_steps",
                "outputs",
                "seeds",
                "seconds",
                "error",
                "created",
                "started",
                "finished",
            )
        }
        data["position"] = None
    data["images"] = [
        {"url": f"/api/v1/images/{name}", "seed": seed} for name, seed in zip(data["outputs"], data["seeds"])
    ]
    return data


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter()
    queue = studio.queue

    def find(job_id: str) -> dict[str, Any]:
        job = queue.get(job_id)
        record = None if job else queue.history.get(job_id)
        if job is None and record is None:
            raise HTTPException(404, f"no job {job_id}")
        return job_view(studio, job, record)

    @router.post("/api/v1/generations", status_code=202, tags=["generations"])
    def create_generation(body: dict[str, Any] = Body(..., examples=[{"prompt": "a red fox in snow", "seed": 42}])):
        """Validate and enqueue; answers 202 with the job id and queue position."""
        try:
            params = GenerationParams.from_dict(body)
            job = queue.submit(params)
        except ParamError as err:
            return param_error_response(err)
        except QueueFull as err:
            return queue_full_response(err)
        return JSONResponse(
            status_code=202, content={"id": job.id, "status": job.status, "position": queue.position(job.id)}
        )

    @router.get("/api/v1/generations/{job_id}", tags=["generations"])
    def get_generation(job_id: str):
        return find(job_id)

    @router.delete("/api/v1/generations/{job_id}", tags=["generations"])
    def cancel_generation(job_id: str):
        """Cancel: a waiting job at once, a running one at its next step."""
        if queue.cancel(job_id) is None:
            raise HTTPException(404, f"no running or waiting job {job_id}")
        return find(job_id)

    @router.get("/api/v1/generations/{job_id}/events", tags=["generations"])
    async def generation_events(job_id: str):
        """Server-Sent Events: one `progress` event per change, then `done`, `failed` or `cancelled`."""
        job = queue.get(job_id)
        if job is None:
            record = find(job_id)  # 404 if unknown; a job of an earlier run: its final state, once
            return StreamingResponse(
                iter([f"event: {record['status']}\ndata: {json.dumps(record)}\n\n"]), media_type="text/event-stream"
            )

        async def stream():
            seen = -1
            while True:
                if job.version != seen:
                    seen = job.version
                    view = job_view(studio, job)
                    event = job.status if job.finished else "progress"
                    yield f"event: {event}\ndata: {json.dumps(view)}\n\n"
                    if job.finished:
                        return
                changed = await asyncio.to_thread(queue.wait, job, seen, 15.0)
                if not changed:
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.get("/api/v1/images/{name}", tags=["images"])
    def get_image(name: str):
        """A generated file, only from the outputs folder."""
        path = (studio.outputs / name).resolve()
        if not IMAGE_NAME.match(name) or path.parent != studio.outputs:
            raise HTTPException(404, "no such image")
        if not path.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(path)

    @router.get("/api/v1/history", tags=["history"])
    def history(limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0)):
        records = queue.history.list(limit=limit, offset=offset)
        return {
            "total": queue.history.count(),
            "limit": limit,
            "offset": offset,
            "items": [job_view(studio, None, r) for r in records],
        }

    @router.delete("/api/v1/history/{job_id}", tags=["history"])
    def delete_history(job_id: str):
        """Forget a finished job and delete its files."""
        record = studio.delete_entry(job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id}")
        return {"deleted": job_id, "files": record["outputs"]}

    @router.get("/api/v1/health", tags=["status"])
    def health():
        return status(studio)

    @router.get("/metrics", response_class=PlainTextResponse, tags=["status"])
    def metrics():
        return prometheus_text(studio)

    @router.post("/v1/images/generations", tags=["openai"])
    def openai_images(request: Request, body: dict[str, Any] = Body(...)):
        """OpenAI-compatible and synchronous: prompt, n, size "WxH", response_format b64_json|url, optional seed."""
        try:
            params = openai_params(body)
            job = queue.run_sync(params)
        except ParamError as err:
            return JSONResponse(
                status_code=400,
                content={"error": {"message": str(err), "type": "invalid_request_error", "param": err.field}},
            )
        except QueueFull as err:
            return queue_full_response(err)
        if job.status != "done":
            return JSONResponse(
                status_code=500, content={"error": {"message": job.error or job.status, "type": "server_error"}}
            )
        fmt = body.get("response_format") or "b64_json"
        data = []
        for name, seed in zip(job.outputs, job.seeds):
            if fmt == "url":
                data.append({"url": str(request.base_url).rstrip("/") + f"/api/v1/images/{name}", "seed": seed})
            else:
                encoded = base64.b64encode((studio.outputs / name).read_bytes()).decode()
                data.append({"b64_json": encoded, "seed": seed, "revised_prompt": job.params.prompt})
        return {"created": int(time.time()), "data": data}

    return router


def openai_params(body: dict[str, Any]) -> GenerationParams:
    """Map OpenAI's request onto ours; fields that mean nothing here (model, quality, style) are ignored."""
    if body.get("response_format", "b64_json") not in ("b64_json", "url"):
        raise ParamError("response_format", f"{body['response_format']!r} is not one of b64_json, url")
    width, height = resolve_size(str(body["size"])) if body.get("size") else (None, None)
    return GenerationParams(
        prompt=body.get("prompt", ""),
        negative_prompt=body.get("negative_prompt", ""),
        width=width,
        height=height,
        num_images=body.get("n") or 1,
        seed=body.get("seed", -1) if body.get("seed") is not None else -1,
    )


def status(studio: Studio) -> dict[str, Any]:
    generator = studio.queue.generator
    free = free_memory_bytes(generator.device)
    info = generator.info()
    return {
        "status": "ok",
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
        "queue": {"waiting": len(studio.queue.waiting), "running": studio.queue.running},
    }


def prometheus_text(studio: Studio) -> str:
    queue = studio.queue
    lines = ["# HELP zstudio_jobs_total Jobs by final or current status.", "# TYPE zstudio_jobs_total counter"]
    for state in ("queued", "done", "failed", "cancelled"):
        lines.append(f'zstudio_jobs_total{{status="{state}"}} {queue.counts.get(state, 0)}')
    lines += [
        "# HELP zstudio_queue_length Jobs waiting.",
        "# TYPE zstudio_queue_length gauge",
        f"zstudio_queue_length {len(queue.waiting)}",
        "# HELP zstudio_job_running 1 while a job runs.",
        "# TYPE zstudio_job_running gauge",
        f"zstudio_job_running {1 if queue.running else 0}",
    ]
    if queue.image_seconds:
        recent = sorted(queue.image_seconds)
        lines += [
            "# HELP zstudio_seconds_per_image Median seconds per image over the last 200 jobs.",
            "# TYPE zstudio_seconds_per_image gauge",
            f"zstudio_seconds_per_image {recent[len(recent) // 2]:.4f}",
        ]
    device = queue.generator.device
    if device.type == "cuda":
        import torch

        lines += [
            "# TYPE zstudio_gpu_memory_allocated_bytes gauge",
            f"zstudio_gpu_memory_allocated_bytes {torch.cuda.memory_allocated(device)}",
            "# TYPE zstudio_gpu_memory_reserved_bytes gauge",
            f"zstudio_gpu_memory_reserved_bytes {torch.cuda.memory_reserved(device)}",
        ]
    return "\n".join(lines) + "\n"
