"""MCP for AI agents: the studio's tools and recent images over the Model Context Protocol (the official SDK).

Tools are thin translations: `generate_image` takes the one parameters type's fields, builds `GenerationParams`
(whose one-line errors name the field) and runs it as a job of the queue (an edit names its `image` and `mask` in
the outputs folder, never by path); `upscale_image` upscales an image of the outputs folder; `list_history`,
`get_image` and `server_status` read what the HTTP API reads. Two backends answer them: `LocalStudio` (the queue of
this process, for `/mcp` on `zstudio serve` and for `zstudio mcp --model`) and `RemoteStudio` (a running server's
HTTP API, for `zstudio mcp --server URL`). Transports: streamable HTTP at `/mcp`, behind the same gate as every route
(`http_route`), and stdio (`serve_stdio`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import mimetypes
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, ImageContent, TextContent
from pydantic import Field, TypeAdapter, WithJsonSchema
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

from .. import __version__
from ..params import GenerationParams, ParamError, printable
from .api import IMAGE_NAME, Studio, job_view, output_seeds, status
from .history import PAGE_BYTES
from .jobs import QueueFull, Unavailable
from .protocol import GenerationRequest, UpscaleRequest

log = logging.getLogger(__name__)
MCP_PATH = "/mcp"
IMAGE_URI = "zstudio://images/{name}"
RECENT_URI = "zstudio://images"
RECENT_COUNT = 20
POLL_S = 0.2
INSTRUCTIONS = (
    "zstudio draws images with Z-Image-Turbo on this machine. Call generate_image with a prompt (Chinese or English); "
    "leave size and steps unset for the model's defaults. Images are saved with their parameters; list_history and "
    "get_image find earlier ones."
)


class StudioError(Exception):
    """A request the studio turned down or could not do; the message is one line for the agent."""


def image_uri(name: str) -> str:
    return IMAGE_URI.format(name=name)


def mime_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class LocalStudio:
    """The studio of this process: jobs go into its queue, images come from its outputs folder."""

    def __init__(self, studio: Studio):
        self.studio = studio

    async def generate(self, params: GenerationParams) -> dict[str, Any]:
        queue = self.studio.queue
        params = await run_in_threadpool(self.studio.edit_params, params.to_dict())  # names to files, checked
        try:
            job = await run_in_threadpool(queue.submit, params)
        except (QueueFull, Unavailable) as err:
            raise StudioError(str(err)) from None
        try:
            while not job.finished:
                await queue.wait_async(job, job.version, POLL_S * 5)
        finally:
            if not job.finished:  # the agent cancelled the call or went away: so does its job
                queue.cancel(job.id)
        return job_view(self.studio, job)

    async def upscale(self, body: UpscaleRequest) -> dict[str, Any]:
        try:
            return await run_in_threadpool(self.studio.upscale, body)
        except Unavailable as err:
            raise StudioError(str(err)) from None

    async def history(self, limit: int, offset: int) -> dict[str, Any]:
        queue = self.studio.queue
        records = await run_in_threadpool(queue.history.page, limit, offset, PAGE_BYTES)
        total = await run_in_threadpool(queue.history.count)
        return {"total": total, "items": [job_view(self.studio, None, r) for r in records]}

    async def image(self, name: str) -> bytes:
        path = self.studio.outputs / name
        if not IMAGE_NAME.match(name) or not path.is_file():
            raise StudioError(f"name: no image {printable(name)!r} in the outputs folder (list_history shows them)")
        return await run_in_threadpool(path.read_bytes)

    def where(self, name: str) -> str:
        return str(self.studio.outputs / name)

    async def status(self) -> dict[str, Any]:
        return await run_in_threadpool(status, self.studio)


class RemoteStudio:
    """A running `zstudio serve`, through its HTTP API (/api/v1)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise StudioError(f"server: cannot reach {self.url} ({type(err).__name__}: {err})") from None
        if response.status_code >= 400 and not path.endswith("/health"):
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise StudioError(message if isinstance(message, str) else json.dumps(message))
        return response

    async def generate(self, params: GenerationParams) -> dict[str, Any]:
        body = {k: v for k, v in params.to_dict().items() if v is not None}
        job_id = (await self._call("POST", "/api/v1/generations", json=body)).json()["id"]
        job: dict[str, Any] = {"status": "queued"}
        try:
            while job["status"] not in ("done", "failed", "cancelled"):
                await asyncio.sleep(POLL_S)
                job = (await self._call("GET", f"/api/v1/generations/{job_id}")).json()
        finally:
            if job["status"] not in ("done", "failed", "cancelled"):
                with anyio.CancelScope(shield=True), contextlib.suppress(httpx.HTTPError):
                    await self.client.delete(f"/api/v1/generations/{job_id}")
        return job

    async def upscale(self, body: UpscaleRequest) -> dict[str, Any]:
        return (await self._call("POST", "/api/v1/upscales", json=body.model_dump(exclude_none=True))).json()

    async def history(self, limit: int, offset: int) -> dict[str, Any]:
        return (await self._call("GET", "/api/v1/history", params={"limit": limit, "offset": offset})).json()

    async def image(self, name: str) -> bytes:
        if not IMAGE_NAME.match(name):
            raise StudioError(f"name: {printable(name)!r} is not an image name (list_history shows them)")
        try:
            return (await self._call("GET", f"/api/v1/images/{name}")).content
        except StudioError as err:
            raise StudioError(f"name: no image {name!r} on {self.url} ({err})") from None

    def where(self, name: str) -> str:
        return f"{self.url}/api/v1/images/{name}"

    async def status(self) -> dict[str, Any]:
        return (await self._call("GET", "/api/v1/health")).json()

    async def aclose(self) -> None:
        await self.client.aclose()


