"""The web UI in headless Chromium (Debian's package), driven by Playwright for Python."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import CHROMIUM, FLAGS, Running
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    outputs = tmp_path_factory.mktemp("ui-outputs")
    runner = Running(create_app(generator, outputs))
    client = runner.__enter__()
    yield f"{client.base_url}/ui/", outputs
    runner.__exit__(None, None, None)


def test_generate_from_the_browser_and_see_history(served, tmp_path):
    page_url, outputs = served
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(page_url)
        page.get_by_text("Model", exact=False).first.wait_for()
        assert "embedded tiny checkpoint" not in page.inner_text("#zstudio-status")  # a real folder was given
        page.fill("#prompt textarea", "蓝色背景上的红色圆形, a red circle")
        page.get_by_role("button", name="512x512").click()
        for side in ("width", "height"):  # the preset sets the sliders through the server: wait until it has
            expect(page.locator(f"#{side} input[type=number]")).to_have_value("512", timeout=30_000)
        page.locator("#seed input").fill("77")
        page.click("#generate")
        page.wait_for_selector("#result img", timeout=60_000)
        page.get_by_text("Done: 1 image(s)").wait_for(timeout=60_000)
        assert "seeds [77]" in page.inner_text("#zstudio-progress")
        src = page.locator("#result img").first.get_attribute("src")
        served_image = page.request.get(src)
        assert served_image.ok and served_image.body()[:8] == b"\x89PNG\r\n\x1a\n"
        saved = sorted(outputs.glob("outputs_*.png"))
        assert len(saved) == 1
        meta = read_metadata(saved[0])
        assert meta["params"]["seed"] == 77 and (meta["params"]["width"], meta["params"]["height"]) == (512, 512)
        page.screenshot(path=str(tmp_path / "ui.png"))
        page.get_by_role("tab", name="History").click()
        page.get_by_role("button", name="Refresh").click()
        page.wait_for_selector("#history img", timeout=30_000)
        browser.close()


SCREENSHOTS = {"en": "screenshot.png", "zh": "screenshot-zh.png"}
WORDS = {  # what each language shows: a label, the Generate button, the History tab, the status and the result
    "en": ("Prompt", "Generate", "History", "Model", "Done: 4 image(s)"),
    "zh": ("提示词", "生成", "历史", "模型", "完成：4 张图片"),
}


@pytest.fixture(scope="module")
def demo_served(tmp_path_factory):
    generator = Generator(model="demo", device="cpu").load()  # draws shapes, so the screenshots show something
    runner = Running(create_app(generator, tmp_path_factory.mktemp("ui-demo-outputs")))
    client = runner.__enter__()
    yield f"{client.base_url}/ui/"
    runner.__exit__(None, None, None)


@pytest.mark.parametrize(("locale", "lang"), [("en-US", "en"), ("zh-CN", "zh")])
def test_page_speaks_the_browsers_language(demo_served, tmp_path, locale, lang):
    """Labels (Gradio's i18n) and the server's own lines (status, progress) follow the browser's language.
    ZSTUDIO_UPDATE_SCREENSHOTS=1 writes the screenshots into docs/."""
    from playwright.sync_api import sync_playwright

    label, button, tab, status_word, done = WORDS[lang]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.goto(demo_served)
        page.locator("#zstudio-status", has_text=status_word).wait_for(timeout=30_000)
        page.get_by_text(label, exact=True).first.wait_for()
        assert page.inner_text("#generate").strip() == button
        assert page.get_by_role("tab", name=tab).count() == 1
        page.fill("#prompt textarea", "a red circle on a blue background")
        page.locator("#seed input").fill("3")
        page.locator("#images input[type=number]").fill("4")
        page.locator("#images input[type=number]").press("Enter")
        page.click("#generate")
        page.locator("#zstudio-progress", has_text=done).wait_for(timeout=120_000)
        page.wait_for_selector("#result img", timeout=30_000)
        shot = tmp_path / SCREENSHOTS[lang]
        page.screenshot(path=str(shot))
        if os.environ.get("ZSTUDIO_UPDATE_SCREENSHOTS") == "1":
            shutil.copy(shot, Path(__file__).parent.parent / "docs" / SCREENSHOTS[lang])
        browser.close()


def test_settings_in_the_footer_switch_the_labels(demo_served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(locale="en-US").new_page()
        page.goto(demo_served)
        page.locator("#zstudio-status", has_text="Model").wait_for(timeout=30_000)
        assert page.inner_text("#generate").strip() == "Generate"
        page.get_by_text("Settings").click()
        page.locator("[aria-label*='anguage']").first.click()
        page.locator("ul[role=listbox] li", has_text="简体中文").first.click()
        page.locator("#generate", has_text="生成").wait_for(timeout=10_000)
        assert "提示词" in page.inner_text("#prompt")
        browser.close()
