"""Every route of the running app (API, /v1, /docs, /metrics, /ui and all of Gradio's internals) against every kind of
caller: no token, a wrong one, the right one, the browser cookie, a foreign Host (DNS rebinding), a foreign Origin
(another web page). Plus what Gradio's file route may serve, and uploads."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import httpx
import pytest

from helpers import QUICK_JOB, TOKEN, Running, wait_done
from zstudio.engine import Generator
from zstudio.server.app import create_app
from zstudio.server.guard import REFUSED_HEADER, TOKEN_COOKIE, session_value


@pytest.fixture(scope="module")
def gen(tiny_dir):
    return Generator(model=str(tiny_dir), device="cpu").load()


def all_routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path template) for every route, through included routers and mounted apps."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router
            context = getattr(route, "include_context", None)
            found += all_routes(route.original_router.routes, prefix + (getattr(context, "prefix", "") or ""))
        elif hasattr(route, "routes") and getattr(route, "path", None) is not None:  # a mounted app
            found += all_routes(route.routes, prefix + route.path)
        else:
            for method in sorted(getattr(route, "methods", None) or ["GET"]):
                found.append((method, prefix + route.path))
    return sorted(set(found))


def concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", template)


def gate(client: httpx.Client, method: str, url: str, **kwargs) -> tuple[int, str | None]:
    """(status, the gate's check that refused it or None when let through to the route). Only the status line is
    read: some of Gradio's routes are endless event streams."""
    try:
        with client.stream(method, url, **kwargs) as response:
            return response.status_code, response.headers.get(REFUSED_HEADER)
    except httpx.ReadTimeout:
        return 0, None  # let in and still waiting


@pytest.fixture(scope="module")
def served_with_token(gen, tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    runner = Running(create_app(gen, root / "outputs", token=TOKEN, state=root / "state"))
    client = runner.__enter__()
    yield runner, client, root
    runner.__exit__(None, None, None)


def test_every_route_against_every_credential(served_with_token):
    runner, client, _ = served_with_token
    routes = all_routes(runner.app.routes)
    paths = {path for _, path in routes}
    assert {"/api/v1/generations", "/v1/images/generations", "/docs", "/openapi.json", "/metrics", "/ui/"} <= paths
    assert "/mcp" in paths  # MCP's streamable HTTP endpoint is one of the routes the gate must cover
    assert any(p.startswith("/ui/gradio_api/") for p in paths) and any("file=" in p for p in paths)
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/options", "/sdapi/v1/progress", "/sdapi/v1/interrupt"} <= paths
    host = f"127.0.0.1:{runner.port}"
    origin = f"http://{host}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    cookie = {"Cookie": f"{TOKEN_COOKIE}={session_value(TOKEN)}"}
    callers = {  # headers, and the refusal expected from the gate (None: let through)
        "no token": ({}, (401, "token")),
        "wrong token": ({"Authorization": "Bearer " + "x" * 30}, (401, "token")),
        "raw token in the cookie": ({"Cookie": f"{TOKEN_COOKIE}={TOKEN}"}, (401, "token")),
        "token, foreign Host": ({**bearer, "Host": "evil.example:80"}, (400, "host")),
        "cookie, foreign Host": ({**cookie, "Host": "rebound.example"}, (400, "host")),
        "cookie, foreign Origin": ({**cookie, "Origin": "http://evil.example"}, (403, "origin")),
        "cookie, other local Origin": ({**cookie, "Origin": "http://localhost:3000"}, (403, "origin")),
        "cookie, Origin null": ({**cookie, "Origin": "null"}, (403, "origin")),
        "token": (bearer, None),
        "token, foreign Origin": ({**bearer, "Origin": "http://evil.example"}, None),
        "cookie, same Origin": ({**cookie, "Origin": origin}, None),
    }
    checked, wrong = collections.Counter(), []
    with httpx.Client(base_url=str(client.base_url), timeout=3) as probe:
        for method, template in routes:
            url = concrete(template)
            for name, (headers, expected) in callers.items():
                status, check = gate(probe, method, url, headers=headers)
                checked[name] += 1
                if expected is None and (check not in (None, "file") or status >= 500):  # "x" is no image
                    wrong.append(f"{method} {url} [{name}]: {status} {check}")
                if expected is not None and (status, check) != expected:
                    wrong.append(f"{method} {url} [{name}]: {status} {check}, expected {expected}")
    print(f"{len(routes)} routes x {len(callers)} callers = {sum(checked.values())} requests")
    assert wrong == [], "\n".join(wrong)


def test_token_in_the_query_sets_a_hashed_cookie(served_with_token):
    _, client, _ = served_with_token
    r = client.get("/ui/", params={"token": TOKEN})
    assert r.status_code == 200
    set_cookie = r.headers["set-cookie"]
    assert f"{TOKEN_COOKIE}={session_value(TOKEN)}" in set_cookie and TOKEN not in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Secure" not in set_cookie  # plain HTTP
    with httpx.Client(base_url=str(client.base_url), cookies={TOKEN_COOKIE: session_value(TOKEN)}) as browser:
        assert browser.get("/api/v1/health").status_code == 200


def test_the_cookie_is_secure_over_tls(gen, tmp_path):
    from starlette.testclient import TestClient

    app = create_app(gen, tmp_path / "outputs", token=TOKEN, state=tmp_path / "state", ui=False)
    with TestClient(app, base_url="https://127.0.0.1") as client:
        set_cookie = client.get("/metrics", params={"token": TOKEN}).headers["set-cookie"]
    assert "Secure" in set_cookie and TOKEN not in set_cookie


def test_gradio_serves_only_images(served_with_token):
    runner, client, root = served_with_token
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    job = client.post("/api/v1/generations", json=QUICK_JOB, headers=bearer).json()
    done = wait_done(client, job["id"], headers=bearer)
    image = root / "outputs" / done["outputs"][0]
    (root / "outputs" / "notes.txt").write_text("not an image")
    database = root / "state" / "history.sqlite3"
    for prefix in ("/ui/gradio_api/file=", "/ui/gradio_api/file/"):
        assert client.get(f"{prefix}{image}", headers=bearer).status_code == 200, prefix
        for other in (
            database,
            f"{database}-wal",
            root / "outputs" / "notes.txt",
            "/etc/passwd",
            f"{root}/outputs/../state/history.sqlite3",
            "http://example.com/outputs_20260101000000.png",
        ):
            assert client.get(f"{prefix}{other}", headers=bearer).status_code == 404, (prefix, other)


def test_deleting_an_entry_deletes_the_ui_copies(served_with_token):
    runner, client, root = served_with_token
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    job = client.post("/api/v1/generations", json=QUICK_JOB, headers=bearer).json()
    done = wait_done(client, job["id"], headers=bearer)
    studio = runner.app.state.studio
    blocks = runner.app.state.studio.blocks
    cached = blocks.move_resource_to_block_cache(str(studio.outputs / done["outputs"][0]))  # what the gallery does
    assert client.get(f"/ui/gradio_api/file={cached}", headers=bearer).status_code == 200
    assert client.delete(f"/api/v1/history/{job['id']}", headers=bearer).status_code == 200
    assert client.get(f"/ui/gradio_api/file={cached}", headers=bearer).status_code in (403, 404)
    assert not Path(cached).exists()


def test_an_uploaded_picture_is_shown_back_and_nothing_else_uploaded_is(served_with_token):
    """An image box shows what the browser uploaded from Gradio's upload cache: a real PNG, JPEG or WebP comes back;
    a file named .png that is not one, or any other upload, is refused like every other path."""
    import io

    from PIL import Image

    runner, client, _ = served_with_token
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, format="PNG")
    uploads = {
        "photo.png": png.getvalue(),
        "fake.png": b"<html><script>alert(1)</script></html>",
        "notes.txt": b"\x89PNG\r\n\x1a\n not a picture",
    }
    paths = {}
    for name, data in uploads.items():
        answer = client.post("/ui/gradio_api/upload", files={"files": (name, data, "image/png")}, headers=bearer)
        assert answer.status_code == 200, name
        paths[name] = answer.json()[0]
    shown = client.get(f"/ui/gradio_api/file={paths['photo.png']}", headers=bearer)
    assert shown.status_code == 200 and shown.content == png.getvalue()
    for name in ("fake.png", "notes.txt"):
        assert client.get(f"/ui/gradio_api/file={paths[name]}", headers=bearer).status_code == 404, name
    with httpx.Client(base_url=client.base_url) as stranger:  # no token, no session cookie
        assert stranger.get(f"/ui/gradio_api/file={paths['photo.png']}").status_code == 401


def test_uploads_are_capped_and_same_origin_only(served_with_token):
    runner, client, _ = served_with_token
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    cookie = {"Cookie": f"{TOKEN_COOKIE}={session_value(TOKEN)}"}
    small = {"files": ("a.png", b"\x89PNG" + b"\0" * 100, "image/png")}
    assert client.post("/ui/gradio_api/upload", files=small, headers=bearer).status_code == 200
    cross = client.post("/ui/gradio_api/upload", files=small, headers={**cookie, "Origin": "http://evil.example"})
    assert cross.status_code == 403
    site = client.post("/ui/gradio_api/upload", files=small, headers={**cookie, "Sec-Fetch-Site": "cross-site"})
    assert site.status_code == 403
    big = {"files": ("big.png", b"\0" * (21 * 2**20), "image/png")}
    assert client.post("/ui/gradio_api/upload", files=big, headers=bearer).status_code == 413


def test_loopback_without_a_token_still_checks_host_and_origin(gen, tmp_path):
    runner = Running(create_app(gen, tmp_path / "outputs", state=tmp_path / "state"))
    with runner as client:
        routes = all_routes(runner.app.routes)
        wrong = []
        with httpx.Client(base_url=str(client.base_url), timeout=3) as probe:
            for method, template in routes:
                url = concrete(template)
                if gate(probe, method, url, headers={"Host": "attacker.example"}) != (400, "host"):
                    wrong.append(f"{method} {url} foreign Host")
                if gate(probe, method, url, headers={"Origin": "http://attacker.example"}) != (403, "origin"):
                    wrong.append(f"{method} {url} foreign Origin")
                status, check = gate(probe, method, url, headers={"Host": f"localhost:{runner.port}"})
                if check not in (None, "file") or status >= 500:
                    wrong.append(f"{method} {url} localhost: {status} {check}")
        assert wrong == [], "\n".join(wrong)
        form = client.post("/api/v1/generations", json=QUICK_JOB, headers={"Sec-Fetch-Site": "cross-site"})
        assert form.status_code == 403


def test_tokens_must_be_long_enough(gen, tmp_path):
    from zstudio.params import ParamError

    with pytest.raises(ParamError, match="token: is 1 characters; use at least 16"):
        create_app(gen, tmp_path / "outputs", token="x", state=tmp_path / "state")
