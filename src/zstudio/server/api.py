"""HTTP routes: the native API under /api/v1, OpenAI's images endpoints under /v1, and /metrics.

Routes translate HTTP into the engine's one parameters type and the job queue. Every failure is one line naming what
was wrong: bad input 422 (400 in OpenAI's shape on /v1), a full queue 429, a server that cannot run jobs now (worker
down, engine unusable, disk full) 503, each with the reason. Edits and upscales take their pictures as uploads
(multipart) or by name (`server.inputs`); their files are checked by `zstudio.edit.validate` before a job is queued.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from .. import __version__, edit
from ..devices import free_memory_bytes
from ..params import MAX_INPUT_BYTES, GenerationParams, ParamError, printable, resolve_size
from ..upscale import LANCZOS, UpscaleResult, find_upscalers
from .history import PAGE_BYTES
from .inputs import DEFAULT_MAX_AGE_S, DEFAULT_MAX_TOTAL_BYTES, IMAGE_NAME, InputStore, shown_name
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
    LoraList,
    OpenAIEditRequest,
    OpenAIError,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    Upscaled,
    UpscaleRequest,
    UpscalerList,
    answers,
)
from .protocol import Job as JobBody

__all__ = ["IMAGE_NAME", "Studio", "build_router", "job_view", "status"]
RETRY_AFTER_S = 5
MAX_OFFSET = 10**9
SSE_PING_S = 15
DISCONNECT_POLL_S = 0.5
log = logging.getLogger(__name__)


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate echoed from bad input becomes its \\uXXXX escape, not a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace"
        )


class Studio:
    """What the routes share: the queue (which holds the generator and history), the outputs folder, and the
    folders where the web UI keeps copies of images (so deleting an entry deletes those too)."""

    def __init__(self, queue: JobQueue, outputs: Path, inputs: Path | None = None,
                 max_input_bytes: int = MAX_INPUT_BYTES, upscalers: tuple[str, ...] = (),
                 upload_max_age_s: float = DEFAULT_MAX_AGE_S, upload_max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
                 ):  # fmt: skip
        self.queue = queue
        self.outputs = outputs.resolve()
        # Uploaded pictures; beside the history database when served (create_app), so queued edits survive restarts.
        # Those that no history entry or job names are collected (InputStore.collect).
        self.inputs = InputStore(self.outputs, inputs if inputs is not None else outputs / ".inputs", max_input_bytes,
                                 references=self.named_files, max_age_s=upload_max_age_s,
                                 max_total_bytes=upload_max_total_bytes)  # fmt: skip
        self.upscalers = upscalers  # files and folders that upscaler names come from, besides ZSTUDIO_UPSCALERS
        self.cache_dirs: list[Path] = []
        self.blocks = None  # the web UI (gradio.Blocks), when mounted
        self.metrics = metrics_registry(queue)

    def named_files(self) -> set[str]:
        """The file names that history entries (generations' image/mask/control, upscales' source) and the queue's
        jobs name: the input store never deletes these."""
        names: set[str] = set()
        for params in self.queue.history.all_params():
            names |= file_names(params)
        for job in list(self.queue.jobs.values()):
            names |= file_names(job.params.to_dict())
        return names

    def edit_params(self, fields: dict[str, Any]) -> GenerationParams:
        """The parameters of a request whose `image`/`mask` are names: resolved to this server's files and checked
        (`zstudio.edit.validate`) now, so a bad file is refused before a job is queued. An edit's width and height
        are the ones it will draw (the request's, or its source's), so the queue's cost check is the real one."""
        fields = dict(fields)
        for name in ("image", "mask", "control"):
            if fields.get(name) is not None:
                fields[name] = self.inputs.resolve(name, fields[name])
        params = GenerationParams.from_dict(fields)
        checked = edit.validate(params, self.queue.generator.profile, max_input_bytes=self.inputs.max_bytes)
        if checked is not None:
            params = params.replace(width=checked.params.width, height=checked.params.height)
        self.queue.generator.validate_control(params, checked)  # no ControlNet, a bad file or type: refused now
        return params

    def upscaler_names(self) -> dict[str, Path]:
        return find_upscalers((*self.queue.generator.settings.upscalers, *self.upscalers))

    def upscaler(self, name: str | None) -> str:
        """Lanczos' name, or the model file of an upscaler known by `name`; never a path the client chose."""
        if name is None or name.strip().lower() == LANCZOS:
            return LANCZOS
        found = self.upscaler_names()
        if name not in found:
            known = ", ".join([LANCZOS, *found])
            raise ParamError("model", f"{name!r} is not an upscaler of this server; known: {known} "
                                      "(zstudio serve --upscaler FILE_OR_FOLDER adds models)")  # fmt: skip
        return str(found[name].resolve())

    def upscale(self, body: UpscaleRequest) -> dict[str, Any]:
        """Upscale an image given by name: the new image's name, URL, size and recipe (see `run_upscale`)."""
        source = self.inputs.resolve("image", body.image)
        result = self.run_upscale(source, body.image, body.scale, body.model, body.tile, body.refine)
        name = result.path.name
        return {"name": name, "url": f"/api/v1/images/{name}", "width": result.image.width,
                "height": result.image.height, "seconds": result.seconds, "recipe": result.metadata}  # fmt: skip

    def run_upscale(self, source: str, shown: str, scale: float, model: str | None = None, tile: int | None = None,
                    refine: float | None = None) -> UpscaleResult:  # fmt: skip
        """The door every upscale of the server goes through (HTTP, A1111, MCP, web UI): synchronous (the
        generator's lock keeps it off the device while a job runs), then recorded in the history as a done entry,
        so it is listed and deleted like a generation. `shown` is the source's name for the record, never a path.
        A refused upscale (ParamError, Unavailable) writes nothing and records nothing."""
        upscaler = self.upscaler(model)
        reason = self.queue.unavailable()
        if reason:
            raise Unavailable(reason)
        started = time.time()
        result = self.queue.generator.upscale(source, scale=scale, model=upscaler, tile=tile, refine=refine,
                                              output_dir=self.outputs)  # fmt: skip
        try:
            self.queue.history.add_done(uuid.uuid4().hex[:16], upscale_record(result.metadata, shown),
                                        [result.path.name], result.seconds, started, time.time())  # fmt: skip
        except (sqlite3.Error, OSError) as err:  # the file (its recipe inside) is made; say so rather than fail
            log.error("upscale %s: history entry not written: %s", result.path.name,
                      describe(err, self.queue.history.path.parent))  # fmt: skip
        return result

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


