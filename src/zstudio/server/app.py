"""The studio process: one resident generator, one GPU worker, the HTTP API and the web UI on one port."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline

from .. import __version__
from ..engine import Generator
from ..parallel import parse_parallel, start_ulysses
from ..params import DEFAULT_MAX_MEGAPIXEL_STEPS, MAX_INPUT_BYTES, ParamError
from ..settings import load_settings
from .a1111 import build_a1111_router
from .api import SafeJSONResponse, Studio, add_error_handlers, build_router
from .guard import MIN_TOKEN_LENGTH, UPLOAD_LIMIT_BYTES, AccessGuard, HostPolicy, input_body_limit, is_loopback
from .history import DB_NAME, History, state_folder
from .jobs import DEFAULT_KEEP_FINISHED_S, DEFAULT_MAX_WAITING, JobQueue, Runner
from .mcp import LocalStudio, build_mcp_server, http_route

log = logging.getLogger(__name__)
DOCS_ASSETS = "/docs-assets"

__all__ = ["create_app", "serve", "is_loopback", "check_writable"]


def check_token(token: str | None) -> None:
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ParamError(
            "token",
            f"is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
            "(python -c 'import secrets; print(secrets.token_urlsafe(24))' makes one)",
        )


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove a file can be written there; else one line naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".zstudio-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ParamError(what, f"cannot write to {folder}: {err.strerror or err}") from None


def create_app(
    generator: Generator,
    outputs: Path | None = None,
    token: str | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    ui: bool = True,
    state: Path | None = None,
    hosts: HostPolicy | None = None,
    max_megapixel_steps: float = DEFAULT_MAX_MEGAPIXEL_STEPS,
    keep_finished_s: float = DEFAULT_KEEP_FINISHED_S,
    max_input_bytes: int = MAX_INPUT_BYTES,
    upscalers: tuple[str, ...] = (),
    upload_ttl_hours: float | None = None,
    upload_max_mb: float | None = None,
    runner: Runner | None = None,
) -> FastAPI:
    """The whole server as one ASGI app. `state` holds the history database and uploaded pictures (default: a
    folder per outputs folder under ZSTUDIO_STATE); `hosts` the Host names it answers to (default: loopback names
    only); `max_input_bytes` caps each uploaded picture; `upscalers` are model files or folders that upscale
    requests may name (besides ZSTUDIO_UPSCALERS); `upload_ttl_hours` and `upload_max_mb` bound the uploads that no
    history entry or job names (default: ZSTUDIO_UPLOAD_TTL, ZSTUDIO_UPLOAD_MAX_MB; see `server.inputs`); `runner`
    generates the jobs (default: `generator` itself; with `zstudio.server.replicas.RayRunner`, Ray Serve replicas
    while `generator` only validates and saves)."""
    check_token(token)
    outputs = Path(outputs) if outputs is not None else generator.outputs
    generator.outputs = outputs
    state = Path(state) if state is not None else state_folder(generator.settings.state_dir, outputs)
    check_writable(outputs, "outputs")
    check_writable(state, "state")
    history = History(state / DB_NAME, legacy=outputs / DB_NAME)
    queue = JobQueue(generator, history, outputs=outputs, max_waiting=max_waiting, runner=runner,
                     max_megapixel_steps=max_megapixel_steps, keep_finished_s=keep_finished_s)  # fmt: skip
    generator.named_input_folders |= {outputs.resolve(), (state / "inputs").resolve()}
    generator.loras.folder.folder_only = True  # clients name LoRAs of the folder, not server files or hub repos
    ttl = upload_ttl_hours if upload_ttl_hours is not None else generator.settings.upload_ttl_hours
    cap = upload_max_mb if upload_max_mb is not None else generator.settings.upload_max_mb
    studio = Studio(queue, outputs, inputs=state / "inputs", max_input_bytes=max_input_bytes, upscalers=upscalers,
                    upload_max_age_s=ttl * 3600, upload_max_total_bytes=int(cap * 2**20))  # fmt: skip
    mcp_server = build_mcp_server(LocalStudio(studio))
    mcp_route = http_route(mcp_server)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        studio.inputs.collect()  # at start; then after uploads (InputStore.collect_due)
        queue.start()
        try:
            async with mcp_server.session_manager.run():  # MCP sessions end before the queue stops
                yield
        finally:
            queue.stop()
            history.close()

    app = FastAPIOffline(  # /docs and /redoc load their scripts from the installed package, not a CDN
        title="zstudio",
        static_url=DOCS_ASSETS,
        version=__version__,
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        description="Local Z-Image-Turbo studio: native API under /api/v1, OpenAI-compatible /v1/images, MCP at /mcp. "
        "With a token set, send `Authorization: Bearer TOKEN`.",
    )
    app.state.studio = studio
    app.state.mcp = mcp_server
    add_error_handlers(app)
    app.include_router(build_a1111_router(studio))  # the AUTOMATIC1111 WebUI's API, for the tools that speak it
    app.include_router(build_router(studio))
    app.router.routes.append(mcp_route)  # streamable HTTP for AI agents, behind the same gate as every route
    if ui:
        import gradio as gr

        from .i18n import I18N
        from .ui import build_ui

        blocks = studio.blocks = build_ui(studio)
        studio.cache_dirs.append(Path(blocks.GRADIO_CACHE).resolve())
        app = gr.mount_gradio_app(
            app,
            blocks,
            path="/ui",
            allowed_paths=[str(outputs)],
            blocked_paths=[str(state)],
            max_file_size=UPLOAD_LIMIT_BYTES,
            i18n=I18N,
        )

        @app.get("/", include_in_schema=False)
        def root():
            return RedirectResponse("/ui/")

    app.add_middleware(
        AccessGuard,
        hosts=hosts or HostPolicy.for_bind("127.0.0.1"),
        token=token,
        file_roots=lambda: [studio.outputs, *studio.cache_dirs],
        input_limit=input_body_limit(max_input_bytes),
        upload_roots=lambda: studio.cache_dirs,
    )
    return app


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    model: str | None = None,
    outputs: str | Path | None = None,
    token: str | None = None,
    device: str | None = None,
    speed: str | None = None,
    memory: str | None = None,
    warmup: bool = True,
    state: str | Path | None = None,
    allowed_hosts: tuple[str, ...] = (),
    max_megapixel_steps: float | None = None,
    ui: bool = True,
    upscalers: tuple[str, ...] = (),
    max_input_bytes: int = MAX_INPUT_BYTES,
    ray: bool = False,
    replicas: int | None = None,
    gpus_per_replica: float = 1.0,
    ray_address: str | None = None,
    parallel: str | None = None,
) -> None:
    """Load the model, warm it up, then serve until interrupted.

    `ray`: the engines run as Ray Serve replicas (`replicas`, `gpus_per_replica`, `ray_address`: see
    zstudio.server.replicas) and this process keeps the API, queue and history. `parallel` ("ulysses:N"): one engine
    split over N GPUs of this host (zstudio.parallel)."""
    import uvicorn

    if not is_loopback(host) and not token:
        raise ParamError("token", f"binding to {host} exposes the studio to the network; set --token or ZSTUDIO_TOKEN")
    check_token(token)
    degree = parse_parallel(parallel)
    if ray and degree > 1:
        raise ParamError("parallel", "splits one engine over GPUs; with --ray each replica is one engine: use one")
    settings = load_settings()
    folder = Path(outputs) if outputs is not None else settings.outputs
    check_writable(folder, "outputs")  # before minutes of loading, and in one line
    runner = None
    if ray:
        from .replicas import ReplicaSpec, start_replicas

        # Here the generator only validates and saves (on the CPU); the replicas load the weights.
        generator = Generator(model=model, outputs=folder, device="cpu", speed="eager", memory="resident",
                              settings=settings)  # fmt: skip
        spec = ReplicaSpec(model=model, speed=speed, memory=memory, warmup=warmup, device=device)
        runner = start_replicas(spec, replicas=replicas, gpus_per_replica=gpus_per_replica, address=ray_address)
    else:
        generator = Generator(model=model, outputs=folder, device=device, speed=speed, memory=memory,
                              settings=settings)  # fmt: skip
        if degree > 1:
            start_ulysses(generator, degree)
        generator.load()
    if warmup and not ray:
        log.warning("warming up (one generation at the model's size; compiled speed modes compile now)")
        generator.warmup()
    info = generator.info()
    app = create_app(
        generator,
        token=token,
        state=Path(state) if state else None,
        hosts=HostPolicy.for_bind(host, allowed_hosts),
        max_megapixel_steps=max_megapixel_steps or settings.max_megapixel_steps,
        ui=ui,
        max_input_bytes=max_input_bytes,
        upscalers=tuple(upscalers),
        runner=runner,
    )
    log.warning(
        "zstudio %s: http://%s:%d  model %s  device %s (%s, speed %s)  memory mode %s",
        __version__,
        host,
        port,
        info["model"],
        info["device"],
        info["dtype"],
        info["speed"],
        info["memory_mode"],
    )
    if info["embedded_default"]:
        log.warning(
            "the real weights are not available: serving the %s, not Z-Image; run `zstudio download` or pass --model",
            info["model"],
        )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        if runner is not None:
            runner.stop()