def failure(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=printable(message))], is_error=True)


def image_content(name: str, data: bytes) -> ImageContent:
    return ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=mime_type(name))


def summary(job: dict[str, Any]) -> dict[str, Any]:
    """A history entry as an agent reads it: what was asked (an upscale: of what, how), and where each image is."""
    p = job["params"]
    entry = {
        "id": job["id"],
        "kind": job.get("kind", "generation"),
        "status": job["status"],
        "prompt": p.get("prompt"),
        "size": f"{p.get('width')}x{p.get('height')}",
        "steps": p.get("num_inference_steps"),
        "images": [{"name": name, "seed": seed, "uri": image_uri(name)} for name, seed in output_seeds(job)],
        "error": job.get("error"),
    }
    if entry["kind"] == "upscale":
        entry.update({k: p.get(k) for k in ("source", "scale", "upscaler", "refine")})
    return entry


def generation_signature() -> inspect.Signature:
    """`generate_image`'s arguments: the parameters type's fields, with the types, ranges and descriptions the HTTP
    API documents (`GenerationRequest`). The schema describes them; `GenerationParams` checks them, once, so a bad
    value of any kind is its one-line error naming the field."""
    fields = []
    for name, info in GenerationRequest.model_fields.items():
        schema = {**inline_refs(TypeAdapter(info.annotation).json_schema()), **(info.json_schema_extra or {})}
        if info.description:
            schema["description"] = info.description
        default = inspect.Parameter.empty if info.is_required() else info.default
        annotation = Annotated[Any, WithJsonSchema(schema)]
        fields.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return inspect.Signature(fields, return_annotation=CallToolResult)


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema with its `$defs` written in place: a tool parameter's schema stands alone (`loras`' item type)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node

    return resolve(schema)