def file_names(value: Any) -> set[str]:
    """Every text in a recorded parameters value (nested too) as a file name: what it may name in the inputs."""
    if isinstance(value, str):
        return {Path(value).name}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return set().union(*(file_names(v) for v in items))


def upscale_record(recipe: dict[str, Any], shown: str) -> dict[str, Any]:
    """An upscale's history parameters (`protocol.UpscaleParams`) from its file's recipe; the prompt is the first
    one found down the chain of sources (an upscale of an upscale of a draft), else empty."""
    done = recipe["upscale"]
    prompt, record = "", recipe
    while isinstance(record, dict):
        params = record.get("params")
        if isinstance(params, dict) and isinstance(params.get("prompt"), str):
            prompt = params["prompt"]
            break
        record = (record.get("source") or {}).get("metadata")
    return {"kind": "upscale", "source": shown_name(shown), "source_sha256": recipe["source"]["sha256"],
            "scale": done["scale"], "upscaler": done["upscaler"]["name"], "tile": done["tile"],
            "refine": done["refine"], "width": done["width"], "height": done["height"], "prompt": prompt}  # fmt: skip


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
            "kind": "generation",
            "status": job.status,
            "params": shown_params(job.params.to_dict()),
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
        data["kind"] = "upscale" if data["params"].get("kind") == "upscale" else "generation"
        data["params"] = shown_params(data["params"])
        data["position"] = None
    data["images"] = [{"url": f"/api/v1/images/{name}", "seed": seed} for name, seed in output_seeds(data)]
    return data


