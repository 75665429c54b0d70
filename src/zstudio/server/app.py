"""The studio process: one resident generator, one GPU worker, the HTTP API and the web UI on one port."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from .. import __version__
from ..engine import Generator
from .api import Studio, build_router
from .history import History
from .jobs import DEFAULT_MAX_WAITING, JobQueue

log = logging.getLogger(__name__)
TOKEN_COOKIE = "zstudio_token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    generator: Generator,
    outputs: Path | None = None,
    token: str | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    ui: bool = True,
) -> FastAPI:
    outputs = Path(outputs) if outputs is not None else generator.outputs
    generator.outputs = outputs
    history = History(outputs)
    queue = JobQueue(generator, history, max_waiting=max_waiting)
    studio = Studio(queue, outputs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        try:
            yield
        finally:
            queue.stop()
            history.close()

    app = FastAPI(
        title="zstudio",
        version=__version__,
        lifespan=lifespan,
        description="Local Z-Image-Turbo studio: native API under /api/v1, OpenAI-compatible /v1/images.",
    )
    app.state.studio = studio

    if token:

        @app.middleware("http")
        async def require_token(request: Request, call_next):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.cookies.get(TOKEN_COOKIE, "") or request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse(
                    status_code=401,
                    content={
                        "error": "a valid API token is required "
                        "(Authorization: Bearer TOKEN, or ?token=TOKEN in the browser)"
                    },
                )
            response = await call_next(request)
            if request.query_params.get("token"):
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response

    app.include_router(build_router(studio))
    if ui:
        import gradio as gr

        from .ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(studio), path="/ui", allowed_paths=[str(outputs)])

        @app.get("/", include_in_schema=False)
        def root():
            return RedirectResponse("/ui/")

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
) -> None:
    """Load the model, warm it up, then serve until interrupted."""
    import uvicorn

    if not is_loopback(host) and not token:
        from ..params import ParamError

        raise ParamError("token", f"binding to {host} exposes the studio to the network; set --token or ZSTUDIO_TOKEN")
    generator = Generator(model=model, outputs=outputs, device=device, speed=speed, memory=memory)
    generator.load()
    if warmup:
        log.warning("warming up (one generation at the model's size; compiled speed modes compile now)")
        generator.warmup()
    info = generator.info()
    app = create_app(generator, token=token)
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
    uvicorn.run(app, host=host, port=port, log_level="warning")