def build_mcp_server(backend: LocalStudio | RemoteStudio) -> MCPServer:
    """The MCP server: five tools and the recent images as resources, answered by `backend`."""
    server = MCPServer("zstudio", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")

    async def generate_image(**arguments: Any) -> CallToolResult:
        """Draw images from a prompt and save them (parameters embedded in each file). Unset fields take the model's
        defaults. To edit an earlier image, give its name as `image` (and a mask's name as `mask`, white = repaint)
        with a `strength`. Returns each image, plus one line per image with its name, where it is saved and the
        seed used."""
        try:
            params = GenerationParams.from_dict(arguments)
            job = await backend.generate(params)
        except (ParamError, StudioError) as err:
            return failure(str(err))
        if job["status"] != "done":
            return failure(f"the job {job['status']}: {job.get('error') or 'no images were made'}")
        used = job["params"]
        lines, images = [], []
        for name, seed in zip(job["outputs"], job["seeds"]):
            data = await backend.image(name)
            images.append(image_content(name, data))
            lines.append(f"{name}\t{backend.where(name)}\tseed={seed}\t{image_uri(name)}")
        lines.append(
            f"{used['width']}x{used['height']}, {used['num_inference_steps']} steps, cfg {used['cfg_scale']}, "
            f"{job['seconds']:.2f} s"
        )
        text = TextContent(type="text", text="\n".join(lines))
        structured = {"job": summary(job), "params": used, "seconds": job["seconds"]}
        return CallToolResult(content=[text, *images], structured_content=structured)

    generate_image.__signature__ = generation_signature()  # type: ignore[attr-defined]
    server.add_tool(generate_image, name="generate_image", structured_output=False)

    @server.tool()
    async def upscale_image(
        name: Annotated[str, Field(description="An image's file name, as list_history or generate_image give it.")],
        scale: Annotated[float, Field(description="1.5, 2, 3 or 4.")] = 2.0,
        model: Annotated[str | None, Field(description="An upscaler's name; default lanczos.")] = None,
    ) -> CallToolResult:
        """Make a larger copy of a generated image and save it (its recipe inside); returns its name and the image."""
        try:
            done = await backend.upscale(UpscaleRequest(image=name, scale=float(scale), model=model))
            data = await backend.image(done["name"])
        except (ParamError, StudioError) as err:
            return failure(str(err))
        text = f"{done['name']}\t{backend.where(done['name'])}\t{done['width']}x{done['height']}"
        return CallToolResult(content=[TextContent(type="text", text=text), image_content(done["name"], data)])

    @server.tool()
    async def list_history(
        limit: Annotated[int, Field(ge=1, le=200, description="Entries to return, newest first.")] = 10,
        offset: Annotated[int, Field(ge=0, description="Entries to skip (for the next page).")] = 0,
    ) -> str:
        """Earlier generations and upscales, newest first: kind, prompt, size, status and each image's name, seed
        (none for an upscale, which names its source) and resource URI."""
        try:
            page = await backend.history(limit, offset)
        except StudioError as err:
            raise ToolError(str(err)) from None
        return json.dumps({"total": page["total"], "items": [summary(j) for j in page["items"]]}, ensure_ascii=False)

    @server.tool()
    async def get_image(
        name: Annotated[str, Field(description="An image's file name, as list_history or generate_image give it.")],
    ) -> CallToolResult:
        """One generated image by its file name, with where it is saved."""
        try:
            data = await backend.image(name)
        except StudioError as err:
            return failure(str(err))
        return CallToolResult(content=[TextContent(type="text", text=backend.where(name)), image_content(name, data)])

    @server.tool()
    async def server_status() -> str:
        """Whether jobs are accepted now (or why not), the model, device, speed and memory modes, and the queue."""
        try:
            return json.dumps(await backend.status(), ensure_ascii=False)
        except StudioError as err:
            raise ToolError(str(err)) from None

    @server.resource(RECENT_URI, name="recent_images", mime_type="application/json")
    async def recent_images() -> str:
        """The most recent images: name, prompt, seed and resource URI of each."""
        try:
            page = await backend.history(RECENT_COUNT, 0)
        except StudioError as err:
            raise ResourceError(str(err)) from None
        images = [
            {**image, "prompt": entry["prompt"], "size": entry["size"]}
            for entry in map(summary, page["items"])
            for image in entry["images"]
        ]
        return json.dumps(images, ensure_ascii=False)

    @server.resource(IMAGE_URI, name="image", mime_type="image/png")
    async def image(name: str) -> bytes:
        """A generated image by file name (PNG unless it was made as JPEG or WebP)."""
        try:
            return await backend.image(name)
        except StudioError as err:
            raise ResourceError(str(err)) from None

    return server


def http_route(server: MCPServer) -> BaseRoute:
    """The streamable HTTP endpoint as one route at /mcp. Host, Origin and the token are checked by the studio's own
    gate in front of every route, so the SDK's duplicate Host check (loopback names only) is off."""
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    (route,) = [r for r in app.routes if getattr(r, "path", None) == MCP_PATH]
    return route


def serve_stdio(
    server_url: str | None = None,
    token: str | None = None,
    model: str | None = None,
    outputs: str | Path | None = None,
    state: str | Path | None = None,
    device: str | None = None,
    speed: str | None = None,
    memory: str | None = None,
) -> None:
    """MCP over stdin/stdout until the agent closes it: forwarding to `server_url`, or with the engine loaded here."""
    if server_url:
        anyio.run(_forward_stdio, server_url, token)
        return
    from ..engine import Generator
    from ..settings import load_settings
    from .app import check_writable, create_app

    settings = load_settings()
    folder = Path(outputs) if outputs is not None else settings.outputs
    check_writable(folder, "outputs")
    generator = Generator(model=model, outputs=folder, device=device, speed=speed, memory=memory, settings=settings)
    generator.load()
    app = create_app(generator, ui=False, state=Path(state) if state else None)

    async def run() -> None:
        async with app.router.lifespan_context(app):  # the queue's worker and writer, as under `zstudio serve`
            await app.state.mcp.run_stdio_async()

    anyio.run(run)


async def _forward_stdio(server_url: str, token: str | None) -> None:
    backend = RemoteStudio(server_url, token)
    try:
        await build_mcp_server(backend).run_stdio_async()
    finally:
        await backend.aclose()