def output_seeds(job: dict[str, Any]) -> list[tuple[str, int | None]]:
    """Each output with its seed; an upscale's outputs have none (None)."""
    seeds = job["seeds"] if job["seeds"] and len(job["seeds"]) == len(job["outputs"]) else [None] * len(job["outputs"])
    return list(zip(job["outputs"], seeds))


INPUT_FIELDS = ("image", "mask", "control")  # the pictures a generation may take, by upload or by name
UPLOAD_DOCS = {"image": "The picture to edit.", "mask": "White = repaint.", "control": "A ControlNet's control image."}


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """A job's parameters as a client sees them: input pictures by name, not by the server's path."""
    return {**params, **{k: shown_name(params[k]) for k in INPUT_FIELDS if params.get(k)}}


class MultipartRoute(APIRoute):
    """A route that takes only multipart/form-data bodies; other bodies fall through to the next route of the same
    path (the JSON one, which the schema documents)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match == Match.FULL and not is_multipart(scope):
            return Match.NONE, {}
        return match, child


def is_multipart(scope: Scope) -> bool:
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return value.split(b";")[0].strip().lower() == b"multipart/form-data"
    return False


def multipart_doc(model: type[BaseModel], files: dict[str, str], params_part: bool = True) -> dict[str, Any]:
    """`openapi_extra` documenting a multipart body: the files, and the other fields as form fields (or, with
    `params_part`, as one `params` part holding the JSON body)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")  # nested types: components
    properties = {name: {"type": "string", "format": "binary", "description": text} for name, text in files.items()}
    if params_part:
        properties["params"] = {"type": "string", "description": f"The JSON body ({model.__name__}) as one part; or "
                                "its fields as form fields"}  # fmt: skip
    properties.update({k: v for k, v in schema["properties"].items() if k not in files})
    return {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object",
                                                                           "properties": properties}}}}}  # fmt: skip


async def read_form(request: Request, store: InputStore, files: tuple[str, ...]) -> tuple[dict[str, str], dict]:
    """A multipart body's text fields and its uploads (kept by `store`, by name). Bytes past the store's cap are
    refused while they stream in (the gate has already refused a larger Content-Length)."""
    form = await request.form(max_files=len(files), max_fields=64)
    fields: dict[str, str] = {}
    uploads: dict[str, str] = {}
    try:
        for key, value in form.multi_items():
            if key in fields or key in uploads:
                raise ParamError(key, "was sent twice")
            if isinstance(value, UploadFile):
                if key not in files:
                    raise ParamError(key, f"is not a file field here; files go in {', '.join(files)}")
                uploads[key] = await run_in_threadpool(store.store_stream, key, value.file)
            else:
                fields[key] = value
    finally:
        await form.close()
    return fields, uploads


