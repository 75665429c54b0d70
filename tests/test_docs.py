"""The API reference (/docs, /redoc) works offline: its scripts and styles come from the installed package."""

from __future__ import annotations

import re

import pytest

from helpers import CHROMIUM, FLAGS, TOKEN, Running
from zstudio.server.app import create_app

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.fixture(scope="module")
def docs_server(generator, tmp_path_factory):
    runner = Running(create_app(generator, tmp_path_factory.mktemp("docs-outputs"), ui=False))
    client = runner.__enter__()
    yield client
    runner.__exit__(None, None, None)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_reference_pages_name_no_other_host_and_their_assets_load(docs_server, page):
    html = docs_server.get(page).text
    assert "://" not in html.replace("http://www.w3.org", ""), "the page names another host (a CDN?)"
    assets = ASSET.findall(html)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        r = docs_server.get(asset)
        assert r.status_code == 200 and len(r.content) > 0, asset


def test_reference_stays_behind_the_token(generator, tmp_path):
    with Running(create_app(generator, tmp_path, ui=False, token=TOKEN)) as client:
        assert client.get("/docs").status_code == 401
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 401
        assert client.get("/docs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_swagger_and_redoc_render_without_internet(docs_server):
    from playwright.sync_api import sync_playwright

    base = str(docs_server.base_url)
    elsewhere = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()

        def only_this_server(route):
            if route.request.url.startswith(base):
                route.continue_()
            else:  # as on a machine without internet
                elsewhere.append((route.request.resource_type, route.request.url))
                route.abort()

        page.route("**/*", only_this_server)
        page.goto(f"{base}/docs")
        page.locator(".opblock-summary-path", has_text="/api/v1/generations").first.wait_for(timeout=30_000)
        assert page.locator(".opblock").count() >= 8
        page.goto(f"{base}/redoc")
        page.get_by_text("Validate and enqueue", exact=False).first.wait_for(timeout=30_000)
        browser.close()
    # Redoc's "powered by" badge links an image on cdn.redoc.ly; it is decoration, nothing the page needs.
    assert [url for kind, url in elsewhere if kind != "image"] == []