def form_body(model: type[BaseModel], fields: dict[str, str], uploads: dict[str, str]) -> BaseModel:
    """The request model from a multipart body: its fields in one `params` part of JSON, or one form field each
    (numbers and objects written as JSON), and the uploads' names. Errors as `ParamError`, naming the field."""
    if "params" in fields and "params" not in model.model_fields:
        others = sorted(set(fields) - {"params"})
        if others:
            raise ParamError(others[0], "give every field in the params part, or none there")
        try:
            data = json.loads(fields["params"])
        except ValueError as err:
            raise ParamError("params", f"is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise ParamError("params", "must be a JSON object")
    else:
        data = {key: value if is_text(model, key) else parsed(value) for key, value in fields.items()}
    for name in uploads:
        if name in data:
            raise ParamError(name, "give a name or upload a file, not both")
    return checked(model, {**data, **uploads})


def is_text(model: type[BaseModel], name: str) -> bool:
    annotation = model.model_fields[name].annotation if name in model.model_fields else str
    return annotation is str or str in get_args(annotation) or get_origin(annotation) is Literal


def parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # then the model names the field and what it expected


def checked(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise ParamError(field, first["msg"]) from None


def build_router(studio: Studio) -> APIRouter:
    router = APIRouter(default_response_class=SafeJSONResponse)
    queue = studio.queue

    def find(job_id: str) -> dict[str, Any]:
        job = queue.get(job_id)
        record = None if job else queue.history.get(job_id)
        if job is None and record is None:
            raise HTTPException(404, f"no job {printable(job_id)}")
        return job_view(studio, job, record)

    def accept(fields: dict[str, Any]) -> SafeJSONResponse:
        job = submit_or_refuse(queue, lambda: studio.edit_params(fields))
        if not isinstance(job, Job):
            return job
        return SafeJSONResponse(
            status_code=202, content={"id": job.id, "status": job.status, "position": queue.position(job.id)}
        )

    async def create_generation_from_form(request: Request):
        try:
            fields, uploads = await read_form(request, studio.inputs, INPUT_FIELDS)
            body = form_body(GenerationRequest, fields, uploads)
        except ParamError as err:
            return error_response(422, str(err), err.field)
        return await run_in_threadpool(accept, body.model_dump(exclude_unset=True))

    # Registered first: multipart bodies end here, every other body at the documented JSON route below.
    router.add_api_route("/api/v1/generations", create_generation_from_form, methods=["POST"],
                         route_class_override=MultipartRoute, include_in_schema=False)  # fmt: skip

    @router.post(
        "/api/v1/generations",
        status_code=202,
        tags=["generations"],
        responses=answers(Accepted, 202, e422=InvalidRequest, e429=ErrorBody, e503=ErrorBody),
        openapi_extra=multipart_doc(GenerationRequest, UPLOAD_DOCS),
    )
    def create_generation(body: GenerationRequest):
        """Validate and enqueue; answers 202 with the job id and queue position (429 when the line is full, 503 when
        jobs cannot run now, each with the reason). An edit names its `image` (and `mask`) in the outputs folder
        (`outputs_....png`) or uploads them as multipart/form-data (then the other fields go in a `params` part as
        JSON, or as form fields); a bad file is refused with 422 before the job is queued."""
        return accept(body.model_dump(exclude_unset=True))

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

    def upscale(body: UpscaleRequest):
        try:
            return studio.upscale(body)
        except ParamError as err:
            return error_response(422, str(err), err.field)
        except Unavailable as err:
            return unavailable_response(str(err))

    async def create_upscale_from_form(request: Request):
        try:
            fields, uploads = await read_form(request, studio.inputs, ("image",))
            body = form_body(UpscaleRequest, fields, uploads)
        except ParamError as err:
            return error_response(422, str(err), err.field)
        return await run_in_threadpool(upscale, body)

    router.add_api_route("/api/v1/upscales", create_upscale_from_form, methods=["POST"],
                         route_class_override=MultipartRoute, include_in_schema=False)  # fmt: skip

    @router.post("/api/v1/upscales", tags=["upscale"],
                 responses=answers(Upscaled, e422=InvalidRequest, e503=ErrorBody),
                 openapi_extra=multipart_doc(UpscaleRequest, {"image": "The picture to upscale."}))  # fmt: skip
    def create_upscale(body: UpscaleRequest):
        """Upscale an image from the outputs folder (by name) or an upload (multipart), synchronously, and answer
        with the new image's name, URL and recipe. Bounded by the upscaler's limits (results up to 8192 px a side
        and 64 MP); `model` is a name from GET /api/v1/upscalers, never a path."""
        return upscale(body)

    @router.get("/api/v1/loras", tags=["loras"], responses=answers(LoraList))
    def loras():
        """The LoRAs requests may name (the LoRA folder, rescanned now: --loras / ZSTUDIO_LORAS)."""
        files = studio.queue.generator.loras.folder.available()
        return {"loras": [{"name": f.name, "size_mb": round(f.size / 1e6, 2)} for f in files]}

    @router.get("/api/v1/upscalers", tags=["upscale"], responses=answers(UpscalerList))
    def upscalers():
        """The upscalers `model` may name: Lanczos (built in) and the model files of --upscaler/ZSTUDIO_UPSCALERS."""
        found = [{"name": name, "file": path.name} for name, path in studio.upscaler_names().items()]
        return {"upscalers": [{"name": LANCZOS, "file": None}, *found]}

    @router.post("/v1/images/generations", tags=["openai"], responses=answers(
        OpenAIImagesResponse, e400=OpenAIError, e422=InvalidRequest, e429=OpenAIError, e500=OpenAIError,
        e503=OpenAIError))  # fmt: skip
    async def openai_images(request: Request, body: OpenAIImageRequest):
        """OpenAI-compatible and synchronous: prompt, n, size "WxH", response_format b64_json|url, optional seed.
        If the client goes away before the images are ready, its job is cancelled."""
        return await openai_answer(request, lambda: openai_params(body), body.response_format)

    @router.post("/v1/images/edits", tags=["openai"], responses=answers(
        OpenAIImagesResponse, e400=OpenAIError, e429=OpenAIError, e500=OpenAIError, e503=OpenAIError),
        openapi_extra=multipart_doc(OpenAIEditRequest, {"image": "PNG, JPEG or WebP; transparent pixels are "
                                    "edited when no mask is given.", "mask": "A PNG of the image's size whose "
                                    "fully transparent pixels mark the area to edit."}, params_part=False))  # fmt: skip
    async def openai_edit(request: Request):
        """OpenAI-compatible image edit (multipart, as `client.images.edit` sends it): image, optional mask
        (transparent = edit), prompt, n, size, response_format; plus seed and strength."""
        try:
            if not is_multipart(request.scope):
                raise ParamError("image", "send multipart/form-data with the image as a file")
            fields, uploads = await read_form(request, studio.inputs, ("image", "image[]", "mask"))
            body = form_body(OpenAIEditRequest, fields, {})
        except ParamError as err:
            return openai_error(400, str(err), "invalid_request_error", err.field)
        return await openai_answer(request, lambda: openai_edit_params(studio, body, uploads), body.response_format)

    async def openai_answer(request: Request, make_params: Callable[[], GenerationParams], fmt: str | None):
        """Submit, wait, and answer as OpenAI's images API does (errors in its shape, naming its field)."""
        try:
            job = await run_in_threadpool(lambda: queue.submit(make_params()))
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
        data = []
        for name, seed in zip(job.outputs, job.seeds):
            if fmt == "url":
                data.append({"url": str(request.base_url).rstrip("/") + f"/api/v1/images/{name}", "seed": seed})
            else:
                raw = await run_in_threadpool((studio.outputs / name).read_bytes)
                data.append({"b64_json": base64.b64encode(raw).decode(), "seed": seed,
                             "revised_prompt": job.params.prompt})  # fmt: skip
        return SafeJSONResponse({"created": int(time.time()), "data": data})

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


def openai_edit_params(studio: Studio, body: OpenAIEditRequest, uploads: dict[str, str]) -> GenerationParams:
    """OpenAI's edit onto our parameters: the uploaded image, its mask turned from OpenAI's convention (transparent =
    edit) into ours (white = repaint), then the same checks as every edit."""
    images = [uploads[key] for key in ("image", "image[]") if key in uploads]
    if len(images) != 1:
        raise ParamError("image", "upload exactly one image file (PNG, JPEG or WebP)")
    width, height = resolve_size(body.size) if body.size else (None, None)
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or "",
        "width": width,
        "height": height,
        "num_images": body.n if body.n is not None else 1,
        "seed": body.seed if body.seed is not None else -1,
        "image": images[0],
        "strength": body.strength,
    }
    if "mask" in uploads:
        fields["mask"] = studio.inputs.alpha_mask("mask", uploads["mask"])
    return studio.edit_params(fields)


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
